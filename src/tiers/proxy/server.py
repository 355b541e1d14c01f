"""The proxy process's core: listener, client connections, pools, cache, admin, reload.

``ProxyServer`` owns what every connection shares (the compiled routes and
limits, the pools, the page cache, the access log and counters) and swaps it
on reload; ``tiers.proxy.connection.ClientConnection`` serves the requests of
one client connection against it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, Generic, TypeVar, cast, overload

from tiers.config.proxy import RouteKind
from tiers.errors import ProxyError
from tiers.proxy import observe
from tiers.proxy.accesslog import AccessLog, RequestIds
from tiers.proxy.admin import AdminHandlers, AdminServer, Metric, load_or_create_token
from tiers.proxy.balancer import Outcome, outcome_for_status
from tiers.proxy.cache import CacheRequest, Fill, PageCache
from tiers.proxy.connection import ClientConnection
from tiers.proxy.errors import UpstreamTimeout
from tiers.proxy.forward import upstream_request_head
from tiers.proxy.http1 import BodyData
from tiers.proxy.limits import Abuse
from tiers.proxy.observe import RequestCounters
from tiers.proxy.peers import PeerListener, ask, ask_all, merge_status
from tiers.proxy.responseparser import ResponseHead
from tiers.proxy.routing import Router
from tiers.proxy.settings import ProxySettings
from tiers.proxy.shared import Shared
from tiers.proxy.static import StaticRoot
from tiers.proxy.upstream import Pools
from tiers.proxy.upstreamconn import UpstreamConnection
from tiers.proxy.writebatch import WriteBatch

log = logging.getLogger("tiers.proxy")


def _static_roots(settings: ProxySettings) -> dict[str, StaticRoot]:
    return {r.name: StaticRoot.from_route(r) for r in settings.policy.routes
            if r.kind is RouteKind.STATIC}


_T = TypeVar("_T")


class _SharedAttr(Generic[_T]):
    """``server.<name>`` stands for ``server.shared.<name>``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, server: None, owner: type | None = None) -> _SharedAttr[_T]: ...
    @overload
    def __get__(self, server: ProxyServer, owner: type | None = None) -> _T: ...

    def __get__(
        self, server: ProxyServer | None, owner: type | None = None
    ) -> _T | _SharedAttr[_T]:
        if server is None:  # looked up on the class, as help() and inspect do
            return self
        return cast(_T, getattr(server.shared, self._name))

    def __set__(self, server: ProxyServer, value: _T) -> None:
        setattr(server.shared, self._name, value)


class ProxyServer:
    """The listening socket, the client connections, the backends and the access log."""

    # What the connections read per request, kept in ``self.shared``.
    settings = _SharedAttr[ProxySettings]()
    router = _SharedAttr[Router]()
    abuse = _SharedAttr[Abuse]()
    pools = _SharedAttr[Pools]()
    cache = _SharedAttr[PageCache]()
    request_ids = _SharedAttr[RequestIds]()
    counters = _SharedAttr[RequestCounters]()
    writes = _SharedAttr[WriteBatch]()
    access_log = _SharedAttr["AccessLog | None"]()
    stopping = _SharedAttr[bool]()

    def __init__(self, settings: ProxySettings) -> None:
        policy = settings.policy
        # Compiling checks the policy once more (regexes, networks, roots): a
        # ConfigError here stops the start with the key named.
        router = Router.compile(policy.routes, pools={p.name for p in policy.pools})
        self.shared = Shared(settings, router, Abuse.compile(policy.abuse),
                             Pools(policy.pools, settings.upstream_settings()),
                             self._new_cache(settings))
        self.static_roots = _static_roots(settings)
        self._retiring: set[asyncio.Task[None]] = set()
        self.admin: AdminServer | None = None
        self.peers: PeerListener | None = None
        self._telling: set[asyncio.Task[None]] = set()
        self.started_at = time.time()
        self.connections: set[ClientConnection] = set()
        self.address: tuple[str, int] = (settings.listen.host, settings.listen.port)
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def start(self) -> None:
        """Open the access log, bind and listen, then start the health checks.

        Raises ``ProxyError`` when the log cannot be opened or the address bound.
        """
        self._loop = asyncio.get_running_loop()
        settings = self.settings
        if settings.access_log is not None:
            try:
                self.access_log = AccessLog(settings.access_log)
            except OSError as exc:
                raise ProxyError(f"cannot open access log {settings.access_log}: {exc}") from exc
        listen = settings.listen
        try:
            self._server = await self._loop.create_server(
                lambda: ClientConnection(self),
                listen.host,
                listen.port,
                reuse_address=True,
                # Several worker processes bind the same port; the kernel spreads
                # new connections over them.
                reuse_port=settings.workers > 1,
                backlog=1024,
            )
        except OSError as exc:
            if self.access_log is not None:
                self.access_log.close()
            raise ProxyError(f"cannot listen on {listen}: {exc}") from exc
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        if self.access_log is not None:
            self.access_log.start(self._loop)
        self.pools.start()
        self._sweeper = self._loop.create_task(self._sweep_abuse())
        await self._start_admin()

    async def _sweep_abuse(self) -> None:
        """Forget clients whose buckets refilled, so memory follows the active ones."""
        while True:
            await asyncio.sleep(5.0)
            self.abuse.sweep(self.loop.time())

    async def _start_admin(self) -> None:
        settings = self.settings
        if settings.peer_prefix is not None:
            self.peers = PeerListener(settings.peer_prefix, settings.worker, {
                "status": self._own_status,
                "purge": self._peer_purge,
                "drop": self._peer_drop,
            })
            try:
                await self.peers.start()
            except OSError as exc:
                raise ProxyError(f"cannot listen for the other workers: {exc}") from exc
        admin = settings.policy.admin
        if admin.listen is None:
            return
        token = load_or_create_token(admin.token, settings.admin_token_file)
        if settings.peer_prefix is None:
            handlers = AdminHandlers(status=self._own_status, metrics=self._own_metrics,
                                     purge=self._own_purge)
        else:
            handlers = AdminHandlers(status=self._all_status, metrics=self._all_metrics,
                                     purge=self._all_purge)
        self.admin = AdminServer(admin.listen, token, handlers)
        try:
            await self.admin.start()
        except ProxyError:
            self.admin = None
            await self.shutdown()
            raise

    # What the admin listener answers: this worker's view, or with several
    # workers the view of all of them, asked through their peer sockets.

    async def _own_status(self, _argument: str = "") -> dict[str, Any]:
        return observe.status(self)

    async def _own_metrics(self) -> list[Metric]:
        return observe.metrics(self)

    async def _own_purge(self, prefix: str) -> int:
        return self.cache.purge(prefix.encode(), prefix=True)

    async def _peer_drop(self, key: str) -> dict[str, int]:
        return {"purged": self.cache.store.purge(bytes.fromhex(key))}

    def _tell_peers_to_drop(self, key: bytes) -> None:
        """An unsafe request changed a page: every other worker drops its copy."""
        task = self.loop.create_task(self._drop_elsewhere(key))
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _drop_elsewhere(self, key: bytes) -> None:
        settings = self.settings
        assert settings.peer_prefix is not None
        command = f"drop {key.hex()}"
        await asyncio.gather(*(ask(settings.peer_prefix, index, command, 1.0)
                               for index in range(settings.workers)
                               if index != settings.worker))

    async def _peer_purge(self, prefix: str) -> dict[str, int]:
        return {"purged": await self._own_purge(prefix)}

    async def _all_status(self) -> dict[str, Any]:
        assert self.settings.peer_prefix is not None
        return merge_status(await ask_all(self.settings.peer_prefix, self.settings.workers,
                                          "status"))

    async def _all_metrics(self) -> list[Metric]:
        assert self.settings.peer_prefix is not None
        return observe.metrics_of_workers(
            await ask_all(self.settings.peer_prefix, self.settings.workers, "status"))

    async def _all_purge(self, prefix: str) -> int:
        assert self.settings.peer_prefix is not None
        answers = await ask_all(self.settings.peer_prefix, self.settings.workers,
                                f"purge {prefix}")
        missing = [str(i) for i, a in enumerate(answers) if a is None]
        if missing:
            # A worker that cannot be reached may still hold the page: say so.
            raise ProxyError(f"workers {', '.join(missing)} did not answer; "
                             "their caches may still hold the pages")
        return sum(int(a["purged"]) for a in answers)

    def _new_cache(self, settings: ProxySettings) -> PageCache:
        cache = PageCache(settings.policy.cache, fetch=self._cache_fetch,
                          wait_timeout=settings.read_timeout)
        if settings.peer_prefix is not None and settings.workers > 1:
            cache.on_invalidate = self._tell_peers_to_drop
        return cache

    def reload(self, settings: ProxySettings) -> None:
        """Apply new routes, pools, limits, cache settings and timeouts while running.

        Everything is compiled before anything is swapped, so a bad
        configuration raises ConfigError and changes nothing. Requests in
        flight finish on the pools they started with, which close once idle;
        open client connections stay open. The listen and admin addresses
        cannot change without a restart (a warning says so).
        """
        old = self.settings
        policy = settings.policy
        router = Router.compile(policy.routes, pools={p.name for p in policy.pools})
        abuse = self.abuse if policy.abuse == old.policy.abuse else Abuse.compile(policy.abuse)
        static_roots = _static_roots(settings)
        pools = Pools(policy.pools, settings.upstream_settings())
        # The workers' sockets stay where the master put them.
        settings = replace(settings, peer_prefix=old.peer_prefix)
        if settings.listen != old.listen or policy.admin != old.policy.admin:
            log.warning("listen and admin addresses change only with a restart")
            settings = replace(settings, listen=old.listen,
                               policy=replace(policy, admin=old.policy.admin))
        old_pools, old_cache = self.pools, self.cache
        self.settings, self.router, self.abuse = settings, router, abuse
        self.static_roots, self.pools = static_roots, pools
        if policy.cache != old.policy.cache or settings.read_timeout != old.read_timeout:
            self.cache = self._new_cache(settings)
        pools.start()
        task = self.loop.create_task(self._retire(old_pools, old_cache))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, pools: Pools, cache: PageCache) -> None:
        """Close replaced pools (and cache) once their requests in flight are done."""
        loop = self.loop
        deadline = loop.time() + self.settings.shutdown_timeout
        try:
            while loop.time() < deadline and any(
                    p.queued or any(s.active for s in p.servers) for p in pools.stats()):
                await asyncio.sleep(0.05)
        finally:  # at shutdown too, when this is cancelled
            if cache is not self.cache:
                await cache.close()
            await pools.close()

    async def _cache_fetch(self, req: CacheRequest, fill: Fill) -> None:
        """A background refresh for the page cache: one GET with no client waiting.

        Raises UpstreamError or ProxyError when the app cannot be reached or
        fails; the cache logs it and keeps serving the stale page.
        """
        route = req.route
        assert route is not None and route.pool is not None
        upstreams = self.pools[route.pool]
        loop = self.loop
        timeout = self.settings.read_timeout
        backend = await upstreams.acquire((), key=req.head.path)
        if backend is None:
            raise ProxyError(f"pool {route.pool}: no backend is available")
        outcome = Outcome.NEUTRAL
        conn: UpstreamConnection | None = None
        try:
            conn = upstreams.take_idle(backend, loop.time()) or await upstreams.connect(backend)
            conn.begin(False)
            conn.writelines([upstream_request_head(fill.request_head, req.client_ip,
                                                   backend.label_bytes,
                                                   request_id=self.request_ids.next())])
            response = await conn.next_event(timeout)
            assert isinstance(response, ResponseHead)
            outcome = Outcome.BROKEN  # until the body is complete
            capturing = fill.on_head(response)
            while True:
                event = conn.pop_ready() or await conn.next_event(timeout)
                if type(event) is not BodyData:
                    break
                if capturing:
                    capturing = fill.on_body(event.data)
            if capturing:
                fill.on_end()
            outcome = outcome_for_status(response.status)
            upstreams.release(conn, loop.time())
            conn = None
        except UpstreamTimeout:
            outcome = Outcome.TIMEOUT
            raise
        finally:
            if conn is not None:
                conn.abort()
            upstreams.finish(backend, outcome, loop.time())

    def connection_done(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)

    async def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (up to the timeout), close the rest."""
        self.stopping = True
        loop = self.loop
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = loop.time() + self.settings.shutdown_timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        left = list(self.connections)
        if left:
            log.warning("closing %d connections still busy after the grace period", len(left))
        for conn in left:
            conn.abort()
        tasks = [c.task for c in left if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        if retiring:
            await asyncio.wait(retiring, timeout=5.0)
        await self.cache.close()
        await self.pools.close()
        if self.admin is not None:
            await self.admin.close()
        if self.peers is not None:
            await self.peers.close()
        if self.access_log is not None:
            self.access_log.close()
