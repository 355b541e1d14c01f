"""The supervisor's hands: spawn, probe, signal and reap the processes the plan asks for.

One loop in the main thread owns every process: it is the only place that
forks (so the parent-death signal children get is tied to a thread that lives
as long as the supervisor), and the only place that reaps. Slow work runs in
short-lived threads that report back through a queue: preparing a service
(initdb, base backup) and probing it until it is ready. Signal handlers only
set a flag; the loop turns it into a stop request.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import psutil

from tiers.supervisor.plan import Kill, Phase, Plan, Service, ServiceState, Start, Stop
from tiers.supervisor.statedir import StateDir

_PR_SET_PDEATHSIG = 1
PROBE_INTERVAL = 0.1


@dataclass(frozen=True)
class Command:
    """One process to spawn: its argv, extra environment and subprocess options."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    popen_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service. Callables run in helper threads and raise on failure."""

    name: str
    role: str
    address: str
    # Runs before every spawn and returns what to spawn; idempotent, it creates what
    # is missing (initdb, a base backup) and finds what an earlier run made.
    prepare: Callable[[], Command]
    depends: tuple[str, ...] = ()
    stop_signal: int = signal.SIGTERM
    # One readiness attempt; raises while the service is not ready.
    probe: Callable[[], None] = lambda: None
    # Once per spawn, after the first successful probe (e.g. migrations).
    after_ready: Callable[[], None] | None = None


@dataclass
class _Prepared:
    name: str
    command: Command | None
    error: str | None


@dataclass
class _Probed:
    name: str
    pid: int
    error: str | None


@dataclass
class _KillRequest:
    name: str
    reason: str


class Runner:
    """Carries out a :class:`Plan` for a list of specs, writing status as it goes."""

    def __init__(self, specs: Sequence[ServiceSpec], plan: Plan, state: StateDir,
                 say: Callable[[str], None] | None = None,
                 control: Callable[[], None] | None = None) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.plan = plan
        self.state = state
        self.say = say or say_stderr
        self._events: queue.Queue[_Prepared | _Probed | _KillRequest] = queue.Queue()
        # Runs in the loop after SIGUSR1: the CLI's way to hand the supervisor a request.
        self._control = control
        self._control_requested = False
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._gone: dict[str, threading.Event] = {}
        self._leftovers: dict[str, list[psutil.Process]] = {}
        self._stop_requested = False
        self._force_requested = False
        self._started_at = time.time()

    # ---- entry points -------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Safe from a signal handler: only sets flags the loop reads.

        A second request while stopping (Ctrl-C pressed again) kills what is left.
        """
        if self._stop_requested:
            self._force_requested = True
        self._stop_requested = True

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.request_stop)
        signal.signal(signal.SIGUSR1, self._request_control)

    def _request_control(self, *_: object) -> None:
        self._control_requested = True

    def request_kill(self, name: str, reason: str) -> None:
        """From any thread: kill ``name`` as a service that cannot serve (then restart it)."""
        self._events.put(_KillRequest(name, reason))

    def is_ready(self, name: str) -> bool:
        """From any thread: whether ``name`` is up and has passed its readiness probe."""
        return self.plan.get(name).state is ServiceState.READY

    def run(self) -> Phase:
        """Loop until every service is stopped; returns the phase the stack ended in."""
        last_phase: Phase | None = None
        failed_reported = False
        try:
            while True:
                now = time.monotonic()
                self._drain_events(now)
                self._reap(now)
                if self._stop_requested and not self.plan.stopping:
                    self.say("stopping the stack (again to kill at once)")
                    self.plan.request_stop()
                if self._control_requested and self._control is not None:
                    self._control_requested = False
                    self._control()
                if self._force_requested:
                    self._force_requested = False
                    self.say("killing every service now")
                    for name in list(self._procs):
                        _signal_group(self._procs[name].pid, signal.SIGKILL)
                for action in self.plan.decide(time.monotonic()):
                    self._act(action)
                phase = self.plan.phase()
                if phase is not last_phase:
                    if phase is Phase.RUNNING:
                        self.say("all services are ready")
                    last_phase = phase
                if phase is Phase.FAILED and not failed_reported:
                    failed_reported = True
                    failed = [s.name for s in self.plan.services
                              if s.state is ServiceState.FAILED]
                    self.say(f"giving up: {', '.join(failed)} failed on every start")
                    self._stop_requested = True
                self._write_status()
                if phase is Phase.STOPPED:
                    return Phase.FAILED if failed_reported else Phase.STOPPED
                self._wait(min(PROBE_INTERVAL, self.plan.next_wakeup(time.monotonic())))
        finally:
            self._kill_everything()
            self._write_status()

    # ---- actions ------------------------------------------------------------

    def _act(self, action: Start | Stop | Kill) -> None:
        spec = self.specs[action.name]
        if isinstance(action, Start):
            self._kill_group_leftovers(spec.name)
            threading.Thread(target=self._prepare, args=(spec,), daemon=True,
                             name=f"prepare-{spec.name}").start()
        elif isinstance(action, Stop):
            proc = self._procs.get(spec.name)
            if proc is not None:
                self.say(f"{spec.name}: stopping (pid {proc.pid})")
                _signal(proc.pid, spec.stop_signal)
        else:
            proc = self._procs.get(spec.name)
            if proc is not None:
                reason = self.plan.get(spec.name).last_error
                self.say(f"{spec.name}: killing (pid {proc.pid}){': ' + reason if reason else ''}")
                _signal_group(proc.pid, signal.SIGKILL)

    def _prepare(self, spec: ServiceSpec) -> None:
        try:
            command = spec.prepare()
        except Exception as exc:  # any failure is a failed start
            self._events.put(_Prepared(spec.name, None, f"prepare failed: {exc}"))
        else:
            self._events.put(_Prepared(spec.name, command, None))

    def _spawn(self, spec: ServiceSpec, command: Command, now: float) -> None:
        if self.plan.stopping:
            self.plan.launch_failed(spec.name, "stack is stopping", now)
            return
        try:
            with open(self.state.log_path(spec.name), "ab") as log:
                proc = subprocess.Popen(
                    list(command.argv), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env={**os.environ, **command.env},
                    start_new_session=True, close_fds=True,
                    preexec_fn=_die_with_parent(spec.stop_signal), **command.popen_kwargs)
        except OSError as exc:
            self.say(f"{spec.name}: cannot start: {exc}")
            self.plan.launch_failed(spec.name, f"cannot start: {exc}", now)
            return
        self._procs[spec.name] = proc
        gone = threading.Event()
        self._gone[spec.name] = gone
        self.plan.spawned(spec.name, proc.pid, now)
        self.say(f"{spec.name}: started (pid {proc.pid}) {spec.address}")
        threading.Thread(target=self._probe, args=(spec, proc.pid, gone), daemon=True,
                         name=f"probe-{spec.name}").start()

    def _probe(self, spec: ServiceSpec, pid: int, gone: threading.Event) -> None:
        """Probe until ready, the process is gone, or the plan's deadline kills it."""
        while not gone.is_set():
            try:
                spec.probe()
            except Exception:  # not ready yet: try again shortly
                gone.wait(PROBE_INTERVAL)
                continue
            error = None
            if spec.after_ready is not None:
                try:
                    spec.after_ready()
                except Exception as exc:
                    error = f"after start: {exc}"
            self._events.put(_Probed(spec.name, pid, error))
            return

    # ---- events -------------------------------------------------------------

    def _wait(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=max(timeout, 0.005))
        except queue.Empty:
            return
        self._events.put(event)  # handled in order by _drain_events

    def _drain_events(self, now: float) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, _KillRequest):
                self.say(f"{event.name}: {event.reason}")
                for action in self.plan.start_failed(event.name, event.reason):
                    self._act(action)
            elif isinstance(event, _Prepared):
                if event.command is not None:
                    self._spawn(self.specs[event.name], event.command, now)
                else:
                    error = event.error or "prepare failed"
                    self.say(f"{event.name}: {error}")
                    self.plan.launch_failed(event.name, error, now)
            else:
                service = self.plan.get(event.name)
                if service.pid != event.pid:
                    continue  # a probe of a process that has since exited
                if event.error is None:
                    self.plan.ready(event.name, now)
                    self.say(f"{event.name}: ready")
                else:
                    self.say(f"{event.name}: {event.error}")
                    for action in self.plan.start_failed(event.name, event.error):
                        self._act(action)

    def _reap(self, now: float) -> None:
        for name, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._procs[name]
            self._gone.pop(name).set()
            # Orphaned children (a prefork server's workers, a database's backends)
            # would hold its port; they go with their leader, gracefully first.
            members = _group_members(proc.pid)
            for process in members:
                _signal(process.pid, signal.SIGTERM)
            self._leftovers[name] = members
            was = self.plan.get(name).state
            self.plan.exited(name, code, now)
            if was is not ServiceState.STOPPING:
                after = self.plan.get(name)
                what = ("giving up" if after.state is ServiceState.FAILED
                        else f"restart #{after.restarts} in "
                             f"{max(after.next_start_at - now, 0):.1f}s"
                        if after.state is ServiceState.RESTARTING else "stopped")
                self.say(f"{name}: exited with code {code}; {what}")
            else:
                self.say(f"{name}: stopped")

    # ---- cleanup ------------------------------------------------------------

    def _kill_group_leftovers(self, name: str) -> None:
        """Before a restart, nothing of the previous run may still hold the port."""
        leftovers = [p for p in self._leftovers.pop(name, []) if p.is_running()]
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftovers, timeout=2.0)

    def _kill_everything(self) -> None:
        for name, proc in list(self._procs.items()):
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            self.plan.exited(name, proc.returncode or -9, time.monotonic())
            self._gone.pop(name).set()
        self._procs.clear()
        # Members that outlived their leader had SIGTERM when it was reaped.
        leftovers = [p for members in self._leftovers.values() for p in members]
        _, alive = psutil.wait_procs(leftovers, timeout=2.0)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        self._leftovers.clear()

    def _write_status(self) -> None:
        services = []
        for service in self.plan.services:
            spec = self.specs[service.name]
            services.append(_service_status(spec, service, self._procs.get(service.name)))
        self.state.write_status({
            "supervisor_pid": os.getpid(),
            "started_at": self._started_at,
            "phase": self.plan.phase().value,
            "services": services,
        })


def _service_status(spec: ServiceSpec, service: Service,
                    proc: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    created = None
    if proc is not None:
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = None
    return {
        "name": spec.name,
        "role": spec.role,
        "address": spec.address,
        "state": service.state.value,
        "pid": proc.pid if proc is not None else None,
        "pid_created": created,
        "restarts": service.restarts,
        "last_error": service.last_error,
    }


def _die_with_parent(signum: int) -> Callable[[], None]:
    """A preexec function: the child gets ``signum`` when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)

    def set_parent_death_signal() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)

    return set_parent_death_signal


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def say_stderr(message: str) -> None:
    _write_line(sys.stderr, message)


def _write_line(stream: TextIO, message: str) -> None:
    stream.write(f"{time.strftime('%H:%M:%S')} tiers | {message}\n")
    stream.flush()
