"""The worker master: forks the children :class:`~tiers.jobs.pool.PoolPlan` asks for.

The process that runs :func:`run_pool` is the master. It never imports the
task modules and never holds a database connection while it forks; each
child imports them after the fork (so the children SIGHUP starts run the
code on disk now) and opens its own connection. The master:

* installs the schema (idempotent) once at start;
* loops: turn the signals received into plan events, reap exited children,
  read what each child reports on the shared-memory board, and carry out the
  plan's decisions (fork, SIGTERM, SIGKILL, release a dead child's jobs);
* writes ``ready_file`` once every slot has a ready child (the stack's
  readiness check) and removes it when it exits.

Signals (handlers only record them; the loop acts):

    SIGTERM, SIGINT   graceful stop: children finish their jobs, then exit; killed
                      after graceful_timeout. A second one aborts (SIGKILL now).
    SIGQUIT           abort at once
    SIGHUP            replace every child gracefully (new ones start at once)

Children: SIGTERM finishes the running job and exits; a second SIGTERM exits
at once (the master releases the job). SIGINT and SIGHUP are ignored (the
master decides). Each child asks the kernel for SIGTERM when the master
dies, so no child outlives it by more than its running job.

Exit status of the master: 0 after a stop, EXIT_BOOT (3) when a child could
not import the task modules.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import mmap
import os
import secrets
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import psycopg

from tiers.jobs import store
from tiers.jobs.child import EXIT_BOOT, EXIT_OK, ChildLoop
from tiers.jobs.options import WorkerOptions
from tiers.jobs.pool import Kill, Kind, PoolPlan, Release, Spawn, Terminate

log = logging.getLogger("tiers.jobs")

EXIT_ABORTED = 6  # a child's second SIGTERM
_PR_SET_PDEATHSIG = 1
# Each cell: sequence (odd while being written), state, job id, deadline (monotonic).
_CELL = struct.Struct("=qqqd")
_FREE, _STARTING, _READY, _BUSY = 0, 1, 2, 3
_MAX_WAIT = 0.5


class SharedBoard:
    """Cells in anonymous shared memory, one per live child, written by the child alone.

    A cell is a seqlock: the writer makes the sequence odd, writes, makes it
    even; a reader retries while it is odd or changed, so it never pairs one
    job's id with another's deadline.
    """

    def __init__(self, cells: int) -> None:
        self._map = mmap.mmap(-1, _CELL.size * cells)
        self._free = list(range(cells))

    def allocate(self) -> int:
        index = self._free.pop(0)
        _CELL.pack_into(self._map, index * _CELL.size, 0, _STARTING, 0, 0.0)
        return index

    def release(self, index: int) -> None:
        _CELL.pack_into(self._map, index * _CELL.size, 0, _FREE, 0, 0.0)
        self._free.append(index)

    def cell(self, index: int) -> Cell:
        return Cell(self._map, index * _CELL.size)

    def read(self, index: int) -> tuple[int, int, float]:
        """(state, job id, deadline) of a cell, consistently."""
        offset = index * _CELL.size
        for _ in range(1000):
            seq, state, job, deadline = _CELL.unpack_from(self._map, offset)
            if seq % 2 == 0 and _CELL.unpack_from(self._map, offset)[0] == seq:
                return state, job, deadline
        return _STARTING, 0, 0.0


class Cell:
    """A child's view of its cell (the :class:`~tiers.jobs.child.Board` it reports to)."""

    def __init__(self, memory: mmap.mmap, offset: int) -> None:
        self._map = memory
        self._offset = offset
        self._seq = 0

    def _write(self, state: int, job: int, deadline: float) -> None:
        self._seq += 1
        struct.pack_into("=q", self._map, self._offset, self._seq)
        _CELL.pack_into(self._map, self._offset, self._seq, state, job, deadline)
        self._seq += 1
        struct.pack_into("=q", self._map, self._offset, self._seq)

    def ready(self) -> None:
        self._write(_READY, 0, 0.0)

    def busy(self, job_id: int, deadline: float) -> None:
        self._write(_BUSY, job_id, deadline)

    def idle(self) -> None:
        self._write(_READY, 0, 0.0)


class Master:
    """Runs one pool until it is stopped; see the module docstring."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.plan = PoolPlan(
            processes=options.processes, scheduler=options.scheduler,
            graceful_timeout=options.graceful_timeout, max_jobs=options.max_jobs,
            max_jobs_jitter=options.max_jobs_jitter, backoff_initial=options.backoff_initial,
            backoff_max=options.backoff_max)
        slots = options.processes + (1 if options.scheduler else 0)
        # Room for a retiring child and its replacement in every slot, and then some.
        self.board = SharedBoard(2 * slots + 2)
        self._cells: dict[int, int] = {}
        self._signals: list[int] = []
        self._wake_r = self._wake_w = -1
        self._token = secrets.token_hex(3)
        self._host = socket.gethostname()
        self._ready_written = False

    # ---- entry point ------------------------------------------------------------------

    def run(self) -> int:
        """Install the schema, run the pool until it stops; the master's exit status.

        Raises JobStoreError if the schema cannot be installed.
        """
        store.install_schema(self.options.dsn)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        previous = self._install_signals()
        log.info("%s: master %d starting %d worker(s)%s on queues %s", self.options.name,
                 os.getpid(), self.options.processes,
                 " and a scheduler" if self.options.scheduler else "",
                 ", ".join(self.options.queues))
        try:
            self._loop()
        finally:
            self._restore_signals(previous)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._remove_ready_file()
        log.info("%s: master %d stopped", self.options.name, os.getpid())
        return self.plan.exit_code

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            for signum in self._take_signals():
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s: stopping (%s)%s", self.options.name,
                             signal.Signals(signum).name,
                             "" if self.plan.phase.value == "running" else ": aborting")
                    self.plan.request_stop(now)
                elif signum == signal.SIGQUIT:
                    log.info("%s: aborting (SIGQUIT)", self.options.name)
                    self.plan.request_abort()
                elif signum == signal.SIGHUP:
                    log.info("%s: replacing every child (SIGHUP)", self.options.name)
                    self.plan.request_reload(now)
            self._reap(now)
            self._observe()
            self._act(self.plan.decide(time.monotonic()))
            if not self._ready_written and self.plan.all_ready():
                self._write_ready_file()
            if self.plan.finished:
                return
            timeout = min(_MAX_WAIT, self.plan.next_wakeup(time.monotonic()))
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select([self._wake_r], [], [], max(timeout, 0.005))
                if readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 512)

    # ---- signals --------------------------------------------------------------------

    def _install_signals(self) -> dict[int, object]:
        previous: dict[int, object] = {}
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                       signal.SIGCHLD):
            previous[signum] = signal.signal(signum, self._on_signal)
        previous[-1] = signal.set_wakeup_fd(self._wake_w)
        return previous

    def _restore_signals(self, previous: dict[int, object]) -> None:
        wakeup = previous.pop(-1)
        signal.set_wakeup_fd(wakeup if isinstance(wakeup, int) else -1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only record it: the loop acts (the wakeup fd has already woken it).
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _take_signals(self) -> list[int]:
        taken, self._signals = self._signals, []
        return taken

    # ---- children ---------------------------------------------------------------------

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            child = self.plan.children.get(pid)
            cell = self._cells.pop(pid, None)
            if cell is not None:
                if child is not None:
                    # Its last word first: a child killed right after it
                    # became ready, before the master looked, had been working.
                    self._observe_one(pid, cell)
                self.board.release(cell)
            if child is None:
                continue
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if child.retiring or (code == EXIT_OK and not child.killed):
                log.info("%s: %s %d (%s) exited with %s", self.options.name, child.kind.value,
                         pid, child.worker_id, how)
            else:
                log.warning("%s: %s %d (%s) died with %s", self.options.name,
                            child.kind.value, pid, child.worker_id, how)
            self.plan.exited(pid, code, now)

    def _observe(self) -> None:
        for pid, cell in self._cells.items():
            self._observe_one(pid, cell)

    def _observe_one(self, pid: int, cell: int) -> None:
        state, job, deadline = self.board.read(cell)
        busy = state == _BUSY
        self.plan.observed(pid, ready=state in (_READY, _BUSY),
                           job=job if busy else None, deadline=deadline if busy else None)

    def _act(self, actions: Sequence[Spawn | Terminate | Kill | Release]) -> None:
        releases = [a for a in actions if isinstance(a, Release)]
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn(action)
            elif isinstance(action, Terminate):
                _signal(action.pid, signal.SIGTERM)
            elif isinstance(action, Kill):
                log.warning("%s: killing %d: %s", self.options.name, action.pid, action.reason)
                _signal(action.pid, signal.SIGKILL)
        if releases:
            self._release(releases)

    def _spawn(self, action: Spawn) -> None:
        worker_id = f"{self._host}:{os.getpid()}:{self._token}:{action.slot}.{time.time_ns()}"
        cell = self.board.allocate()
        try:
            pid = os.fork()
        except OSError as exc:
            self.board.release(cell)
            log.error("%s: cannot fork: %s", self.options.name, exc)
            self.plan.spawn_failed(action.slot, time.monotonic())
            return
        if pid == 0:  # the child
            code = 1
            try:
                code = self._child(action, worker_id, cell)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._cells[pid] = cell
        self.plan.spawned(action.slot, pid, worker_id, time.monotonic())
        log.info("%s: %s %d started (%s)%s", self.options.name, action.kind.value, pid,
                 worker_id, f", recycled after {action.max_jobs} jobs" if action.max_jobs else "")

    def _release(self, releases: Sequence[Release]) -> None:
        """Release dead children's jobs now; if the database does not answer, their leases will."""
        try:
            with psycopg.connect(self.options.dsn, autocommit=True, connect_timeout=2,
                                 application_name=f"tiers {self.options.name} master") as conn:
                for release in releases:
                    for job_id, status in store.release_worker(conn, release.worker_id,
                                                               release.reason):
                        log.warning("%s: job %d of %s is now %s: %s", self.options.name,
                                    job_id, release.worker_id, status, release.reason)
        except psycopg.Error as exc:
            log.warning("%s: cannot release the jobs of %s now (%s); they are retried when "
                        "their leases expire", self.options.name,
                        ", ".join(r.worker_id for r in releases), str(exc).strip())

    # ---- in the child -------------------------------------------------------------------

    def _child(self, action: Spawn, worker_id: str, cell_index: int) -> int:
        master = os.getppid()
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        for signum in (signal.SIGCHLD, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until the loop is ready to stop softly
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != master:
            return EXIT_OK  # the master died before we asked to follow it
        if not _import_tasks(self.options.pythonpath, self.options.imports):
            return EXIT_BOOT
        board = self.board.cell(cell_index)
        if action.kind is Kind.SCHEDULER:
            from tiers.jobs.scheduler import run_scheduler_process

            return run_scheduler_process(self.options, board)
        loop = ChildLoop(self.options, worker_id, board=board, max_jobs=action.max_jobs)
        stops = 0

        def on_term(_signum: int, _frame: FrameType | None) -> None:
            nonlocal stops
            stops += 1
            if stops > 1:
                os._exit(EXIT_ABORTED)
            loop.request_stop()

        signal.signal(signal.SIGTERM, on_term)
        return loop.run()

    # ---- readiness ---------------------------------------------------------------------

    def _write_ready_file(self) -> None:
        self._ready_written = True
        log.info("%s: ready (%d children)", self.options.name, len(self.plan.children))
        path = self.options.ready_file
        if path is None:
            return
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(f"{os.getpid()}\n", encoding="ascii")
        partial.replace(path)

    def _remove_ready_file(self) -> None:
        path = self.options.ready_file
        if path is not None and self._ready_written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _import_tasks(pythonpath: Sequence[Path], modules: Sequence[str]) -> bool:
    for entry in reversed(pythonpath):
        if str(entry) not in sys.path:
            sys.path.insert(0, str(entry))
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            log.error("cannot import the task module %r; no worker can start", name)
            return False
    return True


def _set_parent_death_signal(signum: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def configure_logging(name: str) -> None:
    """Log lines to stderr as the app servers do (time, name, pid, level), once per process."""
    root = logging.getLogger()
    if any(getattr(h, "_tiers_jobs", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._tiers_jobs = True  # type: ignore[attr-defined]
    safe = name.replace("%", "%%")
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [{safe}] [%(process)d] [%(levelname)s] %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)


def run_pool(options: WorkerOptions) -> int:
    """Run a worker pool in this process (it becomes the master) until it is stopped.

    Returns the exit status: 0 after SIGTERM/SIGINT, 3 when the task
    modules cannot be imported. Raises JobStoreError when the schema cannot
    be installed (the database is unreachable).
    """
    configure_logging(options.name)
    return Master(options).run()
