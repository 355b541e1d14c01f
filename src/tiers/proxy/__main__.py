"""``python -m tiers.proxy``: run the reverse proxy in front of app servers.

    python -m tiers.proxy --listen HOST:PORT --backend HOST:PORT [--backend ...]
        [--access-log PATH|-] [--health-path PATH] [--health-interval S]
        [--health-timeout S] [--health-fall N] [--health-rise N]
        [--connect-timeout S] [--read-timeout S] [--client-idle-timeout S]
        [--header-timeout S]
    python -m tiers.proxy --topology tiers.toml|default [--access-log PATH|-]
        [--admin-token-file PATH]

The first form proxies every request to the given backends. The second takes
everything (listener, timeouts, pools, routes, limits, cache, admin) from a
topology file, as ``tiers up`` runs it. Defaults are those of
``tiers.config.model.ProxyConfig``; without
``--access-log`` no access log is written. The socket is bound before
anything else, so a TCP connect to the listen address means "ready"; with
port 0 the chosen port is in the "listening on" line on stderr.

Exit status: 0 after SIGTERM or SIGINT (requests in flight finish within 10 s),
1 when it cannot start (address in use, access log not writable), 2 on a bad
argument. Operational messages go to stderr, one line each.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvloop

from tiers.config import load_topology
from tiers.config.model import Address, ProxyConfig
from tiers.config.proxy import AdminConfig, Pool, ProxyPolicy, Route, RouteKind, Server
from tiers.errors import ConfigError, ProxyError, TiersError
from tiers.proxy import c_helpers, request_path
from tiers.proxy.server import ProxyServer
from tiers.proxy.settings import ProxySettings

log = logging.getLogger("tiers.proxy")

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as an Address; ValueError with a reason otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]:PORT")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"{text!r}: port must be in {lowest}..65535")
    return Address(host, port)


def _listen_type(text: str) -> Address:
    try:
        return parse_address(text, allow_port_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _backend_type(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _path_type(text: str) -> str:
    if not text.startswith("/") or any(c in text for c in " \t\r\n"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a path starting with / without spaces")
    return text


def build_parser() -> argparse.ArgumentParser:
    d = ProxyConfig()
    p = argparse.ArgumentParser(
        prog="python -m tiers.proxy", description="HTTP/1.1 reverse proxy and load balancer."
    )
    p.add_argument(
        "--listen",
        type=_listen_type,
        default=None,
        metavar="HOST:PORT",
        help=f"address to listen on (default {d.listen}; overrides the topology's)",
    )
    p.add_argument(
        "--backend",
        type=_backend_type,
        action="append",
        metavar="HOST:PORT",
        help="an app server; repeat for several (or give --topology)",
    )
    p.add_argument(
        "--topology",
        metavar="FILE",
        help="take listener, timeouts, pools and routes from this tiers.toml ('default' for "
        "the built-in defaults) instead of the other options; SIGHUP reloads it",
    )
    p.add_argument(
        "--admin-token-file",
        metavar="PATH",
        help="with --topology: where to write the admin token when the file sets none",
    )
    p.add_argument(
        "--access-log",
        metavar="PATH",
        default=None,
        help="LTSV access log file, - for stdout (default: none)",
    )
    p.add_argument("--health-path", type=_path_type, default=d.health_path)
    p.add_argument("--health-interval", type=_positive_float, default=d.health_interval)
    p.add_argument("--health-timeout", type=_positive_float, default=d.health_timeout)
    p.add_argument("--health-fall", type=_positive_int, default=d.health_fall)
    p.add_argument("--health-rise", type=_positive_int, default=d.health_rise)
    p.add_argument("--connect-timeout", type=_positive_float, default=d.connect_timeout)
    p.add_argument("--read-timeout", type=_positive_float, default=d.read_timeout)
    p.add_argument("--client-idle-timeout", type=_positive_float, default=d.client_idle_timeout)
    p.add_argument("--header-timeout", type=_positive_float, default=d.header_timeout)
    p.add_argument("--send-timeout", type=_positive_float, default=d.send_timeout)
    policy, pool = ProxyPolicy(), Pool(name="default", servers=())
    p.add_argument("--workers", type=_positive_int, default=d.workers, metavar="N",
                   help="worker processes sharing the port with SO_REUSEPORT (default 1)")
    p.add_argument("--max-body-size", type=_non_negative_int, default=policy.max_body_size,
                   metavar="BYTES", help="413 for larger request bodies; 0: no limit")
    p.add_argument("--passive-fall", type=_non_negative_int, default=pool.passive_fall,
                   metavar="N", help="consecutive errors or 5xx that take a backend out; "
                   "0: only active checks do")
    return p


Reloader = Callable[[], ProxySettings]


def settings_from_args(argv: Sequence[str] | None = None) -> ProxySettings:
    """Parse the command line; on a bad argument print why and exit with status 2."""
    return parse_args(argv)[0]


def parse_args(argv: Sequence[str] | None = None) -> tuple[ProxySettings, Reloader | None]:
    """The settings, and with --topology a function that reads them again (for SIGHUP).

    A bad argument prints why and exits with status 2; a bad topology raises ConfigError.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    if (ns.topology is None) == (ns.backend is None):
        parser.error("give either --backend (one or more) or --topology")
    if ns.topology is not None:

        def reload() -> ProxySettings:
            settings = settings_from_topology(ns.topology, ns.access_log, ns.admin_token_file)
            return settings if ns.listen is None else replace(settings, listen=ns.listen)

        return reload(), reload
    backends = tuple(ns.backend)
    pool = Pool(name="default", servers=tuple(Server(a) for a in backends),
                passive_fall=ns.passive_fall)
    policy = ProxyPolicy(pools=(pool,),
                         routes=(Route(name="default", kind=RouteKind.POOL, pool="default"),),
                         admin=AdminConfig(listen=None), max_body_size=ns.max_body_size)
    settings = ProxySettings(
        listen=ns.listen or ProxyConfig().listen,
        policy=policy,
        workers=ns.workers,
        backends=tuple(ns.backend),
        access_log=ns.access_log,
        health_path=ns.health_path,
        health_interval=ns.health_interval,
        health_timeout=ns.health_timeout,
        health_fall=ns.health_fall,
        health_rise=ns.health_rise,
        connect_timeout=ns.connect_timeout,
        read_timeout=ns.read_timeout,
        client_idle_timeout=ns.client_idle_timeout,
        header_timeout=ns.header_timeout,
        send_timeout=ns.send_timeout,
    )
    return settings, None


def settings_from_topology(path: str, access_log: str | None,
                           admin_token_file: str | None) -> ProxySettings:
    """Settings from a topology file; a bad file raises ConfigError."""
    topology = load_topology(None if path == "default" else Path(path))
    return ProxySettings.from_config(topology.proxy, access_log, admin_token_file)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # asyncio's default handler prints a traceback over many lines.
    exc = context.get("exception")
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    log.error("%s%s", context.get("message", "event loop error"), detail)


async def serve(settings: ProxySettings, reload: Reloader | None = None) -> int:
    """Run the proxy until SIGTERM or SIGINT; return the exit status.

    With ``reload``, SIGHUP reads the configuration again and applies it without
    dropping connections; a bad new configuration is logged and the old one kept.
    """
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception)
    stop = asyncio.Event()
    try:
        server = ProxyServer(settings)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_USAGE
    try:
        await server.start()
    except ProxyError as exc:
        log.error("%s", exc)
        return EXIT_START_FAILED
    # Signal handlers only ask for the stop; the stop itself runs here.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, server, reload)
    # A worker's master holds SIGHUP back until now (tiers.proxy.workers): a
    # reload asked for while this process started is carried out here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    host, port = server.address
    log.info(
        "listening on %s:%d, backends %s",
        f"[{host}]" if ":" in host else host,
        port,
        ", ".join(str(b) for b in settings.backends),
    )
    log.info("request path: %s; C helpers: %s", request_path(),
             ", ".join(c_helpers()) or "none (built without a C compiler)")
    await stop.wait()
    log.info("stopping: finishing requests in flight")
    await server.shutdown()
    log.info("stopped")
    return EXIT_OK


def _reload(server: ProxyServer, reload: Reloader | None) -> None:
    if reload is None:
        log.info("SIGHUP: nothing to reload without --topology")
        return
    log.info("reloading the configuration")
    try:
        server.reload(reload())
    except TiersError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return
    log.info("configuration reloaded")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, reload = parse_args(argv)
    except ConfigError as exc:
        print(f"tiers.proxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.workers > 1:
        from tiers.proxy.workers import Master

        def run_worker(worker: ProxySettings, index: int) -> int:
            reload_mine = _for_worker(reload, index)
            return uvloop.run(serve(_current(worker, reload_mine), reload_mine))

        return Master(settings, run_worker).run()
    return uvloop.run(serve(settings, reload))


def _current(worker: ProxySettings, reload: Reloader | None) -> ProxySettings:
    """A worker's settings as the file says now: one started again after a reload
    must not serve with the configuration the master read at its own start."""
    if reload is None:
        return worker
    try:
        fresh = reload()
    except TiersError as exc:
        log.error("cannot read the configuration again, using the one read at start: %s", exc)
        return worker
    # Where to listen and the workers' sockets are the master's to decide.
    return replace(fresh, listen=worker.listen, peer_prefix=worker.peer_prefix,
                   workers=worker.workers, policy=replace(fresh.policy,
                                                          admin=worker.policy.admin))


def _for_worker(reload: Reloader | None, index: int) -> Reloader | None:
    """A reloader that applies worker ``index``'s share of the settings."""
    if reload is None:
        return None
    from tiers.proxy.workers import worker_settings

    reload_all = reload
    return lambda: worker_settings(reload_all(), index)


if __name__ == "__main__":
    sys.exit(main())
