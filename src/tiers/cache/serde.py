"""Values to bytes and back, with memcached's 32-bit flags saying which way.

A serde turns a Python value into ``(bytes, flags)`` for storing and
``(bytes, flags)`` back into a value when reading. Clients take any object
with those two methods (``Serde``, a ``typing.Protocol``); the default is
``DefaultSerde``:

    flag 0  bytes, bytearray, memoryview   stored as is, read back as bytes
    flag 1  str                            UTF-8
    flag 2  int (not bool)                 ASCII decimal, so incr/decr work on it
    flag 3  JSON: dict, list, tuple, float, bool, None (tuples come back as lists)
    flag 4  pickle, only when enabled      anything else

Pickle is opt-in in both directions. Without ``pickle=True`` a value of any
other type raises ``SerdeError`` when stored, and an item stored with flag 4
raises ``SerdeError`` when read instead of being unpickled, because
unpickling bytes from a shared cache runs whatever code whoever could write
to it chose. Unknown flags, bad UTF-8, bad JSON and bad numbers raise
``SerdeError`` too; the cache never hands back a value it could not decode.

Numbers read back tolerate surrounding spaces: memcached pads a decremented
number with trailing spaces when its text gets shorter ("100" decr 1 is
"99 ").
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Final, Protocol

from tiers.cache.errors import SerdeError

FLAG_BYTES: Final = 0
FLAG_STR: Final = 1
FLAG_INT: Final = 2
FLAG_JSON: Final = 3
FLAG_PICKLE: Final = 4

_JSON_TYPES: Final = (dict, list, tuple, float, bool, type(None))


class Serde(Protocol):
    """How values become stored bytes and flags, and back."""

    def dumps(self, value: Any) -> tuple[bytes, int]:
        """``(data, flags)`` for ``value``; ``SerdeError`` if it cannot be stored."""
        ...

    def loads(self, data: bytes, flags: int) -> Any:
        """The value stored as ``data`` with ``flags``; ``SerdeError`` if it cannot be read."""
        ...


class DefaultSerde:
    """bytes, str, int and JSON; pickle only with ``pickle=True`` (see the module docstring).

    ``pickle_protocol`` is the protocol used when writing pickles.
    """

    __slots__ = ("_pickle", "_protocol")

    def __init__(self, *, pickle: bool = False, pickle_protocol: int = 5) -> None:
        self._pickle = pickle
        self._protocol = pickle_protocol

    @property
    def pickle_enabled(self) -> bool:
        """Whether values of other types are pickled, and pickles read back."""
        return self._pickle

    def dumps(self, value: Any) -> tuple[bytes, int]:
        kind = type(value)
        if kind is bytes:
            return value, FLAG_BYTES
        if kind is str:
            return value.encode("utf-8", "surrogatepass"), FLAG_STR
        if kind is int:
            return b"%d" % value, FLAG_INT
        if isinstance(value, bytearray | memoryview):
            return bytes(value), FLAG_BYTES
        if isinstance(value, _JSON_TYPES):
            try:
                text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                if not self._pickle:
                    raise SerdeError(f"cannot store {kind.__name__} as JSON: {exc}") from exc
            else:
                return text.encode("utf-8"), FLAG_JSON
        # Subclasses of str, bytes and int land here too: only pickle keeps their type.
        if self._pickle:
            try:
                return pickle.dumps(value, protocol=self._protocol), FLAG_PICKLE
            except Exception as exc:
                raise SerdeError(f"cannot pickle {kind.__name__}: {exc}") from exc
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass"), FLAG_STR
        if isinstance(value, bytes):
            return bytes(value), FLAG_BYTES
        if isinstance(value, int):
            return b"%d" % value, FLAG_INT
        raise SerdeError(
            f"cannot store a {kind.__name__}: use bytes, str, int or JSON types, or enable pickle"
        )

    def loads(self, data: bytes, flags: int) -> Any:
        if flags == FLAG_BYTES:
            return data
        if flags == FLAG_STR:
            try:
                return data.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise SerdeError(f"stored text is not UTF-8: {exc}") from exc
        if flags == FLAG_INT:
            text = data.strip(b" ")
            digits = text[1:] if text[:1] == b"-" else text
            if digits.isdigit():
                try:
                    return int(text)
                except ValueError:  # more digits than int() converts
                    pass
            raise SerdeError(f"stored number is not a decimal integer: {data[:40]!r}")
        if flags == FLAG_JSON:
            try:
                return json.loads(data)
            except ValueError as exc:
                raise SerdeError(f"stored JSON is invalid: {exc}") from exc
        if flags == FLAG_PICKLE:
            if not self._pickle:
                raise SerdeError(
                    "refusing to unpickle a cached value: pickle is not enabled "
                    "(unpickling runs code chosen by whoever wrote the item)"
                )
            try:
                return pickle.loads(data)
            except Exception as exc:
                raise SerdeError(f"stored pickle is invalid: {exc}") from exc
        raise SerdeError(f"unknown flags {flags}: no serde for them")


class RawSerde:
    """Bytes in, bytes out; flags are ignored on read and 0 on write.

    For callers that do their own encoding, and for reading items other
    programs wrote with flags this package does not know.
    """

    __slots__ = ()

    def dumps(self, value: Any) -> tuple[bytes, int]:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value), FLAG_BYTES
        raise SerdeError(f"RawSerde stores bytes only, not {type(value).__name__}")

    def loads(self, data: bytes, flags: int) -> Any:
        return data


DEFAULT_SERDE: Final = DefaultSerde()
