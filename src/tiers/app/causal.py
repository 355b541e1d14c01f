"""WSGI middleware that carries a client's causal token across requests, in a signed cookie.

Read-your-writes across requests: a POST commits on the primary, the
redirect's GET may land on any worker of any app server and read from any
replica. The middleware makes that GET see the write:

1. On each request it reads the cookie (``tiers_causal`` by default),
   checks its signature and opens a causal scope
   (:func:`tiers.db.tokens.causal_scope`) holding the token. Reads through
   :class:`tiers.db.router.Cluster` (and :mod:`tiers.db.sqla` sessions) that
   are given no token use the scope's: they go to a replica that has
   replayed it, or wait briefly, or read from the primary.
2. Every write committed during the request replaces the scope's token
   (the router calls :func:`tiers.db.tokens.note_write`). When the app
   starts its response after a write, the middleware adds a ``Set-Cookie``
   with the new token, signed.

The cookie's value is ``<token>.<signature>``: the token in PostgreSQL's
``X/Y`` LSN form and an unpadded base64url HMAC-SHA256 of it. A cookie that
is missing, malformed, unsigned, or signed with another key is ignored: the
request simply has no token (its reads may see a lagging replica), and it
is never an error. Trusting a forged token would let a client send its
reads to the primary and make each one wait first; the signature stops that.

The key, in this order: the ``secret_key`` argument; the environment
variable ``TIERS_SECRET_KEY`` (any string; use 32 random bytes or more, e.g.
``python -c 'import secrets; print(secrets.token_urlsafe(32))'``), the same
for every app server of a site (``tiers up`` makes one per state directory
and gives it to every app server). Without either, a random key made when
the middleware is built, with a warning: a cookie is then honoured only by
the processes that share it (gunicorn workers forked from the master that
imported the app).

Only a write that commits before the response starts can set the cookie (a
streamed body that writes later cannot add a header). The scope is current
while the app runs and while each piece of a lazily produced body is made,
so such bodies still read with the token. It is also put in the WSGI
environ under ``tiers.causal``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from tiers.db.tokens import CausalScope, activate, is_token

log = logging.getLogger("tiers.app")

SECRET_ENV = "TIERS_SECRET_KEY"
COOKIE_NAME = "tiers_causal"
ENVIRON_KEY = "tiers.causal"
# Long enough for any sane replica lag; a stale token only costs reads that
# go to the primary until the replicas pass it, which they do within moments.
DEFAULT_MAX_AGE = 3600
# Separates these signatures from any other use of the same key.
_PURPOSE = b"tiers causal token v1\x00"
# A token is at most 17 characters and a signature 43: anything longer is not ours.
_MAX_VALUE = 80
_SHORT_KEY = 16
# What every app server of one site is told about its databases (tiers.db.router).

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _signature(token: str, key: bytes) -> bytes:
    return hmac.new(key, _PURPOSE + token.encode("ascii"), hashlib.sha256).digest()


def sign(token: str, key: str | bytes) -> str:
    """The cookie value for ``token``: ``<token>.<signature>``; ValueError if it is no token."""
    if not is_token(token):
        raise ValueError(f"not a causal token: {token!r}")
    mac = base64.urlsafe_b64encode(_signature(token, _key_bytes(key))).rstrip(b"=")
    return f"{token}.{mac.decode('ascii')}"


def verify(value: str | None, key: str | bytes) -> str | None:
    """The token in a cookie value if its signature holds under ``key``, else None; never raises."""
    if value is None or len(value) > _MAX_VALUE:
        return None
    token, dot, mac_text = value.strip('"').rpartition(".")
    if not dot or not is_token(token):
        return None
    try:
        mac = base64.urlsafe_b64decode(mac_text + "=" * (-len(mac_text) % 4))
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _signature(token, _key_bytes(key))):
        return None
    return token


def cookie_values(header: str, name: str) -> list[str]:
    """Every value of cookie ``name`` in a ``Cookie`` request header, in order; never raises."""
    found = []
    for part in header.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key.strip() == name:
            found.append(value.strip())
    return found


class KeySource(enum.Enum):
    """Where the signing key came from; see the module docstring."""

    ARGUMENT = "argument"
    ENVIRONMENT = "environment"
    RANDOM = "random"


def resolve_key(secret_key: str | bytes | None,
                environ: Mapping[str, str] | None = None) -> tuple[bytes, KeySource]:
    """The signing key and where it came from, in the order the module docstring gives."""
    if secret_key is not None and len(secret_key) > 0:
        return _key_bytes(secret_key), KeySource.ARGUMENT
    env = os.environ if environ is None else environ
    configured = env.get(SECRET_ENV, "")
    if configured:
        return configured.encode(), KeySource.ENVIRONMENT
    return secrets.token_bytes(32), KeySource.RANDOM


class _Response:
    """The app's response iterable, producing each piece (and closing) in the request's scope."""

    def __init__(self, body: Iterable[bytes], scope: CausalScope) -> None:
        self._body = body
        self._scope = scope

    def __iter__(self) -> Iterator[bytes]:
        with activate(self._scope):
            pieces = iter(self._body)
        while True:
            with activate(self._scope):
                try:
                    piece = next(pieces)
                except StopIteration:
                    return
            yield piece

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            with activate(self._scope):
                close()


class CausalMiddleware:
    """Carry the causal token of each client in a signed cookie; see the module docstring.

    ``cookie_name``, ``max_age`` (seconds), ``path`` and ``secure`` shape the
    cookie (always HttpOnly, SameSite=Lax). ``secret_key`` overrides
    ``TIERS_SECRET_KEY``; ``environ`` replaces ``os.environ`` for finding it.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        secret_key: str | bytes | None = None,
        cookie_name: str = COOKIE_NAME,
        max_age: int = DEFAULT_MAX_AGE,
        path: str = "/",
        secure: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.cookie_name = cookie_name
        self.max_age = max_age
        self.path = path
        self.secure = secure
        self._key, self.key_source = resolve_key(secret_key, environ)
        if self.key_source is KeySource.RANDOM:
            log.warning(
                "%s is not set: causal-token cookies are signed with a key of this process "
                "only, so a request that reaches another app server reads without its token "
                "(read-your-writes then holds only within one app server)", SECRET_ENV)
        elif len(self._key) < _SHORT_KEY:
            log.warning("the causal-token signing key is only %d bytes; use 32 or more",
                        len(self._key))

    def token_from(self, environ: WSGIEnvironment) -> str | None:
        """The first validly signed token among the request's cookies, else None."""
        header = environ.get("HTTP_COOKIE")
        if not isinstance(header, str):
            return None
        for value in cookie_values(header, self.cookie_name):
            token = verify(value, self._key)
            if token is not None:
                return token
        return None

    def cookie(self, token: str) -> str:
        """The ``Set-Cookie`` header value that hands ``token`` to the client."""
        parts = [f"{self.cookie_name}={sign(token, self._key)}", f"Max-Age={self.max_age}",
                 f"Path={self.path}", "HttpOnly", "SameSite=Lax"]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        token = self.token_from(environ)
        scope = CausalScope(received=token, token=token)
        environ[ENVIRON_KEY] = scope

        def start(status: str, headers: list[tuple[str, str]],
                  exc_info: ExcInfo | None = None, /) -> Callable[[bytes], object]:
            if scope.wrote and scope.token is not None:
                headers = [*headers, ("Set-Cookie", self.cookie(scope.token))]
            return start_response(status, headers, exc_info)

        # The scope is current only while the app's code runs, so nothing of
        # one request stays set in the thread when the server moves on.
        with activate(scope):
            body = self.app(environ, start)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return body  # a file sent as it is (maybe by sendfile) reads no database
        return _Response(body, scope)
