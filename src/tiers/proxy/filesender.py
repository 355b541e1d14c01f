"""Sending a planned static answer: its head, then its file's bytes, to a client transport.

``send_static`` writes what ``tiers.proxy.static`` decided: small bodies in
the same write as the head, larger ones with ``loop.sendfile`` (zero-copy on
asyncio's own socket transports), or with positional reads and writes where
the loop has no sendfile (uvloop's loops do not implement it). Either way
the bytes are the plan's ``count`` from its ``offset``: a whole file or one
range.

The reads run on the event loop's thread: a static root is on a local disk,
mostly in the page cache, and a thread hop per chunk would cost more than
the read. A root on a slow or network file system would stall the loop.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Awaitable, Callable

from tiers.proxy.errors import ClientGone, StaticFileError
from tiers.proxy.exchange import CLIENT_CLOSED
from tiers.proxy.static import StaticPlan

__all__ = ["send_static"]

# A body up to this size is read and written together with the head: one
# write, and none of sendfile's set-up for a few kilobytes.
_INLINE_MAX = 64 * 1024
# Read size when the loop cannot sendfile; memory held is about this plus
# the transport's high-water mark.
_CHUNK = 256 * 1024


async def send_static(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.WriteTransport,
    plan: StaticPlan,
    drain: Callable[[], Awaitable[None]],
    *,
    keep_alive: bool,
    version: bytes = b"1.1",
) -> int:
    """Send ``plan`` on ``transport``: the head, then its body; return the body bytes sent.

    ``drain`` is the connection's write flow control: it returns at once
    unless the transport paused writing, then waits until it resumes, and
    raises ``ClientGone`` if the connection was lost meanwhile. It is awaited
    after the response is written and between pieces of a body sent without
    sendfile. ``keep_alive`` and ``version`` shape the Connection field (see
    ``StaticPlan.head``).

    The plan's file is closed on return, whatever happens. Raises
    ``ClientGone`` (status 499) when the client is gone before or during the
    body, and ``StaticFileError`` when the file cannot be read to the end
    (it shrank, or a read failed): both after the head may have been sent,
    so the caller must close the connection.
    """
    try:
        if transport.is_closing():
            raise ClientGone("client closed the connection", CLIENT_CLOSED)
        head = plan.head(keep_alive, version)
        file = plan.file
        if file is None:
            transport.write(head + plan.body if plan.body else head)
            await drain()
            return len(plan.body)
        offset = plan.offset
        count = plan.count
        if count <= _INLINE_MAX:
            transport.writelines((head, _read(file, offset, count)))
            await drain()
            return count
        transport.write(head)
        try:
            sent = await loop.sendfile(transport, file, offset, count)
        except NotImplementedError:
            # uvloop: its loops have no sendfile at all.
            sent = await _copy(transport, file, offset, count, drain)
        except ConnectionError as exc:
            raise ClientGone(f"client connection failed: {exc}", CLIENT_CLOSED) from exc
        except OSError as exc:
            raise StaticFileError(f"cannot send {_label(file)}: {exc}") from exc
        if sent != count:
            raise StaticFileError(f"{_label(file)} shrank while it was sent")
        return count
    finally:
        plan.close()


def _read(file: io.FileIO, offset: int, count: int) -> bytes:
    try:
        data = os.pread(file.fileno(), count, offset)
    except OSError as exc:
        raise StaticFileError(f"cannot read {_label(file)}: {exc}") from exc
    if len(data) != count:
        raise StaticFileError(f"{_label(file)} shrank while it was sent")
    return data


def _label(file: io.FileIO) -> str:
    name = file.name
    return os.fsdecode(name) if isinstance(name, (bytes, str)) else f"descriptor {name}"


async def _copy(
    transport: asyncio.WriteTransport,
    file: io.FileIO,
    offset: int,
    count: int,
    drain: Callable[[], Awaitable[None]],
) -> int:
    """Send ``count`` bytes of ``file`` from ``offset`` with reads and writes."""
    end = offset + count
    while offset < end:  # each pass advances by at least one byte or raises
        if transport.is_closing():
            raise ClientGone("client closed the connection", CLIENT_CLOSED)
        data = _read(file, offset, min(_CHUNK, end - offset))
        transport.write(data)
        offset += len(data)
        await drain()
    return count
