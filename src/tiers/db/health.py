"""Replica health: one cheap probe per node, and a pure decision over the probes.

The probe (:func:`probe`) is the node's engine's
(:meth:`tiers.db.engine.Engine.probe`; PostgreSQL's runs one SELECT for
recovery state, position, replay lag and received position): a fresh
connection, connect and answer within one deadline, so a node that is
dead, unroutable or frozen (SIGSTOP) costs at most ``timeout`` seconds. It
never raises for a failed node: it returns an observation with
``reachable=False`` and the error text.

The decision (:func:`update`) is a plain function from the previous
:class:`ClusterHealth` and one round of observations to the next one; it
does no I/O and reads no clock. For each node it decides:

* the role. The *known primary* is the one node that is not in recovery.
  It changes only when exactly one node claims the role and the previous
  primary is either back in recovery (demoted, rewound) or has been out for
  ``fall`` checks; a demoted primary with no claimant leaves no known
  primary. Any other node that is not in recovery is flagged as a
  second primary (``Check.SECOND_PRIMARY``, role UNKNOWN) and never serves
  reads: its data may have diverged.
* what this round's observation says (:class:`Check`): good, unreachable,
  lagging (bytes behind the primary's position seen in the same round, or
  seconds behind by replay timestamp), or second primary.
* the standing (:class:`Standing`), with hysteresis: a node in the pool
  leaves after ``fall`` consecutive bad checks, a node out of it comes back
  after ``rise`` consecutive good ones. A node's first observation decides at
  once, and a second primary leaves at once. All transitions are in
  ``_TRANSITIONS``.

The read pool is the replicas whose standing is IN. When it is empty (no
replica, all lagging or dead), callers read from the primary: that is the
router's fallback, not something this module does.

Caveats. Byte lag (where the engine measures it,
:meth:`tiers.db.engine.Engine.lag_bytes`) compares two probes taken at about
the same time, not one snapshot, so a replica can look a few writes behind
under heavy writes; the ``fall`` hysteresis absorbs such blips. Seconds lag
is what the engine reports; PostgreSQL's is ``now() -
pg_last_xact_replay_timestamp()``, reported as 0 when the replica has
replayed all WAL it received, because on an idle primary that timestamp
grows old while nothing is behind; the first write after a long idle spell
makes a replica look that old until it replays it, which ``fall`` absorbs too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from tiers.db.engine import Engine, NodeObservation, default_engine, engine_for_dsn

__all__ = [
    "Check",
    "ClusterHealth",
    "HealthPolicy",
    "NodeHealth",
    "NodeObservation",
    "Role",
    "Standing",
    "next_standing",
    "probe",
    "update",
]


def probe(dsn: str, timeout: float = 0.5, *, name: str | None = None,
          engine: Engine | None = None) -> NodeObservation:
    """Probe one node within ``timeout`` seconds (connect and answer together).

    ``engine`` defaults to the DSN's (by its scheme). Opens a new connection
    each time, so it also proves that the node accepts connections, which
    is what a read needs. Never raises for a dead or misbehaving node:
    returns ``reachable=False`` with the reason in ``error``. ``name``
    defaults to the ``host:port/dbname`` of ``dsn``. UnsupportedEngine (a
    ValueError) for a DSN of an engine tiers has no adapter for.
    """
    chosen = engine if engine is not None else engine_for_dsn(dsn)
    return chosen.probe(dsn, timeout, name=name)


# ---- the decision ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """When a replica may serve reads.

    A limit of None is not checked. With the monitor's default interval of
    0.25 s, ``fall=3`` takes a refusing replica out in under a second and
    ``rise=2`` brings a healthy one back after two good checks.
    """

    max_lag_bytes: int | None = 16 * 1024 * 1024
    max_lag_seconds: float | None = 5.0
    fall: int = 3
    rise: int = 2

    def __post_init__(self) -> None:
        if self.fall < 1 or self.rise < 1:
            raise ValueError("fall and rise must be at least 1")


class Role(enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"
    UNKNOWN = "unknown"  # never reached, or not in recovery beside the known primary


class Check(enum.Enum):
    """What one observation says about a node."""

    NONE = "none"  # not observed yet
    GOOD = "good"
    UNREACHABLE = "unreachable"
    LAGGING = "lagging"
    SECOND_PRIMARY = "second_primary"


class Standing(enum.Enum):
    """A node's place with respect to health, after hysteresis."""

    NEW = "new"  # not observed yet
    IN = "in"  # healthy; a replica in this standing serves reads
    OUT = "out"  # left after bad checks; waits for ``rise`` good ones


# (standing, good check?) -> (next standing, the policy threshold the current
# streak must reach first, or None to move at once). A second primary is not
# in the table: it leaves at once whatever its standing.
_TRANSITIONS: Final[dict[tuple[Standing, bool], tuple[Standing, str | None]]] = {
    (Standing.NEW, True): (Standing.IN, None),
    (Standing.NEW, False): (Standing.OUT, None),
    (Standing.IN, True): (Standing.IN, None),
    (Standing.IN, False): (Standing.OUT, "fall"),
    (Standing.OUT, True): (Standing.IN, "rise"),
    (Standing.OUT, False): (Standing.OUT, None),
}


def next_standing(standing: Standing, check: Check, streak: int, policy: HealthPolicy) -> Standing:
    """The standing after a check; ``streak`` counts this check (good or bad) and its like before.

    Raises ValueError for ``Check.NONE``, which is no check.
    """
    if check is Check.NONE:
        raise ValueError("no check to apply")
    if check is Check.SECOND_PRIMARY:
        return Standing.OUT
    target, threshold = _TRANSITIONS[(standing, check is Check.GOOD)]
    if threshold is None or streak >= getattr(policy, threshold):
        return target
    return standing


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One node's health after the latest round.

    ``in_read_pool`` is true only for a replica whose standing is IN; the
    primary is never in the read pool. ``reason`` says what is wrong: why a
    replica is out of the read pool ("unreachable", "lag 123456 bytes >
    1048576", "lag 3.2 s > 1.0 s", "not in recovery: a second primary?",
    "rising: 1 of 2 good checks"), or why the primary's last check failed;
    None when nothing is. ``ok_streak`` and ``bad_streak`` count the
    consecutive good and bad checks up to the latest one.
    """

    name: str
    role: Role = Role.UNKNOWN
    standing: Standing = Standing.NEW
    check: Check = Check.NONE
    in_read_pool: bool = False
    ok_streak: int = 0
    bad_streak: int = 0
    last: NodeObservation | None = None
    reason: str | None = "not checked yet"


@dataclass(frozen=True, slots=True)
class ClusterHealth:
    """Every node's health and the known primary; immutable, so threads share it freely."""

    nodes: tuple[NodeHealth, ...] = ()
    primary: str | None = None
    rounds: int = 0

    @classmethod
    def initial(cls, names: Iterable[str], primary: str | None = None) -> ClusterHealth:
        """Nodes not checked yet; ``primary`` names the node expected to be the primary."""
        return cls(nodes=tuple(NodeHealth(name) for name in names), primary=primary)

    def node(self, name: str) -> NodeHealth:
        """One node's health; KeyError for an unknown name."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def read_pool(self) -> tuple[str, ...]:
        """Replicas that may serve reads, in node order; empty means read from the primary."""
        return tuple(n.name for n in self.nodes if n.in_read_pool)

    @property
    def second_primaries(self) -> tuple[str, ...]:
        """Nodes not in recovery beside the known primary (or beside each other)."""
        return tuple(n.name for n in self.nodes if n.check is Check.SECOND_PRIMARY)


def _choose_primary(state: ClusterHealth, seen: Mapping[str, NodeObservation]) -> str | None:
    claimants = [name for name, obs in seen.items() if obs.reachable and obs.in_recovery is False]
    known = state.primary
    if known is not None and known in claimants:
        return known
    old = seen.get(known) if known is not None else None
    if old is not None and old.reachable and old.in_recovery:
        known = None  # demoted (or rewound into a replica): it is no primary any more
    if len(claimants) != 1:
        return known
    if known is None or all(n.name != known for n in state.nodes):
        return claimants[0]
    # The known primary did not answer: one missed check is no reason to believe
    # another node; once it has been out for ``fall`` checks, the claimant takes over.
    gone = state.node(known).standing is Standing.OUT and (old is None or not old.reachable)
    return claimants[0] if gone else known


def _judge(obs: NodeObservation, is_primary: bool, policy: HealthPolicy) -> tuple[Check, str]:
    if not obs.reachable:
        return Check.UNREACHABLE, "unreachable"
    if not obs.in_recovery:
        return (Check.GOOD, "") if is_primary else (
            Check.SECOND_PRIMARY, "not in recovery: a second primary?")
    if obs.position is None:
        return Check.LAGGING, "no replay position yet"
    if (policy.max_lag_bytes is not None and obs.lag_bytes is not None
            and obs.lag_bytes > policy.max_lag_bytes):
        return Check.LAGGING, f"lag {obs.lag_bytes} bytes > {policy.max_lag_bytes}"
    if (policy.max_lag_seconds is not None and obs.replay_lag_seconds is not None
            and obs.replay_lag_seconds > policy.max_lag_seconds):
        return Check.LAGGING, (f"lag {obs.replay_lag_seconds:.1f} s > "
                               f"{policy.max_lag_seconds:.1f} s")
    return Check.GOOD, ""


def _role(name: str, obs: NodeObservation, primary: str | None, before: NodeHealth) -> Role:
    if name == primary:
        return Role.PRIMARY
    if obs.reachable:
        return Role.REPLICA if obs.in_recovery else Role.UNKNOWN
    # Unreachable: still the replica it was, as far as anyone knows.
    return Role.REPLICA if before.role is Role.REPLICA else Role.UNKNOWN


def update(state: ClusterHealth, observations: Iterable[NodeObservation],
           policy: HealthPolicy, engine: Engine | None = None) -> ClusterHealth:
    """The cluster's health after one round of observations.

    Nodes are keyed by ``NodeObservation.name``; a name not in ``state`` is
    added (standing NEW), a node without an observation this round keeps its
    health unchanged. Each observation is stored with ``lag_bytes`` filled in
    against the primary's position of the same round by ``engine`` (the
    engine whose positions these are; default PostgreSQL's): None if the
    primary was not reached, the node reported no position or the engine
    cannot measure bytes.
    """
    lag_bytes = (engine if engine is not None else default_engine()).lag_bytes
    seen = {obs.name: obs for obs in observations}
    before = {n.name: n for n in state.nodes}
    order = [n.name for n in state.nodes] + [name for name in seen if name not in before]
    primary = _choose_primary(state, seen)
    primary_obs = seen.get(primary) if primary is not None else None
    top = primary_obs.position if primary_obs is not None and primary_obs.reachable else None

    nodes = []
    for name in order:
        old = before.get(name, NodeHealth(name))
        obs = seen.get(name)
        if obs is None:
            if name == primary:
                old = replace(old, role=Role.PRIMARY)
            elif old.role is Role.PRIMARY:
                old = replace(old, role=Role.UNKNOWN)
            nodes.append(old)
            continue
        if obs.reachable and obs.in_recovery and top is not None and obs.position is not None:
            obs = replace(obs, lag_bytes=lag_bytes(top, obs.position))
        check, why = _judge(obs, name == primary, policy)
        good = check is Check.GOOD
        ok_streak = old.ok_streak + 1 if good else 0
        bad_streak = 0 if good else old.bad_streak + 1
        standing = next_standing(old.standing, check, ok_streak if good else bad_streak, policy)
        role = _role(name, obs, primary, old)
        in_pool = role is Role.REPLICA and standing is Standing.IN
        if in_pool or (good and role is Role.PRIMARY):
            reason = None
        elif good and role is Role.REPLICA:
            reason = f"rising: {ok_streak} of {policy.rise} good checks"
        else:
            reason = why
        nodes.append(NodeHealth(name, role, standing, check, in_pool, ok_streak, bad_streak,
                                obs, reason))
    return ClusterHealth(nodes=tuple(nodes), primary=primary, rounds=state.rounds + 1)
