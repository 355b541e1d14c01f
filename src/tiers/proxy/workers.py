"""Several proxy worker processes on one port (SO_REUSEPORT), under a small master.

The master forks ``workers`` children; each runs its own event loop and binds
the listen address with SO_REUSEPORT, so the kernel spreads new connections
over them and one busy loop does not stall the others. The master only
relays signals and keeps the count:

    SIGTERM / SIGINT   passed on; the master exits once every worker has
                       finished its requests in flight (status 0)
    SIGHUP             passed on: each worker reloads its configuration (a
                       worker still starting holds it until it can)
    a worker dies      it is started again after a short pause (unless a
                       stop came meanwhile), with the configuration the
                       file holds then; a worker that dies this way
                       ``_MAX_QUICK_DEATHS`` times in a row within a second
                       of starting stops the proxy (status 1)

Each worker gets SIGTERM if the master dies (even by SIGKILL), so none is
left behind. Only worker 0 runs the admin listener; it asks every worker
through its peer socket (``tiers.proxy.peers``), so status, metrics and
purges cover them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from tiers.config.address import Address
from tiers.config.proxy import AdminConfig
from tiers.proxy.peers import new_prefix
from tiers.proxy.settings import ProxySettings

log = logging.getLogger("tiers.proxy")

_PR_SET_PDEATHSIG = 1
_QUICK = 1.0  # seconds: a worker dying sooner than this counts as failing to start
_MAX_QUICK_DEATHS = 5
_RESPAWN_PAUSE = 0.5
_HELD_AT_FORK = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

# Runs one worker to completion and returns its exit status.
WorkerMain = Callable[[ProxySettings, int], int]


def worker_settings(settings: ProxySettings, index: int) -> ProxySettings:
    """Worker ``index``'s settings: only worker 0 keeps the admin listener."""
    if index == 0:
        return replace(settings, worker=0)
    policy = replace(settings.policy, admin=AdminConfig(listen=None))
    return replace(settings, policy=policy, admin_token_file=None, worker=index)


class Master:
    """Forks, watches and signals the workers; see the module docstring."""

    def __init__(self, settings: ProxySettings, run_worker: WorkerMain) -> None:
        self.settings = settings
        self.run_worker = run_worker
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self._pending: list[int] = []  # signals received, handled by the loop
        self._quick_deaths = 0

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._note)
        reserved = self._fix_port()
        self.settings = replace(self.settings, peer_prefix=new_prefix())
        for index in range(self.settings.workers):
            self._spawn(index)
        log.info("master %d: %d workers", os.getpid(), self.settings.workers)
        stopping = False
        status = 0
        while self.children:
            while self._pending:
                received = self._pending.pop(0)
                if received == signal.SIGHUP:
                    self._signal_all(signal.SIGHUP)
                elif not stopping:
                    stopping = True
                    self._signal_all(signal.SIGTERM)
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
                continue
            index, started = self.children.pop(pid)
            if stopping:
                continue
            reason = _describe(code)
            if time.monotonic() - started < _QUICK:
                self._quick_deaths += 1
            else:
                self._quick_deaths = 0
            if self._quick_deaths >= _MAX_QUICK_DEATHS:
                log.error("worker %d keeps dying at start (%s); stopping", index, reason)
                stopping, status = True, 1
                self._signal_all(signal.SIGTERM)
                continue
            log.warning("worker %d (pid %d) %s; starting it again", index, pid, reason)
            time.sleep(_RESPAWN_PAUSE)
            if not self._stop_asked():  # a stop during the pause: nothing to start
                self._spawn(index)
        if reserved is not None:
            reserved.close()
        return status

    def _fix_port(self) -> socket.socket | None:
        """With port 0, choose the port here so that every worker binds the same one.

        The master keeps a bound, never listening, SO_REUSEPORT socket on it,
        which holds the port for workers started again later.
        """
        listen = self.settings.listen
        if listen.port != 0:
            return None
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        reserved = socket.socket(family, socket.SOCK_STREAM)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((listen.host, 0))
        port = reserved.getsockname()[1]
        self.settings = replace(self.settings, listen=Address(listen.host, port))
        return reserved

    def _note(self, signum: int, _frame: object) -> None:
        self._pending.append(signum)

    def _stop_asked(self) -> bool:
        return any(signum != signal.SIGHUP for signum in self._pending)

    def _signal_all(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _spawn(self, index: int) -> None:
        # A signal that reached a new worker before it reset its handlers
        # would land in the master's handler copied into it, which only notes
        # it in the worker's copy of the master: a SIGTERM lost that way left
        # the worker running and the master waiting for it. So the worker is
        # forked with these signals blocked (the mask is inherited) and lets
        # SIGTERM and SIGINT through once they are back at their defaults.
        # SIGHUP stays blocked until the worker can reload (a default SIGHUP
        # would kill it). The master holds them back for the fork only.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_AT_FORK)
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for signum in _HELD_AT_FORK:
                        signal.signal(signum, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
                    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
                    code = self.run_worker(worker_settings(self.settings, index), index)
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_AT_FORK)
        self.children[pid] = (index, time.monotonic())


def _describe(code: int) -> str:
    if os.WIFSIGNALED(code):
        return f"was killed by {signal.Signals(os.WTERMSIG(code)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(code)}"
