"""The state of one request being served, shared by the callback and the task paths.

An ``Exchange`` lives from the parsed request head to the access log line;
whichever path serves the request fills it in. A ``Resume`` is what the
callback path hands to a task when it cannot finish a forwarded request by
itself: the backend slot it holds and, if the request already went out, the
connection and when.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from tiers.proxy.http1 import Framing
from tiers.proxy.requestparser import RequestHead

if TYPE_CHECKING:
    from tiers.proxy.cache import CacheRequest, Fill
    from tiers.proxy.errors import ClientGone
    from tiers.proxy.upstream import Backend
    from tiers.proxy.upstreamconn import UpstreamConnection

CLIENT_CLOSED: Final = 499  # nginx's code for "client closed the connection first"

_NONE: Final = Framing.NONE
_CHUNKED: Final = Framing.CHUNKED


class Exchange:
    """One request being served, and what the access log needs of it.

    The fields start as the class attributes below; a request sets only
    those that concern it (most have no body, no retry, no cache fill), which
    costs less than setting every field of every request.
    """

    status = 0
    size = 0  # response body bytes sent
    apptime: float | None = None
    upstream: bytes | None = None
    # The body bytes sent so far, as framed for the backend; None once too
    # large to keep, which rules out sending the request again. A request
    # without a body keeps the empty default; one with a body gets its own.
    replay: bytes | bytearray | None = b""
    pump: asyncio.Task[None] | None = None
    body_error: ClientGone | None = None
    responded = False
    continue_sent = True  # or not needed
    body_size = 0  # request body bytes received
    route: bytes | None = None
    request_id: bytes | None = None
    cache: bytes | None = None  # X-Cache label for the access log
    cut = False  # the backend failed after the response started
    upstream_status = 0  # what the backend answered (stale may be served instead)
    # Set when the page cache sends this request to the app on its behalf.
    fill: Fill | None = None
    cache_req: CacheRequest | None = None

    def __init__(self, head: RequestHead, start: float) -> None:
        self.head = head
        self.start = start
        framing = head.framing
        self.body_done = framing is _NONE
        self.chunked = framing is _CHUNKED
        if framing is not _NONE:
            self.replay = bytearray()
        if head.expect_continue:
            self.continue_sent = False


class Resume:
    """A forwarded request the callback path started and a task carries on.

    ``backend``'s slot is held (the task frees it). ``conn`` is None when
    the request has not gone out: the task connects first. Otherwise the
    request was written on ``conn`` at ``sent_at`` and the response, as far
    as it came, waits in ``conn``'s queue; ``expired`` says the backend was
    already silent for the whole read timeout.
    """

    __slots__ = ("backend", "conn", "expired", "sent_at")

    def __init__(
        self,
        backend: Backend,
        conn: UpstreamConnection | None = None,
        sent_at: float = 0.0,
        *,
        expired: bool = False,
    ) -> None:
        self.backend = backend
        self.conn = conn
        self.sent_at = sent_at
        self.expired = expired
