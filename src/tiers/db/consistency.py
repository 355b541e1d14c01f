"""Which replica may serve a read: the router's decisions as plain functions, without I/O.

A read asks for one of three consistencies:

* *causal* (a token): the replica must have replayed at least the token's
  position. A replica the health monitor last saw at or past it qualifies
  at once (a replica's replay position never goes back); the others must be
  asked for their position, and the router waits for one of them to get
  there, up to its ``causal_wait``.
* *bounded staleness* (``max_staleness`` seconds): the replica's replay lag
  as the monitor last measured it, plus the age of that measurement, must
  be under the bound. The age counts because a replica that was current a
  moment ago may have stalled since; without a measurement (no monitor, or
  none yet) no replica qualifies. Given together with a token, both apply.
* *none*: any replica in the read pool.

Replicas are tried round-robin from a rotating start, so reads spread over
the pool. A replica that failed under this router (connect refused,
connection lost) carries a :class:`DownMark` and is left out until the mark
expires or the monitor has seen it answer since the mark was set, whichever
comes first: the router reacts to a failure at once, the monitor's next
good check lets the node back without waiting out the period.

A causal read does not wait for a replica the monitor last measured
lagging by more than the wait would last: such a replica is asked once,
last, and when every replica to ask is one of those, nobody waits: a
replica that has the write by then serves the read, else the primary does
at once instead of after the wait. (Leaving such replicas out altogether
would spare that one question, but sends to the primary every read whose
write the lagging replica has in fact replayed by then, which under a
workload with think time is most of them.) The router also remembers, per
connection, the highest position each replica reported there; a replica
remembered at or past the token is tried first, and the router serves the
read on that connection without asking again (see :mod:`tiers.db.reads`
for why that is safe).

When :func:`plan_read` leaves nothing to try, or nothing tried answers,
the read goes to the primary: that is never wrong, only more load there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tiers.db.engine import Position

# Polling a replica's replay position while a causal read waits: start fast,
# since on a healthy replica the wait is usually below a millisecond, and
# back off so that a long wait costs a few dozen queries, not thousands.
FIRST_POLL_DELAY = 0.001
MAX_POLL_DELAY = 0.02


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the router knows about one replica in the read pool.

    ``position`` (replayed position) and ``lag_seconds`` come from the
    monitor's last observation, taken at ``observed_at`` on the router's
    clock; all three are None when there is no monitor or no observation.
    """

    name: str
    position: Position | None = None
    lag_seconds: float | None = None
    observed_at: float | None = None


@dataclass(frozen=True, slots=True)
class DownMark:
    """A node that failed at ``since``; skipped for reads until ``until`` (router's clock)."""

    since: float
    until: float


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Replicas for one read, each tuple in the order to try them.

    ``ready`` may serve the read as they are; ``poll`` qualify only once
    their replayed position, asked for, has reached the token. Both empty:
    read from the primary.
    """

    ready: tuple[str, ...] = ()
    poll: tuple[str, ...] = ()
    wait: bool = True  # False: ask each replica in ``poll`` once, without waiting

    @property
    def primary_only(self) -> bool:
        return not self.ready and not self.poll


def replica_qualifies(position: Position | None, token: Position | None) -> bool:
    """True if a replica that has replayed up to ``position`` may serve a read needing ``token``.

    Without a token any replica will do. A replica that reports no position
    cannot prove it has the write, so it does not qualify.
    """
    if token is None:
        return True
    return position is not None and position >= token


def usable(mark: DownMark | None, observed_at: float | None, now: float) -> bool:
    """Whether a replica may be tried: no mark, an expired one, or seen answering since."""
    if mark is None or now >= mark.until:
        return True
    return observed_at is not None and observed_at > mark.since


def within_staleness(view: ReplicaView, max_staleness: float, now: float) -> bool:
    """Whether the replica's data is surely less than ``max_staleness`` seconds old."""
    if view.lag_seconds is None or view.observed_at is None:
        return False
    return view.lag_seconds + max(0.0, now - view.observed_at) < max_staleness


def rotation(count: int, start: int) -> list[int]:
    """Indexes ``0..count-1`` beginning at ``start`` modulo ``count`` and wrapping around."""
    if count <= 0:
        return []
    first = start % count
    return [(first + step) % count for step in range(count)]


def plan_read(
    pool: Sequence[ReplicaView],
    *,
    token: Position | None,
    max_staleness: float | None,
    start: int,
    now: float,
    down: Mapping[str, DownMark],
    wait_lag: float | None = None,
    remembered: Mapping[str, Position] | None = None,
) -> ReadPlan:
    """The replicas one read may use; see the module docstring for the rules.

    ``wait_lag`` (the router's causal wait) puts last in ``poll`` a replica
    whose replay lag, as last measured, already exceeds it: waiting that long
    for it is likely in vain. If every replica to poll is such a one, the
    plan says not to wait (``wait`` False). ``remembered`` maps replicas to
    positions the caller knows they have replayed (it must check that again
    before relying on one): a replica remembered at or past the token is
    polled first, whatever its lag.
    """
    ready: list[str] = []
    poll: list[str] = []
    first: list[str] = []
    lagging: list[str] = []
    count = len(pool)
    offset = start % count if count else 0
    for step in range(count):
        view = pool[(offset + step) % count]
        name = view.name
        if down and not usable(down.get(name), view.observed_at, now):
            continue
        if max_staleness is not None and not within_staleness(view, max_staleness, now):
            continue
        if replica_qualifies(view.position, token):
            ready.append(name)
        elif remembered and token is not None and replica_qualifies(remembered.get(name), token):
            first.append(name)
        elif (wait_lag is None or view.lag_seconds is None
              or view.lag_seconds <= wait_lag):
            poll.append(name)
        else:
            lagging.append(name)
    wait = not lagging or bool(first or poll)
    return ReadPlan(tuple(ready), tuple(first + poll + lagging), wait)


def poll_delay(attempt: int) -> float:
    """The pause before the ``attempt``-th (0-based) repeat of a position poll."""
    return min(MAX_POLL_DELAY, FIRST_POLL_DELAY * float(1 << min(attempt, 16)))
