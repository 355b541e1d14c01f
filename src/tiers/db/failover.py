"""Failover and switchover decisions for the database tier, without sockets or processes.

The planner reads facts about every node (gathered by a health check, see
:class:`NodeFacts`) and the node tiers currently believes is the primary, and
answers with a :class:`Decision`: the actions to carry out, in order, and a
sentence saying why. :mod:`tiers.db.promote` carries the actions out. The
planner keeps no state of its own: each call starts from the facts, so a
plan interrupted halfway is finished by the next one (every action is
idempotent in the executor, and a half-done failover shows in the facts).

Rules of an unplanned failover (:func:`plan_failover`):

* Never fail over while the believed primary answers, and not before it has
  failed ``policy.failed_checks`` consecutive checks.
* The new primary is the reachable, unfenced replica holding the most WAL
  (received or replayed, whichever is further: promotion replays everything
  received): the first by name whose position has reached every other
  candidate's (:func:`most_advanced`), so two planners given the same facts
  choose the same node. Positions are compared only with ``>=``, so an
  engine whose positions are partly ordered (GTID sets) works too: when no
  candidate holds all that the others hold, nothing is promoted.
* Never two writable primaries: :class:`Fence` (stop the old primary and
  mark it so it can only come back as a replica) is ordered before
  :class:`Promote`, and routers hear of the new primary (:class:`Announce`)
  only after it is writable. If the fence fails the executor stops there
  and nothing is promoted.
* The other replicas follow the new primary (:class:`Repoint`); a fenced
  node is rewound and started as a replica (:class:`Rejoin`), never promoted.
* With no replica to promote, or with more than one writable node, nothing
  is done and the reason says why.

A planned switchover (:func:`plan_switchover`) loses no committed
transaction; the order of its steps is explained on that function.

Replication is asynchronous, so an unplanned failover loses the commits the
old primary had not yet sent to the promoted replica; the switchover does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tiers.db.engine import Engine, Position, default_engine


@dataclass(frozen=True)
class NodeFacts:
    """What one health check learnt about a node.

    ``position`` is the furthest position the node holds (an engine's
    :class:`~tiers.db.engine.Position`; PostgreSQL's WAL position, an int):
    on a replica the further of received and replayed, on a primary its
    current write position; None when unknown. ``failed_checks`` counts
    consecutive failed checks (0 once it answers). ``fenced`` means the node
    carries the fence marker.
    ``upstream`` is the node a replica is configured to stream from: ``""``
    when that is none of the known nodes, None when unknown (or not a replica).
    """

    name: str
    reachable: bool
    in_recovery: bool | None = None
    position: Position | None = None
    failed_checks: int = 0
    fenced: bool = False
    upstream: str | None = None


@dataclass(frozen=True)
class FailoverPolicy:
    """When a primary counts as failed: ``failed_checks`` misses, ``check_interval`` apart."""

    failed_checks: int = 3
    check_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.failed_checks < 1:
            raise ValueError(f"failed_checks must be at least 1, not {self.failed_checks}")
        if not self.check_interval > 0:
            raise ValueError(f"check_interval must be positive, not {self.check_interval}")


@dataclass(frozen=True)
class Fence:
    """Mark ``node`` as fenced, then stop it.

    ``clean`` asks for a fast shutdown, which makes PostgreSQL send all of
    its WAL to the connected standbys before it exits (a switchover needs
    that); otherwise the stop is immediate, killing the processes if need be.
    """

    node: str
    clean: bool = False


@dataclass(frozen=True)
class WaitForReplay:
    """Wait until ``node`` has replayed the final WAL of the cleanly stopped ``source``."""

    node: str
    source: str


@dataclass(frozen=True)
class Promote:
    """End recovery on the replica ``node``; done when it accepts writes."""

    node: str


@dataclass(frozen=True)
class Announce:
    """Record ``primary`` as the primary and tell the routers to send writes there."""

    primary: str


@dataclass(frozen=True)
class Repoint:
    """Make ``replica`` stream from ``new_primary`` (following its new timeline)."""

    replica: str
    new_primary: str


@dataclass(frozen=True)
class Rejoin:
    """Rewind the stopped ``old_primary`` (or copy it afresh) and start it as a replica
    of ``new_primary``; the fence marker is removed only once it cannot start as a primary."""

    old_primary: str
    new_primary: str


Action = Fence | WaitForReplay | Promote | Announce | Repoint | Rejoin


@dataclass(frozen=True)
class Decision:
    """The actions to carry out, in order (possibly none), and why."""

    actions: tuple[Action, ...]
    reason: str


def most_advanced(nodes: Iterable[NodeFacts]) -> NodeFacts | None:
    """The first of ``nodes`` whose position has reached every other's, or None.

    A node without a position has reached nothing (and is reached by any).
    None for no nodes, or when no node holds everything the others hold
    (possible only with partly ordered positions).
    """
    listed = list(nodes)

    def holds(node: NodeFacts, other: NodeFacts) -> bool:
        if other.position is None:
            return True
        return node.position is not None and node.position >= other.position

    return next((node for node in listed if all(holds(node, other) for other in listed)),
                None)


def plan_failover(nodes: Sequence[NodeFacts], primary: str,
                  policy: FailoverPolicy | None = None, *,
                  engine: Engine | None = None) -> Decision:
    """What to do given the facts and the believed ``primary``; see the module rules.

    With a healthy primary the plan only tidies up: a fenced node, or a
    second writable one that came back, is fenced and rejoined under the
    primary; a replica streaming from another node is repointed. ``engine``
    (the nodes', default PostgreSQL's) prints positions in the reasons.
    Raises ValueError if ``primary`` is not among ``nodes`` or names repeat.
    """
    policy = policy or FailoverPolicy()
    by_name = _index(nodes)
    if primary not in by_name:
        raise ValueError(f"the believed primary {primary!r} is not among the nodes")
    old = by_name[primary]
    others = [n for n in nodes if n.name != primary]

    if old.reachable:
        if old.in_recovery:
            return Decision((), f"{primary} answers but is in recovery; "
                                f"no failover while the believed primary answers")
        return _tidy(old, others)

    if old.failed_checks < policy.failed_checks:
        return Decision((), f"{primary} failed {old.failed_checks} of "
                            f"{policy.failed_checks} checks; waiting before failing over")
    down = f"{primary} failed {old.failed_checks} consecutive checks"

    writable = [n for n in others if n.reachable and n.in_recovery is False and not n.fenced]
    if len(writable) > 1:
        names = ", ".join(n.name for n in writable)
        return Decision((), f"{down}, and several nodes accept writes ({names}); "
                            f"choose the primary by hand")
    if writable:
        # An earlier failover promoted it and stopped before telling anyone.
        new = writable[0]
        actions: list[Action] = [Fence(primary), Announce(new.name)]
        actions += _follow(others, new.name)
        return Decision(tuple(actions), f"{down}; {new.name} was already promoted")

    candidates = [n for n in others
                  if n.reachable and n.in_recovery and not n.fenced and n.position is not None]
    if not candidates:
        return Decision((), f"{down}, but no replica can be promoted: "
                            f"{_why_not(others)}")
    best = most_advanced(sorted(candidates, key=lambda n: n.name))
    if best is None or best.position is None:
        names = ", ".join(n.name for n in candidates)
        return Decision((), f"{down}, and no replica holds everything the others hold "
                            f"({names}); choose the primary by hand")
    actions = [Fence(primary), Promote(best.name), Announce(best.name)]
    actions += _follow(others, best.name)
    shown = (engine if engine is not None else default_engine()).format_token(best.position)
    return Decision(tuple(actions), f"{down}; promoting {best.name}, the replica "
                                    f"with the most WAL ({shown})")


def plan_switchover(nodes: Sequence[NodeFacts], primary: str, target: str) -> Decision:
    """The steps that hand the primary role from ``primary`` to the replica ``target``
    without losing a committed transaction, or no steps and the reason.

    1. ``Fence(primary, clean=True)``: the marker first, so that nothing
       restarts the old primary as a primary once it exits; then a fast
       shutdown, which ends every session (an interrupted transaction never
       returned a commit, so it is not a lost commit) and sends all WAL,
       down to the shutdown checkpoint, to the connected standbys before
       the server exits. From here on nothing can commit anywhere.
    2. ``WaitForReplay(target, primary)``: proof that the target holds every
       commit. If it does not come, the executor stops here with nothing
       promoted, and the old primary may be unfenced and started as it was.
    3. ``Promote(target)``: only now is there a writable node again, one
       that has every commit.
    4. ``Announce(target)``: routers send writes to the target once it
       accepts them, never before.
    5. ``Rejoin(primary, target)``: the old primary stopped exactly at the
       point where the target's new timeline begins, so the rewind is
       usually empty; it comes back as a replica and the cluster regains
       its spare.
    6. ``Repoint(replica, target)`` for every other replica. Steps 5 and 6
       are independent of each other, and if either fails the next
       :func:`plan_failover` finds the node fenced or streaming from the
       wrong node and plans the same step again.
    """
    by_name = _index(nodes)
    if primary not in by_name:
        raise ValueError(f"the believed primary {primary!r} is not among the nodes")
    if target == primary:
        return Decision((), f"{target} is already the primary")
    if target not in by_name:
        return Decision((), f"{target} is not a database node")
    old, new = by_name[primary], by_name[target]
    if not old.reachable or old.in_recovery is not False:
        return Decision((), f"the primary {primary} is not answering as a primary; "
                            f"a switchover needs it, a failover does not")
    if new.fenced:
        return Decision((), f"{target} is fenced; rejoin it before switching over to it")
    if not new.reachable or not new.in_recovery:
        return Decision((), f"{target} is not a reachable replica")
    actions: list[Action] = [Fence(primary, clean=True), WaitForReplay(target, primary),
                             Promote(target), Announce(target), Rejoin(primary, target)]
    actions += _follow([n for n in nodes if n.name not in (primary, target)], target)
    return Decision(tuple(actions), f"switching the primary from {primary} to {target}")


def _tidy(primary: NodeFacts, others: Sequence[NodeFacts]) -> Decision:
    """With a healthy primary: bring every other node under it."""
    actions: list[Action] = []
    notes: list[str] = []
    for node in others:
        writable = node.reachable and node.in_recovery is False
        if node.fenced or writable:
            if node.reachable:
                # Running despite the marker, or a second primary: stop it first,
                # a rewind needs a stopped server.
                actions.append(Fence(node.name))
            actions.append(Rejoin(node.name, primary.name))
            notes.append(f"{node.name} is {'fenced' if node.fenced else 'writable'}")
        elif node.upstream is not None and node.upstream != primary.name:
            actions.append(Repoint(node.name, primary.name))
            notes.append(f"{node.name} streams from {node.upstream}")
    if not actions:
        return Decision((), f"{primary.name} is a healthy primary")
    return Decision(tuple(actions), f"{primary.name} is a healthy primary; "
                                    + "; ".join(notes))


def _follow(others: Sequence[NodeFacts], new_primary: str) -> list[Action]:
    """Bring the remaining nodes under ``new_primary``: repoint replicas; fenced ones
    wait for a later plan, which rejoins them once the new primary is healthy."""
    return [Repoint(n.name, new_primary) for n in others
            if n.name != new_primary and not n.fenced]


def _why_not(others: Sequence[NodeFacts]) -> str:
    if not others:
        return "there are no replicas"
    reasons = []
    for node in others:
        if node.fenced:
            reasons.append(f"{node.name} is fenced")
        elif not node.reachable:
            reasons.append(f"{node.name} is unreachable")
        elif not node.in_recovery:
            reasons.append(f"{node.name} is not a replica")
        else:
            reasons.append(f"{node.name} reports no WAL position")
    return ", ".join(reasons)


def _index(nodes: Sequence[NodeFacts]) -> dict[str, NodeFacts]:
    by_name = {n.name: n for n in nodes}
    if len(by_name) != len(nodes):
        raise ValueError("node names repeat")
    return by_name
