"""Memcached text protocol, client side, without I/O.

Requests are built by plain functions that return the exact bytes to send;
replies are read by ``ReplyParser``, which is fed bytes as they arrive and
hands out one event per complete reply line (a ``VALUE`` line together with
its data block). Neither touches a socket or a clock.

Keys are ``str`` (sent as UTF-8) or ``bytes``: 1 to 250 bytes, without
whitespace or control bytes (0x00-0x20, 0x7f). A bad key raises
``CacheKeyError`` naming the problem; a value longer than ``max_value``
(default 1 MiB) or a number outside what the protocol carries (flags are 32
bits, expiry times 32-bit signed, deltas and cas uniques 64 bits unsigned)
raises ``CacheValueError``. Both are raised before any byte is produced.

Events, one per ``next_event`` call:

    Value(key, flags, value, cas)   one item of a get/gets/gat/gats reply (cas None for get/gat)
    END                             end of a retrieval or stats reply
    STORED NOT_STORED EXISTS NOT_FOUND DELETED TOUCHED OK RESET
    Number(value)                   the new value after incr/decr
    Version(text)                   the reply to version
    Stat(name, value)               one line of a stats reply
    ErrorReply(kind, text)          ERROR, CLIENT_ERROR ..., SERVER_ERROR ...

``take_values`` returns a whole run of Value events in one call and then the
event after them (END for a complete retrieval reply): the clients' hot path.
The parser keeps no notion of which command is outstanding: matching events to
commands is the client's job (``storage_result`` and friends below help).

Malformed input raises ``ProtocolError`` and the parser stays failed (every
later call raises again): a VALUE line that does not split into key, flags,
length and optional cas, with non-digits or a length above ``max_value``; a
data block not followed by CRLF (its length does not match the header); a line
ending in a bare LF; a line longer than ``max_line`` bytes; a line that is no
known reply. A reply cut short is only detectable when the stream ends: call
``close()``, which raises ``ProtocolError`` if a partial reply is buffered.
Replies may be split at any byte and several may arrive in one chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from tiers.cache.errors import CacheKeyError, CacheValueError, ProtocolError

Key = str | bytes

MAX_KEY_LENGTH: Final = 250
DEFAULT_MAX_VALUE: Final = 1 << 20
DEFAULT_MAX_LINE: Final = 8192
# A multi-get line stays below what memcached buffers without special-casing
# and what the embedded server accepts, while still one round trip per call.
MAX_KEYS_PER_LINE: Final = 100

_MAX_U32: Final = (1 << 32) - 1
_MAX_U64: Final = (1 << 64) - 1
_MIN_I32: Final = -(1 << 31)
_MAX_I32: Final = (1 << 31) - 1
_FORBIDDEN: Final = bytes(range(0x21)) + b"\x7f"


# --- keys -------------------------------------------------------------------


def encode_key(key: Key) -> bytes:
    """The key as the bytes to send; ``CacheKeyError`` if it is not a valid key."""
    if type(key) is str:
        try:
            data = key.encode()
        except UnicodeEncodeError as exc:
            raise CacheKeyError(key, "not encodable as UTF-8") from exc
    elif type(key) is bytes:
        data = key
    elif isinstance(key, str):
        return encode_key(str.__str__(key))
    elif isinstance(key, bytes | bytearray | memoryview):
        data = bytes(key)
    else:
        raise CacheKeyError(key, f"must be str or bytes, not {type(key).__name__}")
    size = len(data)
    if 0 < size <= MAX_KEY_LENGTH and len(data.translate(None, _FORBIDDEN)) == size:
        return data
    if size == 0:
        raise CacheKeyError(key, "empty")
    if size > MAX_KEY_LENGTH:
        raise CacheKeyError(key, f"{size} bytes long, the limit is {MAX_KEY_LENGTH}")
    bad = next(b for b in data if b in _FORBIDDEN)
    what = "whitespace" if bad in b" \t\n\r\x0b\x0c" else "a control byte"
    raise CacheKeyError(key, f"contains {what} (0x{bad:02x})")


# --- requests ---------------------------------------------------------------


def _u32(name: str, value: int) -> int:
    if not 0 <= value <= _MAX_U32:
        raise CacheValueError(f"{name} {value} is outside 0..{_MAX_U32}")
    return value


def _i32(name: str, value: int) -> int:
    if not _MIN_I32 <= value <= _MAX_I32:
        raise CacheValueError(f"{name} {value} is outside {_MIN_I32}..{_MAX_I32}")
    return value


def _u64(name: str, value: int) -> int:
    if not 0 <= value <= _MAX_U64:
        raise CacheValueError(f"{name} {value} is outside 0..{_MAX_U64}")
    return value


def _noreply(noreply: bool) -> bytes:
    return b" noreply" if noreply else b""


def retrieval_request(command: bytes, keys: Sequence[bytes], exptime: int | None = None) -> bytes:
    """``get``/``gets`` (no exptime) or ``gat``/``gats`` lines for keys already encoded.

    More than ``MAX_KEYS_PER_LINE`` keys become several pipelined lines in one
    request: the reply then has one END per line.
    """
    prefix = command + b" " if exptime is None else b"%b %d " % (command, _i32("exptime", exptime))
    if len(keys) <= MAX_KEYS_PER_LINE:
        return prefix + b" ".join(keys) + b"\r\n"
    return b"".join(
        prefix + b" ".join(keys[i : i + MAX_KEYS_PER_LINE]) + b"\r\n"
        for i in range(0, len(keys), MAX_KEYS_PER_LINE)
    )


def line_count(keys: int) -> int:
    """How many lines (and so END markers) ``retrieval_request`` uses for ``keys`` keys."""
    return max(1, -(-keys // MAX_KEYS_PER_LINE))


def get_request(keys: Iterable[Key], *, cas: bool = False) -> bytes:
    """``get k1 k2 ...`` (``gets`` with ``cas=True``). At least one key."""
    encoded = [encode_key(k) for k in keys]
    if not encoded:
        raise CacheKeyError((), "no keys given")
    return retrieval_request(b"gets" if cas else b"get", encoded)


def gat_request(exptime: int, keys: Iterable[Key], *, cas: bool = False) -> bytes:
    """``gat exptime k1 ...``: get and set a new expiry (``gats`` with ``cas=True``)."""
    encoded = [encode_key(k) for k in keys]
    if not encoded:
        raise CacheKeyError((), "no keys given")
    return retrieval_request(b"gats" if cas else b"gat", encoded, exptime)


_STORE_PREFIX: Final = {
    "set": b"set ",
    "add": b"add ",
    "replace": b"replace ",
    "append": b"append ",
    "prepend": b"prepend ",
    "cas": b"cas ",
}
_CAS: Final = _STORE_PREFIX["cas"]


def store_request(
    command: str,
    key: Key,
    value: bytes | bytearray | memoryview,
    *,
    flags: int = 0,
    exptime: int = 0,
    cas_unique: int | None = None,
    noreply: bool = False,
    max_value: int = DEFAULT_MAX_VALUE,
) -> bytes:
    """``set``/``add``/``replace``/``append``/``prepend``/``cas``: header line and data block.

    ``cas_unique`` is required for ``cas`` and refused for the others.
    ``exptime``: 0 never expires, up to 30 days relative seconds, above that a
    unix time, negative expires at once.
    """
    prefix = _STORE_PREFIX.get(command)
    if prefix is None:
        raise ValueError(f"unknown storage command {command!r}")
    if cas_unique is None:
        if prefix is _CAS:
            raise ValueError("cas needs cas_unique")
        tail = b" noreply\r\n" if noreply else b"\r\n"
    elif prefix is _CAS:
        tail = b" %d%b\r\n" % (_u64("cas unique", cas_unique), _noreply(noreply))
    else:
        raise ValueError(f"{command} takes no cas_unique")
    k = encode_key(key)
    if type(value) is not bytes:
        value = bytes(value)
    size = len(value)
    if size > max_value:
        raise CacheValueError(f"value of {size} bytes exceeds the maximum of {max_value}")
    if not (0 <= flags <= _MAX_U32 and _MIN_I32 <= exptime <= _MAX_I32):
        _u32("flags", flags)
        _i32("exptime", exptime)
    return b"%b%b %d %d %d%b%b\r\n" % (prefix, k, flags, exptime, size, tail, value)


def delete_request(key: Key, *, noreply: bool = False) -> bytes:
    """``delete key``."""
    return b"delete %b%b\r\n" % (encode_key(key), _noreply(noreply))


def incr_request(key: Key, delta: int = 1, *, noreply: bool = False) -> bytes:
    """``incr key delta``: the stored value must be a decimal number; wraps at 2**64."""
    return b"incr %b %d%b\r\n" % (encode_key(key), _u64("delta", delta), _noreply(noreply))


def decr_request(key: Key, delta: int = 1, *, noreply: bool = False) -> bytes:
    """``decr key delta``: stops at 0."""
    return b"decr %b %d%b\r\n" % (encode_key(key), _u64("delta", delta), _noreply(noreply))


def touch_request(key: Key, exptime: int, *, noreply: bool = False) -> bytes:
    """``touch key exptime``: set a new expiry without fetching."""
    return b"touch %b %d%b\r\n" % (encode_key(key), _i32("exptime", exptime), _noreply(noreply))


def version_request() -> bytes:
    """``version``."""
    return b"version\r\n"


def flush_all_request(delay: int = 0, *, noreply: bool = False) -> bytes:
    """``flush_all [delay]``: invalidate every item now, or in ``delay`` seconds."""
    if delay:
        return b"flush_all %d%b\r\n" % (_i32("delay", delay), _noreply(noreply))
    return b"flush_all%b\r\n" % _noreply(noreply)


def stats_request(*args: str) -> bytes:
    """``stats [args]``; each argument must be a plain token."""
    for arg in args:
        if not arg or not arg.isascii() or not arg.isprintable() or " " in arg:
            raise ValueError(f"bad stats argument {arg!r}")
    return ("stats " + " ".join(args) if args else "stats").encode("ascii") + b"\r\n"


# --- reply events -----------------------------------------------------------


class Value(NamedTuple):
    """One item of a retrieval reply. ``cas`` is None unless asked for (gets/gats)."""

    key: bytes
    flags: int
    value: bytes
    cas: int | None

    def __repr__(self) -> str:
        return f"Value({self.key!r}, {self.flags}, <{len(self.value)} bytes>, {self.cas})"


# NamedTuple's generated __new__ is Python code; the parser builds Values
# through tuple.__new__ directly, at half the cost.
_new_value: Any = tuple.__new__


class Status:
    """A reply that is one fixed word. Compare by identity with the constants below."""

    __slots__ = ("word",)

    def __init__(self, word: str) -> None:
        self.word = word

    def __repr__(self) -> str:
        return self.word


END: Final = Status("END")
STORED: Final = Status("STORED")
NOT_STORED: Final = Status("NOT_STORED")
EXISTS: Final = Status("EXISTS")
NOT_FOUND: Final = Status("NOT_FOUND")
DELETED: Final = Status("DELETED")
TOUCHED: Final = Status("TOUCHED")
OK: Final = Status("OK")
RESET: Final = Status("RESET")


@dataclass(slots=True)
class Number:
    """The reply to incr/decr: the new value."""

    value: int


@dataclass(slots=True)
class Version:
    """The reply to version."""

    text: str


@dataclass(slots=True)
class Stat:
    """One ``STAT name value`` line."""

    name: str
    value: str


@dataclass(slots=True)
class ErrorReply:
    """``ERROR``, ``CLIENT_ERROR text`` or ``SERVER_ERROR text``."""

    kind: str
    text: str


Event = Value | Status | Number | Version | Stat | ErrorReply

_STATUS: Final = {
    s.word.encode(): s
    for s in (END, STORED, NOT_STORED, EXISTS, NOT_FOUND, DELETED, TOUCHED, OK, RESET)
}
_ERROR_KINDS: Final = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")


def _text(data: bytes) -> str:
    # Error texts and stats come from the node; never let their encoding fail a call.
    return data.decode("utf-8", "replace")


# --- reply parser -----------------------------------------------------------


class ReplyParser:
    """Incremental reader of memcached text replies: ``feed`` bytes, take events.

    ``next_event`` returns the next complete event, or None when more bytes
    are needed. See the module docstring for what is rejected.
    """

    __slots__ = ("_buf", "_failed", "_max_line", "_max_value", "_pos", "_want")

    def __init__(self, *, max_value: int = DEFAULT_MAX_VALUE, max_line: int = DEFAULT_MAX_LINE):
        self._max_value = max_value
        self._max_line = max_line
        # Bytes are adopted as fed when nothing is pending (no copy); a bytearray
        # takes over only while a reply spans several chunks.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        # Pending bytes below which another attempt cannot complete an event
        # (counted from _pos, which survives the buffer being compacted).
        self._want = 0
        self._failed: str | None = None

    @property
    def pending(self) -> int:
        """Bytes received and not yet consumed by an event."""
        return len(self._buf) - self._pos

    @property
    def wanted(self) -> int:
        """At least this many more bytes are needed before the next event can complete."""
        return max(1, self._want - (len(self._buf) - self._pos))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        if isinstance(buf, bytearray):
            if self._pos:
                del buf[: self._pos]  # cheap: CPython moves the start of a bytearray
            grown = buf
        else:
            grown = bytearray(memoryview(buf)[self._pos :])
        self._pos = 0
        grown += data
        self._buf = grown

    def close(self) -> None:
        """The stream ended: raise ``ProtocolError`` if a reply was cut short."""
        if self._failed is not None:
            raise ProtocolError(self._failed)
        if self._pos < len(self._buf):
            partial = len(self._buf) - self._pos
            raise ProtocolError(f"reply truncated: {partial} bytes of a partial reply")

    def _fail(self, reason: str) -> ProtocolError:
        self._failed = reason
        return ProtocolError(reason)

    def next_event(self) -> Event | None:
        """The next complete event, or None if more bytes are needed."""
        if self._failed is not None:
            raise ProtocolError(self._failed)
        buf = self._buf
        size = len(buf)
        pos = self._pos
        if size - pos < self._want:
            return None
        if buf.startswith(b"VALUE ", pos):
            found: list[Value] = []
            self.take_values(found, 1)
            return found[0] if found else None
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if size - pos > self._max_line:
                raise self._fail(f"reply line longer than {self._max_line} bytes")
            return None
        if nl - pos > self._max_line:
            raise self._fail(f"reply line longer than {self._max_line} bytes")
        if nl == pos or buf[nl - 1] != 13:
            raise self._fail("reply line not terminated by CRLF")
        line = bytes(buf[pos : nl - 1])
        event: Event | None = _STATUS.get(line)
        if event is None:
            if line.isdigit():
                if len(line) > 20 or int(line) > _MAX_U64:
                    raise self._fail("incr/decr reply out of range")
                event = Number(int(line))
            else:
                event = self._other(line)
        if nl + 1 >= size:
            self._buf = b""
            self._pos = 0
        else:
            self._pos = nl + 1
        return event

    def take_values(self, out: list[Value], limit: int = -1) -> Event | None:
        """Append consecutive Value events to ``out`` (at most ``limit`` if positive).

        Returns the first event that is not a Value (END for a complete
        retrieval reply), or None when more bytes are needed or ``limit`` was
        reached. This is ``next_event`` in a loop, without its per-call cost.
        """
        if self._failed is not None:
            raise ProtocolError(self._failed)
        buf = self._buf
        size = len(buf)
        pos = self._pos
        if size - pos < self._want:
            return None
        max_line = self._max_line
        try:
            while buf.startswith(b"VALUE ", pos):
                nl = buf.find(b"\n", pos)
                if nl < 0 or nl - pos > max_line:
                    if nl - pos > max_line or size - pos > max_line:
                        raise self._fail(f"reply line longer than {max_line} bytes")
                    return None
                if buf[nl - 1] != 13:
                    raise self._fail("reply line not terminated by CRLF")
                parts = buf[pos + 6 : nl - 1].split(b" ")
                if len(parts) == 3:
                    key, flags, length = parts
                    cas = None
                elif len(parts) == 4:
                    key, flags, length, cas_text = parts
                    if not cas_text.isdigit() or len(cas_text) > 20:
                        raise self._bad_value(buf, pos, nl)
                    cas = int(cas_text)
                else:
                    raise self._bad_value(buf, pos, nl)
                if not key or not flags.isdigit() or not length.isdigit() or len(length) > 20:
                    raise self._bad_value(buf, pos, nl)
                start = nl + 1
                end = start + int(length)
                if end - start > self._max_value:
                    raise self._fail(
                        f"value of {end - start} bytes exceeds the maximum of {self._max_value}"
                    )
                if size < end + 2:
                    self._want = end + 2 - pos
                    return None
                if buf[end] != 13 or buf[end + 1] != 10:
                    raise self._fail("data block not followed by CRLF (length does not match)")
                if type(buf) is bytes:
                    data = buf[start:end]
                else:
                    with memoryview(buf) as view:
                        data = bytes(view[start:end])
                out.append(_new_value(Value, (bytes(key), int(flags), data, cas)))
                pos = end + 2
                self._want = 0
                if limit > 0 and len(out) >= limit:
                    return None
            if buf.startswith(b"END\r\n", pos):
                pos += 5
                return END
        finally:
            if pos >= size:
                self._buf = b""
                self._pos = 0
            else:
                self._pos = pos
        return self.next_event()

    def _bad_value(self, buf: bytes | bytearray, pos: int, nl: int) -> ProtocolError:
        return self._fail(f"bad VALUE line {_show(bytes(buf[pos : nl - 1]))}")

    def _other(self, line: bytes) -> Event:
        word, _, rest = line.partition(b" ")
        if word == b"STAT" and rest:
            name, _, value = rest.partition(b" ")
            return Stat(_text(name), _text(value))
        if word == b"VERSION" and rest:
            return Version(_text(rest))
        if word in _ERROR_KINDS:
            return ErrorReply(word.decode(), _text(rest))
        raise self._fail(f"unknown reply line {_show(line)}")


def _show(line: bytes, limit: int = 80) -> str:
    return repr(line if len(line) <= limit else line[:limit] + b"...")


# --- reply interpretation (shared by the blocking and asyncio clients) -------
#
# Each takes the one event a command's reply consists of and returns the
# command's result, or raises ProtocolError when the event cannot answer that
# command (the stream is out of step and the connection must go).


def unexpected(event: object, command: str) -> ProtocolError:
    """The error for a well-formed reply that the command cannot receive."""
    return ProtocolError(f"unexpected reply {event!r} to {command}")


def storage_result(event: Event) -> bool:
    """set/add/replace/append/prepend: True if stored, False if not (add: exists;
    replace, append, prepend: missing)."""
    if event is STORED:
        return True
    if event is NOT_STORED:
        return False
    raise unexpected(event, "a storage command")


def cas_result(event: Event) -> bool | None:
    """cas: True if stored, False if the item changed since it was read, None if it is gone."""
    if event is STORED:
        return True
    if event is EXISTS:
        return False
    if event is NOT_FOUND:
        return None
    raise unexpected(event, "cas")


def delete_result(event: Event) -> bool:
    """delete: True if deleted, False if there was no such item."""
    if event is DELETED:
        return True
    if event is NOT_FOUND:
        return False
    raise unexpected(event, "delete")


def touch_result(event: Event) -> bool:
    """touch: True if the item exists and got its new expiry, False if there is none."""
    if event is TOUCHED:
        return True
    if event is NOT_FOUND:
        return False
    raise unexpected(event, "touch")


def number_result(event: Event) -> int | None:
    """incr/decr: the new value, or None when the key does not exist."""
    if type(event) is Number:
        return event.value
    if event is NOT_FOUND:
        return None
    raise unexpected(event, "incr/decr")


def version_result(event: Event) -> str:
    """version: the version text."""
    if type(event) is Version:
        return event.text
    raise unexpected(event, "version")


def ok_result(event: Event) -> None:
    """flush_all (and verbosity): OK."""
    if event is not OK:
        raise unexpected(event, "flush_all")
