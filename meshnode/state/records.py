"""Records stored in etcd as JSON objects, tolerant of fields written by newer versions."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, ClassVar, Self

log = logging.getLogger(__name__)


_defaults: dict[type, dict[str, object]] = {}
_known: dict[type, tuple[str, frozenset[str]]] = {}


def defaults_of(cls: type[JsonRecord]) -> dict[str, object]:
    """The fields whose default is known without a clock: their default ({} for a dict field)."""
    found = _defaults.get(cls)
    if found is None:
        found = _defaults[cls] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                found[f.name] = f.default
            elif f.default_factory is dict:
                found[f.name] = {}
    return found


def known_fields(cls: type[JsonRecord]) -> tuple[str, frozenset[str]]:
    """The key field's name and every field but `extra`."""
    found = _known.get(cls)
    if found is None:
        fields = dataclasses.fields(cls)
        found = _known[cls] = fields[0].name, frozenset(f.name for f in fields) - {"extra"}
    return found


def is_default(value: object, default: object) -> bool:
    # The type check keeps 0 apart from False and 1 from True.
    return type(value) is type(default) and value == default


class JsonRecord:
    """Base of dataclass records whose first field is the key (a string) and which have an `extra`
    dict: fields this version does not know are kept as read, so that a read-modify-write by an
    older node does not drop them."""

    extra: dict[str, Any]
    # Set by @dataclass on each record class; declared so that dataclasses.fields() accepts this base.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    # Leave fields at their default out of the JSON (readers fill them in): records there are many of.
    OMIT_DEFAULTS: ClassVar[bool] = False

    def to_json(self) -> bytes:
        cls = type(self)
        _, known = known_fields(cls)
        data = {name: getattr(self, name) for name in cls.__dataclass_fields__ if name in known}
        if cls.OMIT_DEFAULTS:
            defaults = defaults_of(cls)
            data = {k: v for k, v in data.items() if k not in defaults or not is_default(v, defaults[k])}
        # The key field first, newer versions' fields last: views recognise a compact record by how it starts.
        return json.dumps({**data, **{k: v for k, v in self.extra.items() if k not in data}},
                          separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        """Raises ValueError or TypeError for a record that is not one of these."""
        data = json.loads(raw)
        key, known = known_fields(cls)
        if not isinstance(data, dict) or not isinstance(data.get(key), str):
            raise ValueError(f"{cls.__name__} must be a JSON object with a string '{key}'")
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
