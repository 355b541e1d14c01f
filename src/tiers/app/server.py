"""One app server: a gunicorn prefork master running in this process.

The process that a supervisor starts *is* the gunicorn master (we subclass
gunicorn's BaseApplication rather than exec a ``gunicorn`` command), so the
pid the supervisor holds receives its signals directly:

    SIGTERM   graceful stop: workers finish in-flight requests within
              graceful_timeout, then are killed; exit status 0
    SIGINT/QUIT  quick stop; exit status 0
    SIGHUP    reload workers; SIGTTIN/SIGTTOU add/remove a worker

Exit statuses: 0 stopped on a signal, 1 could not bind or start,
3 a worker failed to boot, 4 the app could not be loaded.

Workers use the threaded ``gthread`` class so the proxy's keep-alive
connections stay open between requests, and recycle after max_requests
(plus jitter, so they do not all restart at once). Each worker asks the
kernel for SIGTERM when the master dies, even by SIGKILL, so no orphan keeps
serving (and holding the listening port) after its master is gone.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.types import WSGIApplication

from gunicorn import glogging  # type: ignore[import-untyped]
from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

from tiers.app.health import HealthMiddleware
from tiers.app.metrics import MetricsMiddleware

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2
EXIT_WORKER_BOOT = 3  # gunicorn's Arbiter.WORKER_BOOT_ERROR
# gunicorn's Arbiter.APP_LOAD_ERROR, so the status is the same whether loading fails
# in the master or in a worker.
EXIT_APP_LOAD = 4

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class ServerOptions:
    """What one app server runs and how; validated by the command line before it gets here."""

    name: str
    host: str
    port: int
    app: str
    pythonpath: tuple[Path, ...] = field(default=())
    workers: int = 2
    threads: int = 1
    max_requests: int = 1000
    max_requests_jitter: int = 100
    graceful_timeout: float = 10.0
    # Longer than the proxy keeps an idle upstream connection, so the proxy,
    # not the server, closes it and never sends on a connection being closed.
    keepalive: float = 5.0
    # A worker whose main loop is silent this long is killed and replaced.
    timeout: float = 30.0

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    return True


def post_fork(arbiter: Any, worker: Any) -> None:
    """In each new worker: die with the master.

    Until the worker installs its own handlers it still runs the master's
    SIGTERM handler, which only queues the signal for a master loop that
    does not run here: reset it so an early SIGTERM ends the worker. Then ask
    for SIGTERM on the master's death, and check the master did not die
    before that request was made (the kernel would not signal us then).
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != worker.ppid:
        arbiter.log.info("master %s is gone, worker %s exits", worker.ppid, os.getpid())
        sys.exit(0)


class NamedLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger, with the server's name on every line of the error log."""

    def setup(self, cfg: Any) -> None:
        # Names are checked to be plain words, but a '%' would break the format.
        name = str(cfg.proc_name).replace("%", "%%")
        self.error_fmt = f"%(asctime)s [{name}] [%(process)d] [%(levelname)s] %(message)s"
        super().setup(cfg)


def gunicorn_settings(options: ServerOptions) -> dict[str, Any]:
    """The gunicorn settings for ``options``, as a plain mapping checkable without forking."""
    settings: dict[str, Any] = {
        "bind": [options.bind],
        "worker_class": "gthread",
        "workers": options.workers,
        "threads": options.threads,
        "max_requests": options.max_requests,
        "max_requests_jitter": options.max_requests_jitter,
        # gunicorn takes whole seconds; round up so a stop is never cut shorter than asked.
        "graceful_timeout": math.ceil(options.graceful_timeout),
        "keepalive": math.ceil(options.keepalive),
        "timeout": math.ceil(options.timeout),
        "proc_name": options.name,
        "errorlog": "-",
        "accesslog": None,
        "loglevel": "info",
        "logger_class": NamedLogger,
        "post_fork": post_fork,
        # The app is imported once in the master before the workers fork (see
        # run), so an import error stops the server before it binds workers.
        "preload_app": False,
        # Newer gunicorn opens a control socket at one fixed path per user;
        # several app servers on one host would fight over it.
        "control_socket_disable": True,
    }
    return settings


class TiersGunicorn(BaseApplication):  # type: ignore[misc]
    """A gunicorn application whose configuration comes from ServerOptions, not from argv."""

    def __init__(self, options: ServerOptions, wsgi_app: WSGIApplication) -> None:
        self.options = options
        self.application = wsgi_app
        super().__init__(prog=f"tiers.app[{options.name}]")

    def load_config(self) -> None:
        for key, value in gunicorn_settings(self.options).items():
            # Settings this gunicorn version does not know are optional extras.
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> WSGIApplication:
        return self.application


def serve(options: ServerOptions, wsgi_app: WSGIApplication) -> None:
    """Run the master until it is stopped; gunicorn ends it with SystemExit(status)."""
    TiersGunicorn(options, wrap(options, wsgi_app)).run()


def wrap(options: ServerOptions, wsgi_app: WSGIApplication) -> WSGIApplication:
    """The app behind tiers' own paths: the health check, then this worker's metrics."""
    return HealthMiddleware(MetricsMiddleware(wsgi_app, server=options.name))
