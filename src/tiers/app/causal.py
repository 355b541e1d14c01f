"""WSGI middleware that carries a client's causal tokens across requests, in a signed cookie.

Read-your-writes across requests: a POST commits on a primary, the
redirect's GET may land on any worker of any app server and read from any
replica. The middleware makes that GET see the write:

1. On each request it reads the cookie (``tiers_causal`` by default),
   checks its signature and opens a causal scope
   (:func:`tiers.db.tokens.causal_scope`) holding its tokens, one per
   database cluster. Reads through a :class:`tiers.db.router.Cluster` (and
   :mod:`tiers.db.sqla` sessions) that are given no token use the scope's
   entry for *that* cluster: they go to one of its replicas that has
   replayed it, or wait briefly, or read from its primary. A cluster with no
   entry reads from any healthy replica.
2. Every write committed during the request replaces the entry of its
   cluster (the router calls :func:`tiers.db.tokens.note_write`). When the
   app starts its response after a write, the middleware adds a
   ``Set-Cookie`` with every entry, signed: those received, with the new
   positions in place of the old ones of the clusters written to. A write
   on one cluster never drops another cluster's entry.

Cookie format (version 2)::

    main:0/16B3D28.social:0/5A10.<signature>

Entries ``<cluster>:<lsn>`` joined by ``.``, sorted by cluster name; the
cluster a lower-case ASCII identifier (:func:`tiers.db.tokens.is_cluster_name`),
the LSN in PostgreSQL's ``X/Y`` form; then ``.`` and an unpadded base64url
HMAC-SHA256 of everything before it. Every character is one a cookie value
may hold unquoted (no ``;``, ``,``, whitespace, quotes or backslashes). At
most :data:`MAX_ENTRIES` entries and :data:`MAX_VALUE` characters. The
version-1 cookie ``<lsn>.<signature>`` (one token, signed under another
purpose string) is still accepted, as the token of the cluster ``main``;
the middleware only ever sends version 2, which an app server from before
version 2 ignores (its reads then go without a token until it is upgraded).

A cookie that is missing, malformed, too long, with a bad cluster name, a
repeated cluster or too many entries, unsigned, or signed with another key
is ignored as a whole: the request simply has no token (its reads may see
a lagging replica), and it is never an error. Trusting a forged token would
let a client send its reads to a primary and make each one wait first; the
signature stops that. Should a site have more clusters than a cookie holds,
the entries of the clusters written in the request are kept first, then
the others by name; reads on a cluster whose entry was left out may see a
lagging replica.

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
so such bodies still read with the tokens. It is also put in the WSGI
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

from tiers.db.tokens import (
    DEFAULT_CLUSTER,
    MAX_CLUSTER_NAME,
    CausalScope,
    TokenMap,
    activate,
    is_cluster_name,
    is_token,
    token_map,
)

log = logging.getLogger("tiers.app")

SECRET_ENV = "TIERS_SECRET_KEY"
COOKIE_NAME = "tiers_causal"
ENVIRON_KEY = "tiers.causal"
# Long enough for any sane replica lag; a stale token only costs reads that
# go to the primary until the replicas pass it, which they do within moments.
DEFAULT_MAX_AGE = 3600
MAX_ENTRIES = 16
"""The most clusters one cookie carries a token for."""
# Separate these signatures from any other use of the same key, and version 2
# (a map) from version 1 (one bare token) so neither can pass for the other.
_PURPOSE_V1 = b"tiers causal token v1\x00"
_PURPOSE = b"tiers causal tokens v2\x00"
_ENTRY_SEP = "."
_NAME_SEP = ":"
# An LSN is at most 17 characters and a signature 43.
_MAX_ENTRY = MAX_CLUSTER_NAME + len(_NAME_SEP) + 17
MAX_VALUE = MAX_ENTRIES * (_MAX_ENTRY + len(_ENTRY_SEP)) + 43
"""The longest cookie value (signature included) that is read at all."""
_SHORT_KEY = 16

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _signature(payload: str, key: bytes, purpose: bytes = _PURPOSE) -> bytes:
    return hmac.new(key, purpose + payload.encode("ascii"), hashlib.sha256).digest()


def encode_tokens(tokens: TokenMap | str) -> str:
    """The unsigned text of ``tokens``: ``<cluster>:<lsn>`` entries sorted by name, joined
    by ``.``. A bare token stands for ``{"main": token}``.

    Raises ValueError for no entries, more than MAX_ENTRIES, a bad cluster
    name or a malformed token.
    """
    checked = token_map(tokens)
    if not checked:
        raise ValueError("no causal tokens to encode")
    if len(checked) > MAX_ENTRIES:
        raise ValueError(f"{len(checked)} causal tokens; a cookie holds at most {MAX_ENTRIES}")
    return _ENTRY_SEP.join(f"{name}{_NAME_SEP}{checked[name]}" for name in sorted(checked))


def decode_tokens(text: str) -> dict[str, str] | None:
    """The tokens in text made by :func:`encode_tokens` (any order of entries), or None if
    it is not such text (empty, too many entries, a repeated or bad name, a bad token);
    never raises."""
    entries = text.split(_ENTRY_SEP)
    if not text or len(entries) > MAX_ENTRIES:
        return None
    found: dict[str, str] = {}
    for entry in entries:
        name, sep, token = entry.partition(_NAME_SEP)
        if not sep or name in found or not is_cluster_name(name) or not is_token(token):
            return None
        found[name] = token
    return found


def sign(tokens: TokenMap | str, key: str | bytes) -> str:
    """The cookie value for ``tokens``: ``<entries>.<signature>`` (see the module docstring).

    A bare token stands for ``{"main": token}``. ValueError if
    :func:`encode_tokens` refuses the tokens.
    """
    payload = encode_tokens(tokens)
    mac = base64.urlsafe_b64encode(_signature(payload, _key_bytes(key))).rstrip(b"=")
    return f"{payload}{_ENTRY_SEP}{mac.decode('ascii')}"


def verify(value: str | None, key: str | bytes) -> dict[str, str] | None:
    """The tokens in a cookie value by cluster if its signature holds under ``key``, else None.

    Accepts both formats of the module docstring (a version-1 value gives
    ``{"main": token}``); never raises.
    """
    if value is None or len(value) > MAX_VALUE + 2:
        return None
    payload, dot, mac_text = value.strip('"').rpartition(_ENTRY_SEP)
    if not dot or not payload or not mac_text.isascii():
        return None
    if is_token(payload):
        found: dict[str, str] | None = {DEFAULT_CLUSTER: payload}
        purpose = _PURPOSE_V1
    else:
        found, purpose = decode_tokens(payload), _PURPOSE
    if found is None:
        return None
    try:
        mac = base64.urlsafe_b64decode(mac_text + "=" * (-len(mac_text) % 4))
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _signature(payload, _key_bytes(key), purpose)):
        return None
    return found


def cookie_tokens(scope: CausalScope) -> dict[str, str]:
    """What the cookie of a response hands back for ``scope``: every token in it, at most
    MAX_ENTRIES, those of the clusters written in the scope first, then by name."""
    names = sorted(scope.tokens, key=lambda name: (name not in scope.written, name))
    return {name: scope.tokens[name] for name in names[:MAX_ENTRIES]}


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

    def tokens_from(self, environ: WSGIEnvironment) -> dict[str, str]:
        """The tokens of the first validly signed cookie of the request, else none (empty)."""
        header = environ.get("HTTP_COOKIE")
        if not isinstance(header, str):
            return {}
        for value in cookie_values(header, self.cookie_name):
            found = verify(value, self._key)
            if found is not None:
                return found
        return {}

    def cookie(self, tokens: TokenMap | str) -> str:
        """The ``Set-Cookie`` header value that hands ``tokens`` to the client; ValueError
        if :func:`encode_tokens` refuses them."""
        parts = [f"{self.cookie_name}={sign(tokens, self._key)}", f"Max-Age={self.max_age}",
                 f"Path={self.path}", "HttpOnly", "SameSite=Lax"]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        scope = CausalScope.starting(self.tokens_from(environ))
        environ[ENVIRON_KEY] = scope

        def start(status: str, headers: list[tuple[str, str]],
                  exc_info: ExcInfo | None = None, /) -> Callable[[bytes], object]:
            if scope.wrote:
                handed = cookie_tokens(scope)
                if len(handed) < len(scope.tokens):
                    log.warning("the causal-token cookie holds %d clusters' tokens, not %d: "
                                "reads on the others may see a lagging replica",
                                MAX_ENTRIES, len(scope.tokens))
                headers = [*headers, ("Set-Cookie", self.cookie(handed))]
            return start_response(status, headers, exc_info)

        # The scope is current only while the app's code runs, so nothing of
        # one request stays set in the thread when the server moves on.
        with activate(scope):
            body = self.app(environ, start)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return body  # a file sent as it is (maybe by sendfile) reads no database
        return _Response(body, scope)
