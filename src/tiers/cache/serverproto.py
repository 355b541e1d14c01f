"""Memcached text protocol, server side, without I/O.

``RequestParser`` turns the bytes a client sends into commands;
``Conversation`` runs them against a ``Backend`` (the embedded server's
store, or a fake) and returns the bytes to answer. Neither touches a socket
or a clock, so both are tested by feeding bytes.

The parser follows memcached 1.6 (``proto_text.c``) where a client can see
the difference:

* A line ends at LF, with an optional CR before it. Tokens are separated by
  spaces only (a tab is part of a token). A line longer than 2048 bytes closes
  the connection without an answer, unless it is a ``get``/``gets`` line
  (multi-gets are long), which may reach ``max_get_line`` (1 MiB).
* Wrong token counts and unknown commands answer ``ERROR``; the connection
  stays usable. For a storage command that means its data block is then read
  as commands (answered ``ERROR`` in turn), as memcached does.
* Bad numbers and keys over 250 bytes answer ``CLIENT_ERROR bad command line
  format`` (``invalid exptime argument``, ``invalid numeric delta
  argument``, ...), again without consuming a data block.
* A storage command whose item would exceed ``max_item_size`` answers
  ``SERVER_ERROR object too large for cache`` and skips its data block
  (``set`` also removes the old item). A data block not followed by CRLF
  answers ``CLIENT_ERROR bad data chunk``.
* ``noreply`` (the last token) silences every answer of that command,
  errors included, once the token count is right.
* Numbers are read like memcached's ``safe_strto*``: leading whitespace and
  a sign are accepted, and out-of-range flags and expiry times wrap to 32
  bits rather than being refused.
* ``quit`` closes after the answers before it. Of the meta commands only
  the no-op ``mn`` is implemented; mg, ms and the others answer ``ERROR``.

Item size, for the limit and for the ``bytes`` statistic, is counted the way
memcached counts it (``item_size``): a 56-byte header, the key and a NUL,
the data and its CRLF, and 4 bytes of flags when they are not zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Protocol

KEY_MAX_LENGTH: Final = 250
DEFAULT_MAX_ITEM_SIZE: Final = 1 << 20
MAX_LINE: Final = 2048
DEFAULT_MAX_GET_LINE: Final = 1 << 20
VERSION: Final = "1.6.18-tiers"

_ITEM_HEADER: Final = 56  # memcached's item struct with the cas field, 64-bit
_U64: Final = 1 << 64


def item_size(key_length: int, flags: int, data_length: int) -> int:
    """Bytes memcached accounts for an item (``data_length`` without the CRLF)."""
    return _ITEM_HEADER + key_length + 1 + data_length + 2 + (4 if flags else 0)


# --- numbers as memcached's safe_strto* read them ---------------------------

_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
_SPACE: Final = frozenset(b" \t\n\v\f\r")


def _strto(token: bytes) -> tuple[bool, int] | None:
    match = _NUMBER.match(token)
    if match is None:
        return None
    end = match.end()
    if end != len(token) and token[end] not in _SPACE:
        return None
    return match.group(1) == b"-", int(match.group(2))


def strtoull(token: bytes) -> int | None:
    """``safe_strtoull``: an unsigned 64-bit number, or None."""
    parsed = _strto(token)
    if parsed is None:
        return None
    negative, magnitude = parsed
    if magnitude >= _U64:
        return None
    value = (-magnitude) % _U64 if negative else magnitude
    if value >= 1 << 63 and b"-" in token:
        return None
    return value


def strtoul32(token: bytes) -> int | None:
    """``safe_strtoul`` into a uint32: parsed as 64 bits, then truncated."""
    value = strtoull(token)
    return None if value is None else value & 0xFFFFFFFF


def strtol32(token: bytes) -> int | None:
    """``safe_strtol`` into an int32: parsed as a signed 64-bit number, then wrapped."""
    parsed = _strto(token)
    if parsed is None:
        return None
    negative, magnitude = parsed
    value = -magnitude if negative else magnitude
    if not -(1 << 63) <= value < 1 << 63:
        return None
    return ((value + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


# --- commands ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retrieve:
    """get/gets (``touch`` None) or gat/gats (``touch`` the new exptime)."""

    keys: list[bytes]
    cas: bool
    touch: int | None


@dataclass(frozen=True, slots=True)
class Storage:
    """A storage command with its data; ``data`` None when it was too large and skipped."""

    command: str  # set, add, replace, append, prepend, cas
    key: bytes
    flags: int
    exptime: int
    data: bytes | None
    cas_unique: int
    noreply: bool


@dataclass(frozen=True, slots=True)
class BadChunk:
    """A storage command whose data block was not followed by CRLF."""

    noreply: bool


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    noreply: bool


@dataclass(frozen=True, slots=True)
class Arith:
    key: bytes
    incr: bool
    delta: int
    noreply: bool


@dataclass(frozen=True, slots=True)
class Touch:
    key: bytes
    exptime: int
    noreply: bool


@dataclass(frozen=True, slots=True)
class FlushAll:
    delay: int
    noreply: bool


@dataclass(frozen=True, slots=True)
class Stats:
    args: list[bytes]


@dataclass(frozen=True, slots=True)
class Reply:
    """A fixed answer decided by the parser (errors, version, verbosity); may be empty."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after what was answered so far (quit, or an over-long line)."""


Command = Retrieve | Storage | BadChunk | Delete | Arith | Touch | FlushAll | Stats | Reply | Close

ERROR: Final = Reply(b"ERROR\r\n")
_BAD_FORMAT: Final = b"CLIENT_ERROR bad command line format\r\n"
_BAD_EXPTIME: Final = b"CLIENT_ERROR invalid exptime argument\r\n"
_BAD_DELTA: Final = b"CLIENT_ERROR invalid numeric delta argument\r\n"
_BAD_DELETE: Final = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
_STORAGE: Final = frozenset({b"set", b"add", b"replace", b"append", b"prepend"})
_RETRIEVAL_PREFIXES: Final = (b"get ", b"gets ")
_CLOSE: Final = Close()


def _reply(data: bytes, noreply: bool) -> Reply:
    return Reply(b"" if noreply else data)


class RequestParser:
    """Bytes from one client connection in, commands out (see the module docstring)."""

    def __init__(
        self,
        *,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        max_get_line: int = DEFAULT_MAX_GET_LINE,
        version: str = VERSION,
    ) -> None:
        self._max_item_size = max_item_size
        self._max_get_line = max_get_line
        self._version = Reply(b"VERSION " + version.encode() + b"\r\n")
        self._buf = bytearray()
        self._pos = 0
        # A storage command waiting for its data block, and how many bytes it needs.
        self._pending: tuple[str, bytes, int, int, int, bool] | None = None
        self._need = 0
        self._skip = 0  # bytes of a too-large data block still to discard
        self._closed = False

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._closed:
            return
        skip = self._skip
        if skip:
            taken = min(skip, len(data))
            self._skip = skip - taken
            data = data[taken:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_command(self) -> Command | None:
        """The next complete command, or None when more bytes are needed."""
        if self._closed or self._skip:
            return None
        buf = self._buf
        if self._pending is not None:
            return self._data_block()
        pos = self._pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > MAX_LINE and not self._long_get_allowed(len(buf)):
                return self._close()
            return None
        if nl - pos > MAX_LINE and not self._long_get_allowed(nl):
            return self._close()
        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
        line = bytes(buf[pos:end])
        self._advance(nl + 1)
        nul = line.find(b"\0")
        if nul >= 0:
            line = line[:nul]  # memcached reads the line as a C string
        command = self._command(line)
        if command is None:  # a storage header: its data block follows
            return self._data_block()
        return command

    def _long_get_allowed(self, length_seen: int) -> bool:
        window = bytes(self._buf[self._pos : self._pos + 106])
        head = window.lstrip(b" ")
        if len(window) - len(head) > 100 or not head.startswith(_RETRIEVAL_PREFIXES):
            return False
        return length_seen - self._pos <= self._max_get_line

    def _close(self) -> Close:
        self._closed = True
        self._buf = bytearray()
        self._pos = 0
        return _CLOSE

    def _advance(self, pos: int) -> None:
        if pos >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = pos
            if pos > 65536:
                del self._buf[:pos]
                self._pos = 0

    def _data_block(self) -> Command | None:
        buf = self._buf
        pos = self._pos
        need = self._need
        if len(buf) - pos < need:
            return None
        assert self._pending is not None
        command, key, flags, exptime, cas_unique, noreply = self._pending
        self._pending = None
        end = pos + need - 2
        if buf[end : end + 2] != b"\r\n":
            self._advance(end + 2)
            return BadChunk(noreply)
        with memoryview(buf) as view:  # one copy of a large value, not two
            data = bytes(view[pos:end])
        self._advance(end + 2)
        return Storage(command, key, flags, exptime, data, cas_unique, noreply)

    def _command(self, line: bytes) -> Command | None:
        tokens = [t for t in line.split(b" ") if t]
        n = len(tokens)
        if n == 0 or len(tokens[0]) < 2:
            return ERROR
        name = tokens[0]
        if name in (b"get", b"gets", b"bget"):
            if n < 2:
                return ERROR
            keys = tokens[1:]
            if any(len(k) > KEY_MAX_LENGTH for k in keys):
                return Reply(_BAD_FORMAT)
            return Retrieve(keys, name == b"gets", None)
        if name in _STORAGE:
            return self._storage(name.decode(), tokens, n in (5, 6))
        if name == b"cas":
            return self._storage("cas", tokens, n in (6, 7))
        if name in (b"incr", b"decr"):
            if n not in (3, 4):
                return ERROR
            noreply = tokens[-1] == b"noreply"
            if len(tokens[1]) > KEY_MAX_LENGTH:
                return _reply(_BAD_FORMAT, noreply)
            delta = strtoull(tokens[2])
            if delta is None:
                return _reply(_BAD_DELTA, noreply)
            return Arith(tokens[1], name == b"incr", delta, noreply)
        if name == b"delete":
            return self._delete(tokens)
        if name == b"touch":
            if n not in (3, 4):
                return ERROR
            noreply = tokens[-1] == b"noreply"
            if len(tokens[1]) > KEY_MAX_LENGTH:
                return _reply(_BAD_FORMAT, noreply)
            exptime = strtol32(tokens[2])
            if exptime is None:
                return _reply(_BAD_EXPTIME, noreply)
            return Touch(tokens[1], exptime, noreply)
        if name in (b"gat", b"gats"):
            if n < 2:
                return ERROR
            exptime = strtol32(tokens[1])
            if exptime is None:
                return Reply(_BAD_EXPTIME)
            keys = tokens[2:]
            if any(len(k) > KEY_MAX_LENGTH for k in keys):
                return Reply(_BAD_FORMAT)
            return Retrieve(keys, name == b"gats", exptime)
        if name == b"flush_all":
            if n > 3:
                return ERROR
            noreply = tokens[-1] == b"noreply"
            delay = 0
            if n != (2 if noreply else 1):
                parsed = strtol32(tokens[1])
                if parsed is None:
                    return _reply(_BAD_EXPTIME, noreply)
                delay = parsed
            return FlushAll(delay, noreply)
        if name == b"version":
            return self._version
        if name == b"quit":
            return self._close()
        if name == b"stats":
            return Stats(tokens[1:])
        if name == b"verbosity":
            if n not in (2, 3):
                return ERROR
            noreply = tokens[-1] == b"noreply"
            if strtoul32(tokens[1]) is None:
                return _reply(_BAD_FORMAT, noreply)
            return _reply(b"OK\r\n", noreply)
        if name == b"mn":  # meta no-op: clients use it to mark the end of a pipeline
            return Reply(b"MN\r\n")
        if name == b"shutdown":
            return Reply(b"ERROR: shutdown not enabled\r\n")
        return ERROR

    def _storage(self, command: str, tokens: list[bytes], count_ok: bool) -> Command | None:
        if not count_ok:
            return ERROR
        noreply = tokens[-1] == b"noreply"
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            return _reply(_BAD_FORMAT, noreply)
        flags = strtoul32(tokens[2])
        exptime = strtol32(tokens[3])
        length = strtol32(tokens[4])
        if flags is None or exptime is None or length is None:
            return _reply(_BAD_FORMAT, noreply)
        cas_unique = 0
        if command == "cas":
            parsed = strtoull(tokens[5])
            if parsed is None:
                return _reply(_BAD_FORMAT, noreply)
            cas_unique = parsed
        if length < 0 or length > 0x7FFFFFFF - 2:
            return _reply(_BAD_FORMAT, noreply)
        if item_size(len(key), flags, length) > self._max_item_size:
            self._discard(length + 2)
            return Storage(command, key, flags, exptime, None, cas_unique, noreply)
        self._pending = (command, key, flags, exptime, cas_unique, noreply)
        self._need = length + 2
        return None

    def _discard(self, count: int) -> None:
        available = len(self._buf) - self._pos
        taken = min(count, available)
        self._advance(self._pos + taken)
        self._skip = count - taken

    def _delete(self, tokens: list[bytes]) -> Command:
        n = len(tokens)
        if n < 2 or n > 4:
            return ERROR
        noreply = False
        if n > 2:
            hold_is_zero = tokens[2] == b"0"
            noreply = tokens[-1] == b"noreply"
            valid = (n == 3 and (hold_is_zero or noreply)) or (n == 4 and hold_is_zero and noreply)
            if not valid:
                return _reply(_BAD_DELETE, noreply)
        if len(tokens[1]) > KEY_MAX_LENGTH:
            return _reply(_BAD_FORMAT, noreply)
        return Delete(tokens[1], noreply)


# --- running commands -------------------------------------------------------

NON_NUMERIC: Final = -1
"""What ``Backend.arith`` returns when the stored value is not a decimal number."""
NO_MEMORY: Final = -2
"""What ``Backend.arith`` returns when a grown number does not fit in memory."""


class Backend(Protocol):
    """The store a ``Conversation`` runs commands against; it keeps the statistics too."""

    @property
    def max_item_size(self) -> int:
        """The largest item (``item_size``) it takes."""
        ...

    def fetch(self, key: bytes, touch: int | None) -> tuple[bytes, int, int] | None:
        """``(data, flags, cas)`` of a live item, or None; ``touch`` sets a new exptime."""
        ...

    def store(self, command: Storage) -> bytes:
        """Run a storage command (``data`` is set); the answer word (STORED, NOT_STORED,
        EXISTS, NOT_FOUND) or an error line (SERVER_ERROR ...), without CRLF."""
        ...

    def reject_too_large(self, command: str, key: bytes) -> None:
        """Account a storage command refused as too large (``set`` drops the old item)."""
        ...

    def bad_chunk(self) -> None:
        """Account a storage command whose data block was malformed."""
        ...

    def delete(self, key: bytes) -> bool:
        """Remove an item; whether it was there."""
        ...

    def arith(self, key: bytes, incr: bool, delta: int) -> int | None:
        """incr/decr: the new value, None if no item, NON_NUMERIC if not a number,
        NO_MEMORY if the longer result does not fit."""
        ...

    def touch(self, key: bytes, exptime: int) -> bool:
        """Set a new exptime; whether the item was there."""
        ...

    def flush_all(self, delay: int) -> None:
        """Invalidate every item now, or when ``delay`` (an exptime) is reached."""
        ...

    def stats(self) -> list[tuple[str, str]]:
        """General statistics, in the order to send them."""
        ...

    def settings(self) -> list[tuple[str, str]]:
        """``stats settings``."""
        ...

    def reset_stats(self) -> None:
        """``stats reset``: zero the counters."""
        ...


_EMPTY_STATS: Final = frozenset({b"items", b"slabs", b"sizes", b"conns"})


class Conversation:
    """What one client connection says and is answered: bytes in, answer bytes (and whether
    to close) out."""

    def __init__(self, backend: Backend, parser: RequestParser | None = None) -> None:
        self.backend = backend
        self.parser = parser or RequestParser(max_item_size=backend.max_item_size)

    def receive(self, data: bytes) -> tuple[bytes, bool]:
        """Feed bytes; the answers to every command they complete, and whether to close."""
        parser = self.parser
        parser.feed(data)
        out: list[bytes] = []
        while True:
            command = parser.next_command()
            if command is None:
                return b"".join(out), False
            if isinstance(command, Close):
                return b"".join(out), True
            answer = self.execute(command)
            if answer:
                out.append(answer)

    def execute(self, command: Command) -> bytes:
        """The answer to one command (empty when noreply)."""
        backend = self.backend
        if isinstance(command, Retrieve):
            parts: list[bytes] = []
            for key in command.keys:
                found = backend.fetch(key, command.touch)
                if found is not None:
                    data, flags, cas = found
                    if command.cas:
                        parts.append(b"VALUE %b %d %d %d\r\n" % (key, flags, len(data), cas))
                    else:
                        parts.append(b"VALUE %b %d %d\r\n" % (key, flags, len(data)))
                    parts.append(data)
                    parts.append(b"\r\n")
            parts.append(b"END\r\n")
            return b"".join(parts)
        if isinstance(command, Storage):
            if command.data is None:
                backend.reject_too_large(command.command, command.key)
                answer = b"SERVER_ERROR object too large for cache"
            else:
                answer = backend.store(command)
            return b"" if command.noreply else answer + b"\r\n"
        if isinstance(command, Reply):
            return command.data
        if isinstance(command, Delete):
            deleted = backend.delete(command.key)
            return _quiet(b"DELETED\r\n" if deleted else b"NOT_FOUND\r\n", command.noreply)
        if isinstance(command, Arith):
            value = backend.arith(command.key, command.incr, command.delta)
            if value is None:
                answer = b"NOT_FOUND\r\n"
            elif value == NON_NUMERIC:
                answer = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
            elif value == NO_MEMORY:
                answer = b"SERVER_ERROR out of memory\r\n"
            else:
                answer = b"%d\r\n" % value
            return _quiet(answer, command.noreply)
        if isinstance(command, Touch):
            touched = backend.touch(command.key, command.exptime)
            return _quiet(b"TOUCHED\r\n" if touched else b"NOT_FOUND\r\n", command.noreply)
        if isinstance(command, BadChunk):
            backend.bad_chunk()
            return _quiet(b"CLIENT_ERROR bad data chunk\r\n", command.noreply)
        if isinstance(command, FlushAll):
            backend.flush_all(command.delay)
            return _quiet(b"OK\r\n", command.noreply)
        if isinstance(command, Stats):
            return self._stats(command.args)
        raise AssertionError(f"unhandled command {command!r}")

    def _stats(self, args: list[bytes]) -> bytes:
        if not args:
            lines = self.backend.stats()
        elif args[0] == b"reset":
            self.backend.reset_stats()
            return b"RESET\r\n"
        elif args[0] == b"settings":
            lines = self.backend.settings()
        elif args[0] in _EMPTY_STATS:
            lines = []
        else:
            return b"ERROR\r\n"
        body = "".join(f"STAT {name} {value}\r\n" for name, value in lines)
        return body.encode() + b"END\r\n"


def _quiet(answer: bytes, noreply: bool) -> bytes:
    return b"" if noreply else answer
