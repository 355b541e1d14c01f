"""The supervisor's decisions, without processes, threads or clocks of its own.

The runner feeds events in (a process was spawned, became ready, exited; a
stop was asked for) with the current time, and asks :meth:`Plan.decide` what
to do now. The answer is a list of actions (start, stop gracefully, kill) that
the runner carries out. Because nothing here touches the operating system,
every rule (dependency order, restart with exponential backoff, giving up on
a service that crashes on every start, reverse-order graceful shutdown with a
SIGKILL deadline) is tested as plain function calls.

Service states and the events that move them:

    PENDING    --start-->   STARTING   (its dependencies are READY)
    STARTING   --ready-->   READY
    STARTING   --exit/launch failure/readiness deadline-->  RESTARTING | FAILED
    READY      --exit-->    RESTARTING | FAILED
    RESTARTING --backoff over-->  STARTING
    any        --stop-->    STOPPING (has a process) | STOPPED (has none)
    STOPPING   --exit-->    STOPPED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tiers.config.model import SupervisorConfig

# A service that stayed ready this long before exiting counts as having worked:
# its crash is a fresh incident, not one more failed start.
STABLE_AFTER = 10.0


class ServiceState(enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Phase(enum.Enum):
    """Where the stack as a whole is."""

    STARTING = "starting"  # not every service has been ready yet
    RUNNING = "running"  # every service was ready at least once
    FAILED = "failed"  # a service gave up before the stack was ever up
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Start:
    name: str


@dataclass(frozen=True)
class Stop:
    """Ask the process to stop gracefully (its own stop signal)."""

    name: str


@dataclass(frozen=True)
class Kill:
    """Stop the process and its whole process group now (SIGKILL)."""

    name: str


Action = Start | Stop | Kill


@dataclass
class Service:
    """What the plan knows of one service."""

    name: str
    depends: tuple[str, ...] = ()
    state: ServiceState = ServiceState.PENDING
    pid: int | None = None
    launching: bool = False  # a Start was issued and neither spawned nor failed yet
    restarts: int = 0
    failed_starts: int = 0
    next_start_at: float = 0.0
    ready_deadline: float = 0.0
    ready_at: float | None = None
    stop_deadline: float | None = None
    killed: bool = False
    last_error: str = ""


@dataclass
class Plan:
    """Desired-versus-actual state of every service, in dependency order."""

    services: list[Service]
    config: SupervisorConfig = field(default_factory=SupervisorConfig)
    stopping: bool = False
    ever_running: bool = False

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.services}
        for service in self.services:
            for dep in service.depends:
                if dep not in self._by_name:
                    raise ValueError(f"{service.name} depends on unknown service {dep}")

    def get(self, name: str) -> Service:
        return self._by_name[name]

    # ---- events -------------------------------------------------------------

    def spawned(self, name: str, pid: int, now: float) -> None:
        service = self.get(name)
        service.launching = False
        service.pid = pid
        service.killed = False
        service.ready_deadline = now + self.config.ready_timeout

    def launch_failed(self, name: str, reason: str, now: float) -> None:
        service = self.get(name)
        service.launching = False
        service.last_error = reason
        if self.stopping:
            service.state = ServiceState.STOPPED
            return
        self._crashed(service, now, counts_as_failed=True)

    def ready(self, name: str, now: float) -> None:
        service = self.get(name)
        if service.state is ServiceState.STARTING and service.pid is not None:
            service.state = ServiceState.READY
            service.ready_at = now
            service.last_error = ""
            if all(s.state is ServiceState.READY for s in self.services):
                self.ever_running = True

    def exited(self, name: str, code: int, now: float) -> None:
        service = self.get(name)
        service.pid = None
        if service.state is ServiceState.STOPPING or self.stopping:
            service.state = ServiceState.STOPPED
            service.stop_deadline = None
            return
        if not service.killed:  # when we killed it, the reason we did is the news
            service.last_error = f"exited with code {code}"
        stable = (service.state is ServiceState.READY and service.ready_at is not None
                  and now - service.ready_at >= STABLE_AFTER)
        self._crashed(service, now, counts_as_failed=not stable)

    def start_failed(self, name: str, reason: str) -> list[Action]:
        """The process runs but cannot serve (e.g. its post-start step failed): kill it."""
        service = self.get(name)
        service.last_error = reason
        if service.pid is None or service.killed:
            return []
        service.killed = True
        return [Kill(name)]

    def request_stop(self) -> None:
        self.stopping = True

    # ---- decisions ----------------------------------------------------------

    def decide(self, now: float) -> list[Action]:
        """The actions to carry out now; updates states as if they were done."""
        return self._decide_stopping(now) if self.stopping else self._decide_running(now)

    def _decide_running(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for service in self.services:
            state = service.state
            if state is ServiceState.PENDING or (
                    state is ServiceState.RESTARTING and now >= service.next_start_at):
                if self._deps_ready(service):
                    service.state = ServiceState.STARTING
                    service.launching = True
                    actions.append(Start(service.name))
            elif (state is ServiceState.STARTING and service.pid is not None
                  and not service.killed and now >= service.ready_deadline):
                service.killed = True
                service.last_error = f"not ready within {self.config.ready_timeout:g}s"
                actions.append(Kill(service.name))
        return actions

    def _decide_stopping(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for service in reversed(self.services):
            if service.launching:
                continue  # its spawn result decides what happens next
            if service.pid is None:
                if service.state is not ServiceState.STOPPED:
                    service.state = ServiceState.STOPPED
                continue
            if service.state is ServiceState.STOPPING:
                assert service.stop_deadline is not None
                if now >= service.stop_deadline and not service.killed:
                    service.killed = True
                    actions.append(Kill(service.name))
            elif self._dependents_stopped(service):
                service.state = ServiceState.STOPPING
                service.stop_deadline = now + self.config.stop_timeout
                actions.append(Stop(service.name))
        return actions

    # ---- the stack as a whole -----------------------------------------------

    def phase(self) -> Phase:
        if self.stopping:
            if all(s.state is ServiceState.STOPPED and not s.launching for s in self.services):
                return Phase.STOPPED
            return Phase.STOPPING
        if self.ever_running:
            return Phase.RUNNING
        if any(s.state is ServiceState.FAILED for s in self.services):
            return Phase.FAILED
        return Phase.STARTING

    def next_wakeup(self, now: float) -> float:
        """Seconds until a timed decision may change (for the runner's sleep)."""
        times = [s.next_start_at for s in self.services if s.state is ServiceState.RESTARTING]
        times += [s.ready_deadline for s in self.services
                  if s.state is ServiceState.STARTING and s.pid is not None]
        times += [s.stop_deadline for s in self.services if s.stop_deadline is not None]
        upcoming = [t - now for t in times if t > now]
        return min(upcoming, default=1.0)

    # ---- helpers ------------------------------------------------------------

    def _crashed(self, service: Service, now: float, *, counts_as_failed: bool) -> None:
        service.failed_starts = service.failed_starts + 1 if counts_as_failed else 1
        service.ready_at = None
        if counts_as_failed and service.failed_starts >= self.config.max_failed_starts:
            service.state = ServiceState.FAILED
            return
        service.restarts += 1
        delay = self.config.backoff_initial * 2 ** (service.failed_starts - 1)
        service.state = ServiceState.RESTARTING
        service.next_start_at = now + min(delay, self.config.backoff_max)

    def _deps_ready(self, service: Service) -> bool:
        return all(self.get(d).state is ServiceState.READY for d in service.depends)

    def _dependents_stopped(self, service: Service) -> bool:
        return all(other.state is ServiceState.STOPPED and not other.launching
                   for other in self.services if service.name in other.depends)
