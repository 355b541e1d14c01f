"""Static files: map a request path into a route's root and decide the answer.

Three steps, kept apart so each is tested on its own (the third lives in
``tiers.proxy.filesender``):

- ``StaticRoot.from_route`` compiles a STATIC route once: the root resolved
  with realpath, the path prefix to strip as bytes.
- ``plan_static`` decides the whole answer to one request: status, header
  fields, and which bytes of which file form the body. It touches the file
  system (realpath, open, fstat) but never a socket or a clock (``now`` is
  passed in). It opens the file it will serve and takes every fact from the
  open descriptor, so what was checked is what is sent.
  ``plan_static_file`` does the same for a name the router has already
  taken out of the path (``CompiledRoute.static_path``).
- ``tiers.proxy.filesender.send_static`` writes the head, then the body:
  small bodies in the same write, larger ones with ``loop.sendfile``, or
  with positional reads and writes where the loop has no sendfile.

How a path is mapped, and why each refusal exists:

- The query is ignored; the route's ``path_prefix`` is cut off first when
  the route says ``strip_prefix``.
- The rest is percent-decoded exactly once, strictly: a ``%`` without two
  hex digits is 400. Decoding once means ``%252e`` names a file called
  ``%2e``, never a dot.
- 403 before the file system is touched: an encoded slash, backslash or NUL
  (``%2f``, ``%5c``, ``%00``), whose only use here is to smuggle a separator
  past the checks; a literal backslash or NUL; and any ``.`` or ``..``
  segment, however it was written (clients remove dot segments themselves,
  so only crafted requests carry them).
- The path is resolved with realpath; a result outside the root (a symlink
  pointing out) is 403, while symlinks that stay inside are followed.
- The resolved path is opened with O_NOFOLLOW and O_NONBLOCK (a FIFO in the
  root would otherwise block the event loop), and the path the kernel
  reports for the open descriptor (/proc/self/fd) must equal the resolved
  one. A component swapped for a symlink between the check and the open is
  thus refused, not followed. Where /proc is missing, the descriptor's
  device and inode are compared with a fresh stat of the resolved path,
  which narrows the window without closing it.
- A directory requested without a trailing slash is redirected (301) to the
  same path with one, so relative links in its index resolve; with the
  slash, its ``index.html`` is served if it is a regular file, else 403
  (there are no listings). Anything that is neither a regular file nor a
  directory (FIFO, socket, device) is 403.

Answers carry Content-Type by the extension of the file served (so a
symlink gets its target's type; a fixed table, so the result does not
depend on the machine's /etc/mime.types), Content-Length,
Last-Modified, an ETag made of inode, size and mtime in nanoseconds, and
Accept-Ranges. Preconditions are evaluated in the order RFC 9110 (13.2.2)
gives: If-Match, If-Unmodified-Since (412), If-None-Match, If-Modified-Since
(304), then Range with If-Range. One byte range is served as 206; a request
for several ranges gets the whole file as 200, which RFC 9110 allows.

The file-system calls (realpath, open, fstat) run on the event loop's
thread: on a local disk, mostly from the page cache, they take
microseconds, less than a hop to a thread would. A root on a slow or
network file system would stall the loop.
"""

from __future__ import annotations

import errno
import io
import mimetypes
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote_to_bytes

from tiers.config.proxy import Route, RouteKind
from tiers.errors import ConfigError
from tiers.proxy.httpdate import DateField, http_date, parse_http_date

# ---- the compiled root ------------------------------------------------------------

_PROC_FD = b"/proc/self/fd/"


class StaticRoot:
    """A STATIC route compiled once: where its files are and what to cut off the path.

    ``directory`` is the resolved root (bytes, no trailing separator unless
    it is ``/``); ``inside`` is the prefix every served path must start
    with. The root is resolved once, so a root that is itself a symlink
    (``current -> releases/42``) is followed only when the route is compiled
    again.
    """

    __slots__ = ("directory", "index", "inside", "name", "proc_fd", "strip")

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        strip: str = "",
        index: str = "index.html",
        name: str = "static",
    ) -> None:
        """Resolve ``directory``; raise ``ConfigError`` if it is not a directory.

        ``strip`` is the raw path prefix cut off every request path before
        the lookup (empty: none); ``index`` the file served for a directory.
        """
        if not index or "/" in index or index in (".", ".."):
            raise ConfigError(f"route {name}", "index", f"not a plain file name: {index!r}")
        real = os.path.realpath(os.fsencode(directory))
        if not os.path.isdir(real):
            raise ConfigError(f"route {name}", "root", f"{os.fsdecode(real)} is not a directory")
        self.name = name
        self.directory = real
        self.inside = real if real.endswith(b"/") else real + b"/"
        self.strip = strip.encode()
        self.index = index.encode()
        self.proc_fd = os.path.isdir(_PROC_FD)

    @classmethod
    def from_route(cls, route: Route) -> StaticRoot:
        """Compile a STATIC route; raise ``ConfigError`` for any other kind or a bad root."""
        if route.kind is not RouteKind.STATIC:
            raise ConfigError(f"route {route.name}", "kind", "not a static route")
        if route.root is None:
            raise ConfigError(f"route {route.name}", "root", "a static route needs a root")
        prefix = route.match.path_prefix
        strip = prefix if route.strip_prefix and prefix else ""
        return cls(Path(route.root), strip=strip, name=route.name)


# ---- content types ----------------------------------------------------------------

# Common web types, over Python's own built-in table (never the machine's
# /etc/mime.types), so a file gets the same type on every host.
_WEB_TYPES = {
    ".html": "text/html",
    ".htm": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".txt": "text/plain",
    ".csv": "text/csv",
    ".md": "text/markdown",
    ".xml": "application/xml",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".pdf": "application/pdf",
    ".zip": "application/zip",
    ".gz": "application/gzip",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
}
_DEFAULT_TYPE = "application/octet-stream"


def _content_type_fields() -> dict[bytes, bytes]:
    table = dict(mimetypes.MimeTypes().types_map[True])
    table.update(_WEB_TYPES)
    fields = {}
    for ext, ctype in table.items():
        value = ctype + "; charset=utf-8" if ctype.startswith("text/") else ctype
        fields[ext.lower().encode()] = b"Content-Type: %s\r\n" % value.encode()
    return fields


_TYPE_FIELDS = _content_type_fields()
_DEFAULT_TYPE_FIELD = b"Content-Type: %s\r\n" % _DEFAULT_TYPE.encode()


def content_type(path: bytes) -> bytes:
    """The Content-Type value for a file name, by its extension (case-insensitive)."""
    return _type_field(path)[len(b"Content-Type: ") : -2]


def _type_field(path: bytes) -> bytes:
    dot = path.rfind(b".")
    if dot <= path.rfind(b"/") + 1:  # no extension, or a dot file such as ".profile"
        return _DEFAULT_TYPE_FIELD
    return _TYPE_FIELDS.get(path[dot:].lower(), _DEFAULT_TYPE_FIELD)


# ---- the plan ---------------------------------------------------------------------

_date_field = DateField()

_STATUS_LINES = {
    200: b"HTTP/1.1 200 OK\r\n",
    206: b"HTTP/1.1 206 Partial Content\r\n",
    301: b"HTTP/1.1 301 Moved Permanently\r\n",
    304: b"HTTP/1.1 304 Not Modified\r\n",
    400: b"HTTP/1.1 400 Bad Request\r\n",
    403: b"HTTP/1.1 403 Forbidden\r\n",
    404: b"HTTP/1.1 404 Not Found\r\n",
    405: b"HTTP/1.1 405 Method Not Allowed\r\n",
    412: b"HTTP/1.1 412 Precondition Failed\r\n",
    416: b"HTTP/1.1 416 Range Not Satisfiable\r\n",
    500: b"HTTP/1.1 500 Internal Server Error\r\n",
}
_CLOSE_END = b"Connection: close\r\n\r\n"
_KEEP_ALIVE_END = b"Connection: keep-alive\r\n\r\n"


class StaticPlan:
    """The decided answer to one request for a static file.

    ``fields`` are the header lines after the status line, each ending in
    CRLF, without Connection (the server decides that) and without the
    blank line. The body is ``body`` (a small in-memory body, for refusals)
    or ``count`` bytes of ``file`` from ``offset``; never both. ``file`` is
    set only when a body must be read from it, and then the plan owns an
    open descriptor: pass the plan to ``send_static`` or call ``close``.
    """

    __slots__ = ("body", "count", "fields", "file", "offset", "status")

    def __init__(
        self,
        status: int,
        fields: bytes,
        body: bytes = b"",
        *,
        file: io.FileIO | None = None,
        offset: int = 0,
        count: int = 0,
    ) -> None:
        self.status = status
        self.fields = fields
        self.body = body
        self.file = file
        self.offset = offset
        self.count = count

    @property
    def size(self) -> int:
        """Bytes of body this plan sends (for the access log); 0 for HEAD and 304."""
        return len(self.body) + self.count

    def head(self, keep_alive: bool, version: bytes = b"1.1") -> bytes:
        """The complete response head: status line, fields, Connection, blank line.

        ``keep_alive`` is the server's decision; an HTTP/1.0 client is told
        explicitly that the connection stays open.
        """
        if not keep_alive:
            end = _CLOSE_END
        elif version == b"1.0":
            end = _KEEP_ALIVE_END
        else:
            end = b"\r\n"
        return _STATUS_LINES[self.status] + self.fields + end

    def close(self) -> None:
        """Close the file, if the plan holds one; safe to call more than once."""
        file = self.file
        if file is not None:
            self.file = None
            file.close()


_REFUSAL_BODIES = {
    400: b"bad request path\n",
    403: b"forbidden\n",
    404: b"not found\n",
    405: b"method not allowed\n",
    412: b"precondition failed\n",
    416: b"range not satisfiable\n",
    500: b"cannot read the file\n",
}
_REFUSAL_FIELDS = {
    status: b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s"
    % (len(body), b"Allow: GET, HEAD\r\n" if status == 405 else b"")
    for status, body in _REFUSAL_BODIES.items()
}


def _refusal(status: int, now: float, head_only: bool, extra: bytes = b"") -> StaticPlan:
    return StaticPlan(
        status,
        _date_field.at(now) + _REFUSAL_FIELDS[status] + extra,
        b"" if head_only else _REFUSAL_BODIES[status],
    )


# ---- mapping a request path to a file -----------------------------------------------

_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_SEPARATOR_ESCAPE = re.compile(rb"%(?:2[Ff]|5[Cc]|00)")
_DOT_SEGMENT = re.compile(rb"(?:^|/)\.\.?(?:/|$)")


def resolve_target(root: StaticRoot, path: bytes) -> bytes | int:
    """The file-system path a request path names under ``root``, or the status refusing it.

    ``path`` is the origin-form target as sent (query allowed). Returns a
    path that still has to be resolved (symlinks) and checked again, or
    400 (bad percent-encoding), 403 (an attempt to climb out, or an encoded
    separator or NUL) or 404 (the path lacks the prefix to strip).
    """
    query = path.find(b"?")
    if query != -1:
        path = path[:query]
    strip = root.strip
    if strip:
        if not path.startswith(strip):
            return 404
        path = path[len(strip) :]
    if b"%" in path:
        if _BAD_ESCAPE.search(path) is not None:
            return 400
        if _SEPARATOR_ESCAPE.search(path) is not None:
            return 403
        path = unquote_to_bytes(path)
    if b"\\" in path or b"\x00" in path or _DOT_SEGMENT.search(path) is not None:
        return 403
    return root.directory + b"/" + path


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP})


def _open_inside(root: StaticRoot, path: bytes) -> tuple[int, os.stat_result, bytes] | int:
    """Open ``path`` if it resolves inside the root: (fd, fstat, resolved path) or a status."""
    real = os.path.realpath(path)
    if real != root.directory and not real.startswith(root.inside):
        return 403
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in _MISSING:
            return 404
        return 403 if exc.errno in _DENIED else 500
    try:
        st = os.fstat(fd)
        if root.proc_fd:
            same = os.readlink(b"%s%d" % (_PROC_FD, fd)) == real
        else:
            again = os.stat(real, follow_symlinks=False)
            same = (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino)
    except OSError:
        same = False
    if not same:
        os.close(fd)
        return 403
    return fd, st, real


# ---- preconditions and ranges -------------------------------------------------------

# Digits are capped so that int() stays cheap; a longer number is treated as malformed.
_RANGE = re.compile(rb"[ \t]*bytes=([0-9]{0,18})-([0-9]{0,18})[ \t]*", re.IGNORECASE)


def parse_range(value: bytes, size: int) -> range | None:
    """The bytes a Range header asks of a ``size``-byte file.

    None: answer the whole file (the header is malformed, uses another unit,
    or asks for several ranges). An empty range: nothing asked for exists
    (416). Otherwise the offsets to send; an end beyond the file is clipped.
    """
    match = _RANGE.fullmatch(value)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        if last:
            end = int(last)
            if end < start:
                return None  # invalid, so the whole header is ignored
            stop = min(end + 1, size)
        else:
            stop = size
        return range(start, stop) if start < size else range(0)
    if not last:
        return None
    suffix = int(last)
    if suffix == 0 or size == 0:
        return range(0)
    return range(max(size - suffix, 0), size)


def _tag_listed(value: bytes, etag: bytes, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match list holds ``etag`` (or is ``*``)."""
    if value == etag:
        return True
    if value.strip(b" \t") == b"*":
        return True
    for raw in value.split(b","):
        item = raw.strip(b" \t")
        if item == etag or (weak and item[2:] == etag and item.startswith(b"W/")):
            return True
    return False


# Lengths of the request header names plan_static reads, to skip lower() on the rest.
_CONDITIONAL_LENGTHS = frozenset({5, 8, 13, 17, 19})


def plan_static(
    root: StaticRoot,
    method: bytes,
    path: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    now: float,
) -> StaticPlan:
    """Decide the answer to ``method path`` for the files under ``root``.

    ``path`` is the origin-form request target as sent (``RequestHead.path``);
    the root's prefix is stripped from it and it is decoded here (see
    ``resolve_target``). ``headers`` are the request's header fields as
    sent, ``now`` the current time in seconds since the epoch (for Date, and
    so Last-Modified is never in the future). Methods other than GET and
    HEAD get 405 with Allow. Never raises for anything a request can
    contain: every outcome is a plan (400, 403, 404, 301, 200, 206, 304,
    412, 416; 500 when the file system fails in an unexpected way). A plan
    whose ``file`` is set holds an open descriptor until it is sent or
    closed.
    """
    head_only = _HEAD_ONLY.get(method)
    if head_only is None:
        return _refusal(405, now, False)
    target = resolve_target(root, path)
    if isinstance(target, int):
        return _refusal(target, now, head_only)
    query = path.find(b"?")
    slash = (path if query == -1 else path[:query]).endswith(b"/")
    return _plan_path(root, head_only, target, slash=slash, path=path, headers=headers, now=now)


def plan_static_file(
    root: StaticRoot,
    method: bytes,
    relative: str,
    headers: Sequence[tuple[bytes, bytes]],
    now: float,
    *,
    path: bytes,
) -> StaticPlan:
    """Like ``plan_static``, for a file name the router already took from the path.

    ``relative`` is what ``CompiledRoute.static_path`` returns: the prefix
    removed, percent-decoded, no leading slash, a trailing one kept, ``""``
    for the root itself. It is not decoded again (``%2541`` stays ``%41``),
    but it is checked again: a NUL, a backslash or a dot segment is 403.
    The root's own ``strip`` is not used. ``path`` is the request target as
    sent, used only for the Location of a directory's redirect.
    """
    head_only = _HEAD_ONLY.get(method)
    if head_only is None:
        return _refusal(405, now, False)
    name = os.fsencode(relative)
    if b"\\" in name or b"\x00" in name or _DOT_SEGMENT.search(name) is not None:
        return _refusal(403, now, head_only)
    if name:
        slash = name.endswith(b"/")
    else:
        # The router gives "" for both "/prefix" and "/prefix/".
        query = path.find(b"?")
        slash = (path if query == -1 else path[:query]).endswith(b"/")
    return _plan_path(
        root, head_only, root.inside + name, slash=slash, path=path, headers=headers, now=now
    )


_HEAD_ONLY = {b"GET": False, b"HEAD": True}


def _plan_path(
    root: StaticRoot,
    head_only: bool,
    target: bytes,
    *,
    slash: bool,
    path: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    now: float,
) -> StaticPlan:
    """Open what ``target`` names (``slash``: a directory was asked for) and plan the answer."""
    opened = _open_inside(root, target)
    if isinstance(opened, int):
        return _refusal(opened, now, head_only)
    fd, st, real = opened
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        if not slash:
            return _redirect_to_directory(path, now, head_only)
        opened = _open_inside(root, real + b"/" + root.index)
        if isinstance(opened, int):
            # No index: a directory is never listed.
            return _refusal(403 if opened == 404 else opened, now, head_only)
        fd, st, real = opened
    elif slash:
        # realpath drops the slash, but "file/" names no file (ENOTDIR).
        os.close(fd)
        return _refusal(404, now, head_only)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return _refusal(403, now, head_only)
    try:
        plan = _plan_file(st, real, head_only, headers, now)
    except BaseException:
        os.close(fd)
        raise
    if plan.count:
        file = io.FileIO(fd, "rb", closefd=True)
        file.name = real  # for messages; it would otherwise be the descriptor's number
        plan.file = file
    else:
        os.close(fd)
    return plan


def _redirect_to_directory(path: bytes, now: float, head_only: bool) -> StaticPlan:
    """301 to ``path`` with a slash, so relative links in the directory's index resolve."""
    if b"\r" in path or b"\n" in path:
        return _refusal(400, now, head_only)  # the codec never lets these through
    query = path.find(b"?")
    bare = path if query == -1 else path[:query]
    # Leading slashes collapse so the target cannot become "//host/".
    location = b"/" + bare.lstrip(b"/") + b"/" + (path[query:] if query != -1 else b"")
    return StaticPlan(
        301,
        _date_field.at(now) + b"Location: " + location + b"\r\nContent-Length: 0\r\n",
    )


def _plan_file(
    st: os.stat_result,
    real: bytes,
    head_only: bool,
    headers: Sequence[tuple[bytes, bytes]],
    now: float,
) -> StaticPlan:
    size = st.st_size
    etag = b'"%x-%x-%x"' % (st.st_ino, size, st.st_mtime_ns)
    modified = min(int(st.st_mtime), int(now))
    last_modified = http_date(modified)
    validators = b"Last-Modified: " + last_modified + b"\r\nETag: " + etag + b"\r\n"

    if_match = if_unmodified = if_none_match = if_modified = range_value = if_range = None
    for name, value in headers:
        if len(name) not in _CONDITIONAL_LENGTHS:
            continue
        lname = name.lower()
        # A list field repeated is one list; a single-valued one repeated is invalid (b"").
        if lname == b"if-none-match":
            if_none_match = value if if_none_match is None else if_none_match + b"," + value
        elif lname == b"if-modified-since":
            if_modified = value if if_modified is None else b""
        elif lname == b"range":
            range_value = value if range_value is None else b""
        elif lname == b"if-range":
            if_range = value if if_range is None else b""
        elif lname == b"if-match":
            if_match = value if if_match is None else if_match + b"," + value
        elif lname == b"if-unmodified-since":
            if_unmodified = value if if_unmodified is None else b""

    if if_match is not None:
        if not _tag_listed(if_match, etag, weak=False):
            return _refusal(412, now, head_only)
    elif if_unmodified is not None:
        limit = parse_http_date(if_unmodified)
        if limit is not None and modified > limit:
            return _refusal(412, now, head_only)
    if if_none_match is not None:
        if _tag_listed(if_none_match, etag, weak=True):
            return StaticPlan(304, _date_field.at(now) + validators)
    elif if_modified is not None and (
        if_modified == last_modified
        or ((since := parse_http_date(if_modified)) is not None and modified <= since)
    ):
        return StaticPlan(304, _date_field.at(now) + validators)

    fields = _date_field.at(now) + _type_field(real) + validators + b"Accept-Ranges: bytes\r\n"
    # Range is defined for GET only: HEAD describes the whole representation.
    if range_value is not None and not head_only:
        wanted = parse_range(range_value, size)
        if wanted is not None and if_range is not None:
            validator = if_range.strip(b" \t")
            # An entity tag must match strongly (a weak one never does), a date exactly.
            if validator != (etag if validator.startswith((b'"', b"W/")) else last_modified):
                wanted = None
        if wanted is not None:
            if not wanted:
                return _refusal(416, now, False, b"Content-Range: bytes */%d\r\n" % size)
            count = len(wanted)
            return StaticPlan(
                206,
                fields
                + b"Content-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n"
                % (wanted.start, wanted.stop - 1, size, count),
                offset=wanted.start,
                count=count,
            )
    return StaticPlan(
        200,
        fields + b"Content-Length: %d\r\n" % size,
        count=0 if head_only else size,
    )
