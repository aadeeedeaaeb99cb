"""Records stored in etcd as JSON objects, tolerant of fields written by newer versions."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, ClassVar, Self

log = logging.getLogger(__name__)


class JsonRecord:
    """Base of dataclass records whose first field is the key (a string) and which have an `extra`
    dict: fields this version does not know are kept as read, so that a read-modify-write by an
    older node does not drop them."""

    extra: dict[str, Any]
    # Set by @dataclass on each record class; declared so that dataclasses.fields() accepts this base.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_json(self) -> bytes:
        fields = dataclasses.fields(self)
        data = {f.name: getattr(self, f.name) for f in fields if f.name != "extra"}
        return json.dumps({**self.extra, **data}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        """Raises ValueError or TypeError for a record that is not one of these."""
        fields = dataclasses.fields(cls)
        data = json.loads(raw)
        key = fields[0].name
        if not isinstance(data, dict) or not isinstance(data.get(key), str):
            raise ValueError(f"{cls.__name__} must be a JSON object with a string '{key}'")
        known = {f.name for f in fields} - {"extra"}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.extra = {k: v for k, v in data.items() if k not in known}
        return record

    @classmethod
    def decode(cls, key: str, raw: bytes) -> Self | None:
        """from_json for a watched view: a malformed record is logged and skipped, not fatal."""
        try:
            return cls.from_json(raw)
        except (ValueError, TypeError) as e:
            log.warning("ignoring malformed %s %r: %s", cls.__name__, key, e)
            return None
