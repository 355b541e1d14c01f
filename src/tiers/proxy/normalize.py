"""Request hosts and paths in the normal form that route matches compare.

``normalize_host`` drops the port, the case and a final dot, and writes an
IPv6 literal in its compressed form, so ``Example.COM.:8080`` is
``example.com`` and ``[0::1]`` is ``::1``. ``normalize_path`` applies RFC
3986's syntax-based normalisation (6.2.2): percent-encoded unreserved
characters decoded, other escapes upper-cased, ``.`` and ``..`` segments
resolved, repeated slashes merged, so ``/%61dmin`` and ``//admin/.`` are
``/admin``. ``normalize_target`` does the same for a request target with a
query. All three are pure and never raise. They run on every routed
request, so the path functions return the usual clean input as it is,
without copying.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = ["normalize_host", "normalize_path", "normalize_target"]


def normalize_host(host: bytes | None) -> bytes | None:
    """``host`` (a Host header value) as routes compare it: no port, lower case, no final dot.

    An IPv6 literal loses its brackets and is written in its compressed form.
    Returns None for None or an empty host.
    """
    if not host:
        return None
    if host[0] == 0x5B:  # "["
        end = host.find(b"]")
        literal = host[1:end] if end != -1 else host[1:]
        try:
            return ipaddress.IPv6Address(literal.decode("ascii")).compressed.encode()
        except (ValueError, UnicodeDecodeError):
            return literal.lower() or None
    colon = host.find(b":")
    if colon != -1:
        host = host[:colon]
    host = host.lower()
    if host[-1:] == b".":
        host = host[:-1]
    return host or None


_ESCAPE_RE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")
# One scan says whether a path needs normalising at all (most do not).
_NOT_NORMAL: Final = re.compile(rb"%|/\.|//")
_NOT_NORMAL_OR_QUERY: Final = re.compile(rb"%|/\.|//|\?")
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Every escape by its upper-case hex: the character if unreserved, else the escape upper-cased.
_ESCAPES: Final = {
    b"%02X" % c: (bytes([c]) if c in _UNRESERVED else b"%%%02X" % c) for c in range(256)}


def _unescape(match: re.Match[bytes]) -> bytes:
    return _ESCAPES[match.group(1).upper()]


def normalize_path(path: bytes) -> bytes:
    """``path`` (without query) in the normal form routes compare (RFC 3986, 6.2.2).

    Percent-encoded unreserved characters are decoded and other escapes
    upper-cased, ``.`` and ``..`` segments are resolved (``..`` never climbs
    above the root) and repeated slashes merged. A path that does not start
    with ``/`` (``*``) is returned as it is. Most paths need none of this and
    are returned unchanged without copying.
    """
    if _NOT_NORMAL.search(path) is None or path[:1] != b"/":
        return path
    return _normalize(path)


def _normalize(path: bytes) -> bytes:
    if b"%" in path:
        path = _ESCAPE_RE.sub(_unescape, path)
    segments = path.split(b"/")
    out: list[bytes] = []
    for segment in segments[1:]:
        if not segment or segment == b".":
            continue
        if segment == b"..":
            if out:
                out.pop()
            continue
        out.append(segment)
    if not out:
        return b"/"
    last = segments[-1]
    trailing = b"/" if last in (b"", b".", b"..") else b""
    return b"/" + b"/".join(out) + trailing


def _path_of(target: bytes) -> bytes:
    query = target.find(b"?")
    return target if query == -1 else target[:query]


def normalize_target(target: bytes) -> bytes:
    """The path of the origin-form ``target`` (query dropped), normalised.

    The same as ``normalize_path`` of the path alone, in one scan for the
    usual clean target.
    """
    found = _NOT_NORMAL_OR_QUERY.search(target)
    if found is None:
        return target
    start = found.start()
    if target[start] == 0x3F:  # "?" before anything to normalise
        return target[:start]
    return normalize_path(_path_of(target))
