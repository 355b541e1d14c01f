"""Cache-tier decisions without I/O: when a node is used, skipped or probed; how copies are read.

Plain state and decisions, no I/O and no clock of its own: callers pass
``now`` (seconds on a monotonic clock) and act on what is returned
(``tiers.cache.routing`` routes around ejected nodes; ``tiers.cache.nodes``
reports how each request ended).

Each node is in one of three states:

    UP        requests go to it; ``failure_limit`` failures in a row eject it
    EJECTED   requests skip it (its keys go to the next node on the ring, or
              to the gutter pool) until ``dead_timeout`` seconds have passed
    PROBING   the dead timeout is over and exactly one request has been let
              through to test it: success rejoins the node, failure ejects it
              for another ``dead_timeout``; everyone else keeps skipping it.
              A probe that never reports back (its caller vanished) is given
              up after ``probe_timeout`` and the next request probes instead.

Only a failure that says the node itself is unwell counts (refused or reset
connections, timeouts, a garbled stream); an error answer from a healthy
node does not. Failures reported for a node that is already ejected come
from requests sent before the ejection and change nothing, and so do their
successes: only the probe brings a node back.

Defaults suit a local cluster, where a refused connection is certain and
cheap to see: two failures in a row eject (one can be a stale pooled
connection), and two seconds out (libmemcached's retry timeout) bounds how
long a restarted node waits to rejoin while keeping a dead one from adding
a failed round trip to every request. Across a real network, raise both.

A ``FailurePolicy`` is not thread-safe by itself; the cluster holds its lock
around every call but ``up``, a single read that changes nothing.

Copies. ``replicated(R, read=...)`` and ``hot(D)`` are the rules that give a
key copies (``tiers.cache.routing`` places them); ``required_copies`` is how
many must answer a confirmed write, and a ``ReadPlan`` decides, answer by
answer, which copies a read asks next and when it is settled: one copy at a
time until a hit (plain keys, ``"first"``), one random copy whose miss is
final (hot keys), or every copy at once and the value a majority of R holds
(``"majority"``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar


class NodeHealth(enum.Enum):
    """Where a node stands with the failure policy."""

    UP = "up"
    EJECTED = "ejected"
    PROBING = "probing"


class Admission(enum.Enum):
    """What a request may do with a node now."""

    USE = "use"  # the node is up
    PROBE = "probe"  # this request tests an ejected node whose dead timeout is over
    SKIP = "skip"  # ejected, or another request is probing it: go elsewhere


class Transition(enum.Enum):
    """A change of state the caller may log or count."""

    EJECTED = "ejected"
    REJOINED = "rejoined"


class _Event(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # below the limit
    FAILURE_LIMIT = "failure_limit"  # the streak reached failure_limit
    TIMEOUT_OVER = "timeout_over"  # a request arrives after the dead (or probe) timeout


# The one transition table: (state, event) -> new state. Pairs not listed leave
# the state as it is (a late failure or success for an ejected node, say).
_TRANSITIONS: Final[dict[tuple[NodeHealth, _Event], NodeHealth]] = {
    (NodeHealth.UP, _Event.FAILURE_LIMIT): NodeHealth.EJECTED,
    (NodeHealth.EJECTED, _Event.TIMEOUT_OVER): NodeHealth.PROBING,
    (NodeHealth.PROBING, _Event.TIMEOUT_OVER): NodeHealth.PROBING,  # a new probe
    (NodeHealth.PROBING, _Event.SUCCESS): NodeHealth.UP,
    (NodeHealth.PROBING, _Event.FAILURE): NodeHealth.EJECTED,
    (NodeHealth.PROBING, _Event.FAILURE_LIMIT): NodeHealth.EJECTED,
}


@dataclass(frozen=True, slots=True)
class FailureSettings:
    """Timeouts and ejection rules for the nodes of one cluster.

    ``connect_timeout`` and ``timeout`` (per read or write on the socket) are
    handed to the node client factory; the rest drive ``FailurePolicy``.
    """

    failure_limit: int = 2
    dead_timeout: float = 2.0
    connect_timeout: float = 0.25
    timeout: float = 0.5
    # How long a probe may stay unanswered before another request probes.
    probe_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.failure_limit < 1:
            raise ValueError("failure_limit must be at least 1")
        for name in ("dead_timeout", "connect_timeout", "timeout", "probe_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class _Node:
    __slots__ = ("ejections", "failures", "health", "until")

    def __init__(self) -> None:
        self.health = NodeHealth.UP
        self.failures = 0  # the current streak
        self.until = 0.0  # end of the dead timeout, or of the probe's grace
        self.ejections = 0


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node's failure state as plain data (for metrics and the console)."""

    health: NodeHealth
    failures: int
    ejections: int
    # Seconds until the node may be probed (0 when up or probing).
    retry_in: float


class FailurePolicy:
    """The failure state of ``count`` nodes, indexed 0..count-1."""

    def __init__(self, count: int, settings: FailureSettings | None = None) -> None:
        self.settings = settings or FailureSettings()
        self._nodes = [_Node() for _ in range(count)]

    def __len__(self) -> int:
        return len(self._nodes)

    def _move(self, node: _Node, event: _Event, now: float) -> Transition | None:
        before = node.health
        after = _TRANSITIONS.get((before, event), before)
        node.health = after
        if after is NodeHealth.EJECTED and before is not NodeHealth.EJECTED:
            node.until = now + self.settings.dead_timeout
            node.failures = 0
            if before is NodeHealth.UP:
                node.ejections += 1  # a failed probe is the same outage, not a new one
                return Transition.EJECTED
            return None
        if after is NodeHealth.PROBING:
            node.until = now + self.settings.probe_timeout
        elif after is NodeHealth.UP and before is not NodeHealth.UP:
            node.failures = 0
            return Transition.REJOINED
        return None

    def admit(self, index: int, now: float) -> Admission:
        """Whether a request may go to node ``index`` now.

        ``PROBE`` is given to one request at a time once the dead timeout is
        over: its caller must report the outcome with ``succeeded`` or
        ``failed``.
        """
        node = self._nodes[index]
        if node.health is NodeHealth.UP:
            return Admission.USE
        if now < node.until:
            return Admission.SKIP
        self._move(node, _Event.TIMEOUT_OVER, now)
        return Admission.PROBE

    def up(self, index: int) -> bool:
        """Whether node ``index`` is up, so that ``admit`` would answer ``USE``.

        Safe without the lock that guards the other methods: it reads one
        field, and a node found up is used just as if ``admit`` had been asked
        at that moment (``admit`` changes nothing for an up node).
        """
        return self._nodes[index].health is NodeHealth.UP

    def available(self, index: int, now: float) -> bool:
        """Whether ``admit`` would let a request through, without claiming a probe."""
        node = self._nodes[index]
        return node.health is NodeHealth.UP or now >= node.until

    def succeeded(self, index: int, now: float) -> Transition | None:
        """Record a good exchange with node ``index``; ``REJOINED`` when a probe succeeded."""
        node = self._nodes[index]
        if node.health is NodeHealth.UP:
            node.failures = 0
            return None
        return self._move(node, _Event.SUCCESS, now)

    def failed(self, index: int, now: float) -> Transition | None:
        """Record a node failure of ``index``; ``EJECTED`` when it ends an up node's streak.

        A failed probe ejects the node again for another ``dead_timeout``
        without reporting a new transition (it was never back).
        """
        node = self._nodes[index]
        if node.health is NodeHealth.EJECTED:
            return None
        node.failures += 1
        limit = node.failures >= self.settings.failure_limit
        return self._move(node, _Event.FAILURE_LIMIT if limit else _Event.FAILURE, now)

    def health(self, index: int) -> NodeHealth:
        """Node ``index``'s state."""
        return self._nodes[index].health

    def status(self, index: int, now: float) -> NodeStatus:
        """Node ``index``'s state as plain data."""
        node = self._nodes[index]
        retry_in = max(0.0, node.until - now) if node.health is NodeHealth.EJECTED else 0.0
        return NodeStatus(node.health, node.failures, node.ejections, retry_in)


# ---- copies ---------------------------------------------------------------------------


class ReadMode(enum.Enum):
    """How a replicated key is read."""

    MAJORITY = "majority"
    FIRST = "first"


class Quorum(enum.Enum):
    """How many copies must answer a write that asked for confirmation."""

    ALL = "all"
    MAJORITY = "majority"


@dataclass(frozen=True, slots=True)
class Replicated:
    """The same key on ``copies`` nodes, read by majority or first hit."""

    copies: int
    read: ReadMode = ReadMode.MAJORITY


@dataclass(frozen=True, slots=True)
class Hot:
    """``copies`` distinct keys on distinct nodes, one read at random."""

    copies: int


CopyRule = Replicated | Hot


def replicated(copies: int, read: str = "majority") -> Replicated:
    """A rule keeping ``copies`` copies, read by ``"majority"`` or ``"first"`` hit."""
    if copies < 1:
        raise ValueError("a replicated key needs at least one copy")
    return Replicated(copies, ReadMode(read))


def hot(copies: int) -> Hot:
    """A rule spreading a hot key over ``copies`` nodes."""
    if copies < 1:
        raise ValueError("a hot key needs at least one copy")
    return Hot(copies)


def required_copies(rule: CopyRule | None, nodes: int, quorum: Quorum) -> int:
    """How many copies must answer a confirmed write under ``rule`` with ``nodes`` nodes."""
    if rule is None:
        return 1
    copies = min(rule.copies, nodes)
    return copies if quorum is Quorum.ALL else copies // 2 + 1


class Placed(Protocol):
    """A copy to ask: anything that says which node it is on."""

    @property
    def member(self) -> object: ...


P = TypeVar("P", bound=Placed)


class ReadShape(enum.Enum):
    ONE = "one"  # copies one at a time, in order, until one hits (plain keys, "first")
    ANY = "any"  # hot: one copy; its miss is final, its error tries another
    MAJORITY = "majority"  # every copy at once; the value ``needed`` of them hold


class ReadPlan(Generic[P]):
    """How one key of a read is asked for, and what was learnt so far."""

    __slots__ = ("found", "needed", "shape", "targets", "unroutable", "value", "votes")

    def __init__(self, shape: ReadShape, targets: list[P], needed: int = 1) -> None:
        self.shape = shape
        self.targets = targets
        self.needed = needed
        self.unroutable = not targets  # no live node could take the key
        self.votes: list[object] = []
        self.found = False
        self.value: object = None

    @classmethod
    def for_rule(cls, rule: CopyRule, targets: list[P], nodes: int) -> ReadPlan[P]:
        """The plan for a key with copies; ``targets`` in ring order (hot: already shuffled)."""
        if isinstance(rule, Hot):
            return cls(ReadShape.ANY, targets)
        if rule.read is ReadMode.FIRST:
            return cls(ReadShape.ONE, targets)
        return cls(ReadShape.MAJORITY, targets, min(rule.copies, nodes) // 2 + 1)

    def asking(self) -> list[P]:
        """The copies to ask in the next round (none once settled)."""
        if self.found or not self.targets:
            return []
        if self.shape is ReadShape.MAJORITY:
            asked, self.targets = self.targets, []
            return asked
        return self.targets[:1]

    def hit(self, member: object, value: object) -> None:
        """The copy on ``member`` holds ``value``."""
        if self.shape is ReadShape.MAJORITY:
            self.votes.append(value)
            if sum(1 for vote in self.votes if vote == value) < self.needed:
                return
        self.found = True
        self.value = value
        self.targets = []

    def missed(self, member: object) -> None:
        """The copy on ``member`` does not hold the key."""
        if self.shape is ReadShape.ANY:
            self.targets = []
        else:
            self.failed(member)

    def failed(self, member: object) -> None:
        """Asking ``member`` failed: try the next copy, if the shape allows."""
        self.targets = [t for t in self.targets if t.member is not member]
