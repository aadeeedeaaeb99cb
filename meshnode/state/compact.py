"""How a view holds records: as they are (aliases, a few), or compactly (models, up to a million).

A compact view keeps a record nobody uses as the JSON bytes etcd sent (default fields are left out of it,
meshnode.state.records), shrunk: without `{"name":"<its key>",` and with the names of its commonest fields
as one control byte each (JSON has none outside strings, and inside them they are escaped), about 100 bytes.
It is decoded only when asked. Reading it gives a lazy record: a field absent from the JSON is its default
without parsing anything, so a listener or a scan that looks at `enabled` or `copies` of 100,000 records
parses none of them. A record in use (with copies or failures) is kept decoded, so the request path reads it
as one dict get and gets the same object each time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, cast, overload

from meshnode.state.records import JsonRecord, defaults_of, known_fields

log = logging.getLogger(__name__)

R = TypeVar("R", bound=JsonRecord)
D = TypeVar("D")

_RAW = "_raw"
# Control bytes JSON never holds unescaped; tab, newline and carriage return may be whitespace between tokens.
_TOKENS = bytes(b for b in range(1, 32) if b not in (9, 10, 13))


class Shrinking:
    """The held form of a record's compact JSON and back: the key's part cut, `short` field names tokens, and
    a `path` field of `<directory>/<key>` one byte when the directory is the view's usual one (the first seen):
    a repository's models all live in one directory."""

    def __init__(self, key_field: str, short: tuple[str, ...], path: str | None = None) -> None:
        if len(short) >= len(_TOKENS):
            raise ValueError(f"at most {len(_TOKENS) - 1} short field names")
        self._head = f'{{"{key_field}":"'.encode()
        self._pairs = [(f'"{name}":'.encode(), _TOKENS[i:i + 1]) for i, name in enumerate(short)]
        self._path = f'"{path}":"'.encode() if path is not None else None
        self._in_directory = _TOKENS[-1:]
        self._directory: bytes | None = None
        self._used = _TOKENS[:len(short)] + self._in_directory

    def probe(self, field: str) -> bytes:
        """What the held form of a record holds when the record's JSON has `field`."""
        return next((token for long, token in self._pairs if long == f'"{field}":'.encode()), f'"{field}":'.encode())

    def shrink(self, key: str, raw: bytes) -> bytes | None:
        """The held form, or None for JSON not of the shape this reverses exactly."""
        head = self._head + key.encode() + b'",'
        if not raw.startswith(head) or not raw.endswith(b"}") or len(raw.translate(None, self._used)) != len(raw):
            return None
        held = raw[len(head):]
        if self._path is not None:
            held = self._drop_directory(key, held)
        for long, token in self._pairs:
            held = held.replace(long, token)
        return held

    def _drop_directory(self, key: str, held: bytes) -> bytes:
        assert self._path is not None
        if self._directory is None:
            start = held.find(self._path) + len(self._path)
            end = held.find(b'"', start)
            value = held[start:end]
            suffix = b"/" + key.encode()
            if start < len(self._path) or end < 0 or b"\\" in value or not value.endswith(suffix):
                return held
            self._directory = value[:-len(suffix)]
        return held.replace(self._path + self._directory + b"/" + key.encode() + b'"', self._in_directory, 1)

    def expand(self, key: str, held: bytes) -> bytes:
        if self._path is not None and self._directory is not None:
            held = held.replace(self._in_directory, self._path + self._directory + b"/" + key.encode() + b'"', 1)
        for long, token in self._pairs:
            held = held.replace(token, long)
        return self._head + key.encode() + b'",' + held


def lazy_maker(cls: type[R], shrinking: Shrinking) -> Callable[[str, bytes], R]:
    """make(key, held): a record of `cls` named `key` whose fields come from `held` (its JSON as `shrinking`
    holds it) when they are read. Built once per view: make runs for every record of a listing."""
    lazy_cls, key_field = _lazy_type(cls, shrinking), known_fields(cls)[0]
    new, attribute = object.__new__, object.__getattribute__

    def make(key: str, held: bytes) -> R:
        record: R = new(lazy_cls)
        fields = attribute(record, "__dict__")
        fields[key_field] = key
        fields[_RAW] = held
        return record

    return make


def _lazy_type(cls: type[R], shrinking: Shrinking) -> type[R]:
    defaults = defaults_of(cls)
    key_field, known = known_fields(cls)
    probes = {name: shrinking.probe(name) for name in known}

    def decode_into(fields: dict[str, Any]) -> None:
        key = fields[key_field]
        raw = shrinking.expand(key, fields.pop(_RAW))
        try:
            fields.update(vars(cls.from_json(raw)))
        except (ValueError, TypeError) as e:
            # Only a hand-made record can get here: a view holds JSON undecoded only if it looks like ours.
            log.warning("malformed %s %r read as its defaults: %s", cls.__name__, key, e)
            fields.update({k: defaults.get(k) for k in known if k not in fields}, extra={})
            fields.update({k: {} for k, v in fields.items() if v == {}})  # none shared with the defaults

    class Lazy(cls):  # type: ignore[valid-type,misc]  # a subclass of the record class given
        def __getattribute__(self, attr: str) -> Any:
            if attr in probes or attr == "extra":
                fields = object.__getattribute__(self, "__dict__")
                if attr in fields:
                    return fields[attr]
                if attr != "extra" and attr in defaults and probes[attr] not in fields[_RAW]:
                    value = defaults[attr]
                    fields[attr] = value = {} if isinstance(value, dict) else value
                    return value
                decode_into(fields)
                return fields[attr]
            return object.__getattribute__(self, attr)

        def __eq__(self, other: object) -> bool:
            if not isinstance(other, cls):
                return NotImplemented
            return all(getattr(self, f) == getattr(other, f) for f in cls.__dataclass_fields__)

        __hash__ = None  # type: ignore[assignment]  # as the record class: mutable, compared by value

    Lazy.__name__ = Lazy.__qualname__ = cls.__name__
    return cast(type[R], Lazy)


class Plain(Generic[R]):
    """Records held decoded, as they are: for views of a few records."""

    def __init__(self, cls: type[R]) -> None:
        self._cls = cls

    def held(self, key: str, raw: bytes) -> R | bytes | None:
        return self._cls.decode(key, raw)

    def held_record(self, record: R) -> R | bytes:
        return record

    def opened(self, key: str, held: R | bytes) -> R:
        return cast(R, held)


class Compact(Generic[R]):
    """Records held as shrunk JSON bytes until they are in use, as `in_use(record)` says (then decoded)."""

    def __init__(self, cls: type[R], in_use: Callable[[R], bool], use_marks: tuple[bytes, ...],
                 short: tuple[str, ...], path: str | None = None) -> None:
        """use_marks: byte strings one of which a record's JSON holds when in_use may say yes; short: the fields
        most records have, whose names the held form spells as one byte; path: a field usually `<dir>/<key>`."""
        self._cls = cls
        self._in_use = in_use
        self._marks = use_marks
        self._key_field = known_fields(cls)[0]
        self.shrinking = Shrinking(self._key_field, short, path)
        self._lazy = lazy_maker(cls, self.shrinking)

    def held(self, key: str, raw: bytes) -> R | bytes | None:
        for mark in self._marks:
            if mark in raw:
                break
        else:
            small = self.shrinking.shrink(key, raw)
            if small is not None:
                return small  # the common case, a record nobody uses: not parsed at all
        record = self._cls.decode(key, raw)
        return None if record is None else self.held_record(record)

    def held_record(self, record: R) -> R | bytes:
        # Re-encoded, not kept as read: a record of an older node with every default spelt out shrinks.
        if self._in_use(record):
            return record
        small = self.shrinking.shrink(getattr(record, self._key_field), record.to_json())
        return record if small is None else small

    def opened(self, key: str, held: R | bytes) -> R:
        return self._lazy(key, held) if type(held) is bytes else cast(R, held)


Holding = Plain[R] | Compact[R]


class RecordView(Mapping[str, R]):
    """A read-only mapping over held records that hands out records; `get` is one dict get for a record
    in use."""

    def __init__(self, held: dict[str, R | bytes], holding: Holding[R]) -> None:
        self._held = held
        self._opened = holding.opened

    def __getitem__(self, key: str) -> R:
        return self._opened(key, self._held[key])

    @overload
    def get(self, key: str, /) -> R | None: ...
    @overload
    def get(self, key: str, /, default: R | D) -> R | D: ...

    def get(self, key: str, /, default: object = None) -> object:
        held = self._held.get(key)
        if held is None:
            return default
        return held if type(held) is not bytes else self._opened(key, held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)
