"""The choice of the node that serves a read: consistency, causal waits, remembered positions.

:class:`ReadChoice` is the layer of :class:`tiers.db.router.Cluster` above
its topology (:mod:`tiers.db.topology`); the rules it follows are pure
functions in :mod:`tiers.db.consistency`, and what they mean for a caller
is told in :mod:`tiers.db.router`. A read without a token or a bound takes
the next replica of the read pool in turn while no node is marked down,
without planning; any other read is planned: replicas the monitor saw
qualify are tried in turn, then replicas that may qualify are asked for
their replayed position (PostgreSQL: ``pg_last_wal_replay_lsn()``), polled
up to ``causal_wait`` seconds, and last the primary serves the read.

Remembered positions. Each of a thread's connections to a replica
remembers the highest replay position it reported
(:class:`tiers.db.links.Link`), so a causal read whose token is at or below
it is served there without asking again. That is safe because the read
then runs on that very session: a server's replayed history is only ever
cut back (pg_rewind, a new base backup) while it is stopped, which ends
every session, so as long as the session lives the position stays
replayed; if it died, the read fails instead of reading stale data. A
connection replaced for any reason starts with nothing remembered, and a
change of the monitor's primary (a failover: the only time history forks)
forgets every position remembered before it (:attr:`tiers.db.topology.Pool.epoch`).
A choice for a caller that reads on a connection of its own
(``use_memory=False``) never relies on a remembered position.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Sequence
from typing import Final

from tiers.db import tokens
from tiers.db.consistency import plan_read, poll_delay, replica_qualifies
from tiers.db.engine import Position
from tiers.db.errors import NodeUnavailable
from tiers.db.links import Intent, Link, ThreadState
from tiers.db.topology import Topology

__all__ = ["FROM_CONTEXT", "ReadChoice", "Token"]


class _FromContext(enum.Enum):
    TOKEN = "the token of the current request scope"


FROM_CONTEXT: Final = _FromContext.TOKEN
"""The default ``token`` of reads: the request scope's token for the reading cluster."""

Token = str | None | _FromContext


class ReadChoice(Topology):
    """The part of a Cluster that chooses a node for each read (see the module docstring);
    :meth:`_init_reads` sets it up, after :meth:`_init_topology`."""

    name: str
    causal_wait: float

    def _init_reads(self, name: str, causal_wait: float, sleep: Callable[[float], None]) -> None:
        self.name = name
        self.causal_wait = causal_wait
        self._sleep = sleep
        self._parse_token = self.engine.parse_token
        self._position_errors: tuple[type[BaseException], ...] = (
            NodeUnavailable, *self._answer_errors)
        self._last_token: tuple[str | None, Position | None] = (None, None)
        self._cursor = itertools.count()

    def _wanted(self, token: Token) -> Position | None:
        """The position a read's ``token`` asks for; ValueError for a malformed one."""
        if token is FROM_CONTEXT:
            token = tokens.current_token(self.name)
        if token is None:
            return None
        # A request reads with the same token again and again: parse it once.
        last = self._last_token
        if last[0] == token:
            return last[1]
        wanted = self._parse_token(token)
        self._last_token = (token, wanted)
        return wanted

    def _choose_any(self) -> tuple[str, Link, bool]:
        """A read without a token or a bound: the next replica in turn, else the primary."""
        names = self._pool().names
        if names and not self._down:
            count = len(names)
            name = names[0] if count == 1 else names[next(self._cursor) % count]
            state = self._state()
            try:
                link = self._checkout(state, name)
            except NodeUnavailable:
                pass  # marked down now: the full plan tries the others
            else:
                self._count(state, name, Intent.READ)
                return name, link, True
        return self._choose_read(None, None, Intent.READ)

    def _choose_read(self, wanted: Position | None, max_staleness: float | None, intent: Intent,
                     *, use_memory: bool = True) -> tuple[str, Link, bool]:
        """The node for a read, its connection, and whether it is a replica of the pool."""
        pool = self._pool()
        state = self._state()
        start = next(self._cursor)
        if wanted is not None and max_staleness is None and not self._down:
            # The common causal read: the first replica in turn that the monitor
            # saw replay the token, as the plan below would put first.
            views = pool.views
            count = len(views)
            for step in range(count):
                view = views[(start + step) % count]
                position = view.position
                if position is not None and position >= wanted:
                    try:
                        link = self._checkout(state, view.name)
                    except NodeUnavailable:
                        break  # marked down now: the full plan tries the others
                    self._count(state, view.name, intent)
                    return view.name, link, True
        now = self._clock()
        wait_lag = self.causal_wait if self.monitor is not None else None
        plan = plan_read(pool.views, token=wanted, max_staleness=max_staleness, start=start,
                         now=now, down=self._down, wait_lag=wait_lag)
        if not plan.ready and wanted is not None and use_memory:
            # Only now, with no replica known good from the monitor, look at what this
            # thread's connections remember.
            remembered = {name: link.replayed for name, link in state.links.items()
                          if link.replayed is not None and link.epoch == pool.epoch}
            if remembered:
                plan = plan_read(pool.views, token=wanted, max_staleness=max_staleness,
                                 start=start, now=now, down=self._down, wait_lag=wait_lag,
                                 remembered=remembered)
        if self._down:
            self._forget_expired_marks(now)
        for name in plan.ready:
            try:
                link = self._checkout(state, name)
            except NodeUnavailable:
                continue
            self._count(state, name, intent)
            return name, link, True
        if plan.poll:
            assert wanted is not None
            found = self._wait_for(state, pool.epoch, plan.poll, wanted,
                                   use_memory=use_memory,
                                   patience=self.causal_wait if plan.wait else 0.0)
            if found is not None:
                self._count(state, found[0], intent)
                return found[0], found[1], True
        name, link = self._checkout_primary(intent)
        return name, link, False

    def _wait_for(self, state: ThreadState, epoch: int, names: Sequence[str], wanted: Position,
                  *, use_memory: bool, patience: float) -> tuple[str, Link] | None:
        """Poll the replicas' replayed positions until one has ``wanted``, up to ``patience``
        seconds (0: ask each once)."""
        deadline = self._clock() + patience
        pending = list(names)
        for attempt in itertools.count():
            for name in list(pending):
                try:
                    link = self._checkout(state, name)
                    if use_memory and link.has_replayed(wanted, epoch):
                        return name, link
                    position = self._position(link)
                except self._position_errors:
                    # Nothing of the caller's work was sent: skip it, try the others.
                    self._mark_down(name)
                    pending.remove(name)
                    continue
                link.remember(position, epoch)
                if replica_qualifies(position, wanted):
                    return name, link
            remaining = deadline - self._clock()
            if not pending or remaining <= 0:
                return None
            self._sleep(min(poll_delay(attempt), remaining))
        return None

    def _position(self, link: Link) -> Position | None:
        """A node's replayed position: one query, run outside any transaction."""
        link.use_autocommit(True)
        return self.engine.replayed_position(link.conn)
