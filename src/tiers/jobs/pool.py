"""The worker master's decisions, without processes, signals or clocks of its own.

The master (:mod:`tiers.jobs.master`) feeds events in (a child was forked,
reported ready or busy, exited; a signal asked to stop, abort or reload)
with the current time, and asks :meth:`PoolPlan.decide` what to do now. The
answer is a list of actions the master carries out: fork a child into a
slot, send it SIGTERM or SIGKILL, release a dead child's jobs in the
database. So every rule is tested as plain function calls:

* Each slot (``processes`` worker slots, and one scheduler slot if asked)
  always has a child while the pool runs. A child that exits is replaced at
  once if it had been working: it had reported ready (connected), whether it
  was recycled after its ``max_jobs``, killed by the master for overrunning a
  job, or killed by anyone else. A child that dies before it is ready, or
  gives up on an unreachable database, is replaced after an exponential
  backoff (``backoff_initial`` doubling to ``backoff_max``), so a crash loop
  does not spin. (A job that kills every child that runs it is buried after
  its ``max_attempts``.)
* A child that exited uncleanly may have held a job: its jobs are released
  (due again at once, or dead on their last attempt) without waiting for
  their lease to expire.
* A worker whose current job runs past its deadline is killed (SIGKILL)
  and replaced; its job is released with the reason.
* Stop (SIGTERM, SIGINT): every child is asked to finish its job and exit
  (SIGTERM); those still running ``graceful_timeout`` later are killed. A
  second stop request kills them at once. Either way, a job cut short is
  released, to be retried.
* Reload (SIGHUP): a new child is started in every slot at once, and the
  old ones are asked to finish their jobs and exit (killed past
  ``graceful_timeout``).
* A child that cannot import the task modules (EXIT_BOOT) stops the whole
  pool: replacing it cannot help. The master then exits with EXIT_BOOT.

Slots, children and the transitions of a child:

    forked --ready--> idle <--> busy(job, deadline)
       any --exit--> gone (replaced, released as above)
       any --stop/reload--> retiring (SIGTERM) --graceful_timeout--> killed
       busy past deadline --> killed
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from tiers.jobs.child import EXIT_BOOT, EXIT_DB, EXIT_OK


class Kind(enum.Enum):
    WORKER = "worker"
    SCHEDULER = "scheduler"


class Phase(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Spawn:
    """Fork a child into ``slot``; a worker exits after ``max_jobs`` jobs (0: never)."""

    slot: int
    kind: Kind
    max_jobs: int


@dataclass(frozen=True)
class Terminate:
    """SIGTERM: finish the running job, then exit."""

    pid: int


@dataclass(frozen=True)
class Kill:
    """SIGKILL, now; ``reason`` is logged and becomes the released jobs' error."""

    pid: int
    reason: str


@dataclass(frozen=True)
class Release:
    """Make the running jobs of ``worker_id`` due again (or dead on their last attempt)."""

    worker_id: str
    reason: str


Action = Spawn | Terminate | Kill | Release


@dataclass
class Slot:
    index: int
    kind: Kind
    pid: int | None = None  # its current child; a retiring one no longer counts
    failures: int = 0
    next_spawn_at: float = 0.0


@dataclass
class Child:
    pid: int
    slot: int
    kind: Kind
    worker_id: str
    started_at: float
    ready: bool = False
    job: int | None = None
    deadline: float | None = None
    retiring: bool = False
    stop_deadline: float | None = None
    killed: bool = False
    kill_reason: str = ""


@dataclass
class PoolPlan:
    """Desired versus actual children of one worker master."""

    processes: int
    scheduler: bool = False
    graceful_timeout: float = 10.0
    max_jobs: int = 1000
    max_jobs_jitter: int = 100
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    rand: Callable[[int, int], int] = random.randint
    phase: Phase = Phase.RUNNING
    exit_code: int = EXIT_OK
    slots: list[Slot] = field(default_factory=list)
    children: dict[int, Child] = field(default_factory=dict)
    _pending: list[Action] = field(default_factory=list)

    def __post_init__(self) -> None:
        kinds = [Kind.WORKER] * self.processes + ([Kind.SCHEDULER] if self.scheduler else [])
        self.slots = [Slot(index, kind) for index, kind in enumerate(kinds)]

    # ---- events ---------------------------------------------------------------------

    def spawned(self, slot: int, pid: int, worker_id: str, now: float) -> None:
        """A child was forked into ``slot``."""
        kind = self.slots[slot].kind
        self.slots[slot].pid = pid
        self.children[pid] = Child(pid=pid, slot=slot, kind=kind, worker_id=worker_id,
                                   started_at=now)

    def spawn_failed(self, slot: int, now: float) -> None:
        """fork() itself failed (no memory, too many processes): try again after backoff."""
        self._back_off(self.slots[slot], now)

    def observed(self, pid: int, *, ready: bool, job: int | None,
                 deadline: float | None) -> None:
        """What the child reports of itself: ready, and the job it runs with its deadline."""
        child = self.children.get(pid)
        if child is None:
            return
        child.ready = child.ready or ready
        child.job, child.deadline = (job, deadline) if job is not None else (None, None)

    def exited(self, pid: int, status: int, now: float) -> None:
        """A child ended: ``status`` is its exit code, or minus the signal that killed it."""
        child = self.children.pop(pid, None)
        if child is None:
            return
        slot = self.slots[child.slot]
        if slot.pid == pid:
            slot.pid = None
        clean = status == EXIT_OK and not child.killed
        if not clean and child.kind is Kind.WORKER:
            reason = child.kill_reason or (
                f"worker {child.worker_id} " + (f"was killed by signal {-status}" if status < 0
                                                else f"exited with status {status}"))
            self._pending.append(Release(child.worker_id, reason))
        if status == EXIT_BOOT and self.phase is Phase.RUNNING:
            self.exit_code = EXIT_BOOT
            self._begin_stop(now)
            return
        if self.phase is not Phase.RUNNING or child.retiring or slot.pid is not None:
            return
        if child.killed or (child.ready and status != EXIT_DB):
            slot.failures = 0
            slot.next_spawn_at = now  # it worked: a death mid-work is not a failed start
        else:
            self._back_off(slot, now)

    def request_stop(self, now: float) -> None:
        """Graceful stop; asked again while stopping, abort."""
        if self.phase is Phase.RUNNING:
            self._begin_stop(now)
        else:
            self.request_abort()

    def request_abort(self) -> None:
        """Kill every child now; their jobs are released."""
        if self.phase is Phase.RUNNING:
            self.phase = Phase.STOPPING
        for child in self.children.values():
            if not child.killed:
                self._pending.append(self._kill(child, (
                    f"worker {child.worker_id} was stopped at once (abort) in the middle "
                    f"of its job")))

    def request_reload(self, now: float) -> None:
        """Replace every child: new ones start now, the old finish their jobs and exit."""
        if self.phase is not Phase.RUNNING:
            return
        for child in self.children.values():
            if not child.retiring:
                self._retire(child, now)
        for slot in self.slots:
            slot.pid = None
            slot.next_spawn_at = now
            slot.failures = 0

    # ---- decisions ------------------------------------------------------------------

    def decide(self, now: float) -> list[Action]:
        """The actions to carry out now; updates the plan as if they were done."""
        actions, self._pending = self._pending, []
        for child in self.children.values():
            if child.killed:
                continue
            if child.stop_deadline is not None and now >= child.stop_deadline:
                what = "stopping" if self.phase is not Phase.RUNNING else "being replaced"
                actions.append(self._kill(child, (
                    f"worker {child.worker_id} did not finish its job within the graceful "
                    f"timeout of {self.graceful_timeout:g}s while {what}")))
            elif (child.kind is Kind.WORKER and child.deadline is not None
                  and now >= child.deadline and child.job is not None):
                actions.append(self._kill(child, (
                    f"job {child.job} ran past its timeout on worker {child.worker_id}, "
                    f"which was killed")))
        if self.phase is Phase.RUNNING:
            for slot in self.slots:
                if slot.pid is None and now >= slot.next_spawn_at:
                    actions.append(Spawn(slot.index, slot.kind, self._max_jobs(slot.kind)))
                    # Marked taken until the master reports the fork (or its failure).
                    slot.pid = -1
        elif not self.children:
            self.phase = Phase.STOPPED
        return actions

    def next_wakeup(self, now: float) -> float:
        """Seconds until a timed decision may change (the master also wakes on events)."""
        times = [c.stop_deadline for c in self.children.values()
                 if c.stop_deadline is not None and not c.killed]
        times += [c.deadline for c in self.children.values()
                  if c.deadline is not None and not c.killed]
        if self.phase is Phase.RUNNING:
            times += [s.next_spawn_at for s in self.slots if s.pid is None]
        upcoming = [t - now for t in times]
        return max(min(upcoming, default=1.0), 0.0)

    def all_ready(self) -> bool:
        """Every slot has a child that reported ready (the pool is up)."""
        return all(slot.pid is not None and slot.pid in self.children
                   and self.children[slot.pid].ready for slot in self.slots)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.STOPPED

    # ---- helpers ----------------------------------------------------------------------

    def _begin_stop(self, now: float) -> None:
        self.phase = Phase.STOPPING
        for child in self.children.values():
            if not child.retiring:
                self._retire(child, now)

    def _retire(self, child: Child, now: float) -> None:
        child.retiring = True
        child.stop_deadline = now + self.graceful_timeout
        self._pending.append(Terminate(child.pid))

    def _kill(self, child: Child, reason: str) -> Kill:
        child.killed = True
        child.kill_reason = reason
        return Kill(child.pid, reason)

    def _back_off(self, slot: Slot, now: float) -> None:
        slot.pid = None
        slot.failures += 1
        delay = self.backoff_initial * 2 ** min(slot.failures - 1, 30)
        slot.next_spawn_at = now + min(delay, self.backoff_max)

    def _max_jobs(self, kind: Kind) -> int:
        if kind is not Kind.WORKER or self.max_jobs == 0:
            return 0
        return self.max_jobs + (self.rand(0, self.max_jobs_jitter) if self.max_jobs_jitter
                                else 0)
