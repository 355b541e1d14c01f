"""Errors of the proxy, below ``tiers.errors.ProxyError``.

    ProxyError                    (tiers.errors)
     +-- UpstreamError            talking to one backend failed
     |    +-- ConnectFailed       no TCP connection: the request never reached the backend
     |    +-- UpstreamClosed      the connection closed or reset before the response ended
     |    +-- UpstreamTimeout     the backend sent nothing for longer than the read timeout
     |    +-- UpstreamProtocolError  the backend's response is not valid HTTP/1.1
     +-- ClientGone               the client closed, timed out or broke its request body
     +-- StaticFileError          a static file could not be read while it was being sent

A malformed *request* is not an exception: the request codec reports it as an
event carrying the status to answer, because it is an expected input.
"""

from __future__ import annotations

from tiers.errors import ProxyError


class UpstreamError(ProxyError):
    """One exchange with a backend failed."""


class ConnectFailed(UpstreamError):
    """The TCP connection to a backend could not be made (refused, unreachable, timed out)."""


class UpstreamClosed(UpstreamError):
    """The backend closed or reset the connection before the response was complete."""


class UpstreamTimeout(UpstreamError):
    """The backend sent no byte for longer than the read timeout."""


class UpstreamProtocolError(UpstreamError):
    """The backend's response cannot be parsed or framed."""


class ClientGone(ProxyError):
    """The client disconnected, stalled or sent a malformed body while a request was in flight."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        # The status to answer if nothing was sent yet (the client may still be listening).
        self.status = status


class StaticFileError(ProxyError):
    """A file could not be read while its response was being sent.

    Raised by ``tiers.proxy.filesender.send_static`` after the head went out
    (the file shrank or a read failed), so the only honest signal left is to
    close the connection.
    """
