"""Where the cluster's requests go: ring owners, failover, the gutter, copies.

Decisions over the pools' rings and failure policies, without I/O:
``tiers.cache.cluster`` makes the requests a ``Router`` picks, and
``tiers.cache.nodes`` tells the failure policies how they ended.

A key without copies goes to its ring owner while the owner is up. While it
is ejected the key goes to the next live node clockwise, or, with a gutter
pool, to the gutter node the gutter's own ring picks, with its TTL capped at
``gutter_ttl`` seconds (``cap_ttl``). Asking the failure policy may start a
probe of an ejected node (``tiers.cache.policy``): the request it admits is
the probe. A key with copies (a ``CopyRule``: ``replicated`` or ``hot``, per
call or by the longest matching key prefix) lives on the first distinct
nodes clockwise whatever their health; ejected copies are left out, not
moved. A hot key's copies are stored under distinct keys (``key``,
``key#1``, ... as IronPlate does), and a read asks one of them picked at
random (``ReadPlan`` decides what a read does with the answers).

A request that no live node can take is counted in ``unrouted``. The
failure policies are behind the lock the router shares with the dispatcher
(``tiers.cache.nodes``): placing copies takes it, and so does routing a key
whose owner is not up; the common case, an owner that is up, is one read of
the policy without it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple

from tiers.cache.errors import NodeError
from tiers.cache.nodes import Member, Pool
from tiers.cache.policy import Admission, CopyRule, Hot, ReadPlan, ReadShape

HOT_SEPARATOR = "#"


class Target(NamedTuple):
    """One request to make: which node, under which key, with which TTL cap."""

    member: Member
    key: str
    ttl_cap: int | None = None


# Which members a routing pass found up (True) or must skip (False); see ``_admitted``.
Admitted = dict[Member, bool]


def cap_ttl(ttl: int, cap: int | None) -> int:
    """``ttl`` (0 or negative: no expiry) within ``cap`` seconds, if there is a cap."""
    if cap is None:
        return ttl
    return cap if ttl <= 0 or ttl > cap else ttl


def _admit(member: Member, now: float) -> bool:
    return member.policy.admit(member.index, now) is not Admission.SKIP


def _admitted(member: Member, now: float, seen: Admitted) -> bool:
    """``_admit`` once per member and routing pass (under the lock, one ``now``).

    Within a pass the policy's answer for a member cannot change but for
    the probe: an up node stays up, an ejected one is skipped, and the one
    request given a probe is followed by requests that skip the node. So
    the first answer, with a probe remembered as a skip, holds for every
    later key of the pass, and a batch of keys costs one ``admit`` per node.
    """
    known = seen.get(member)
    if known is not None:
        return known
    admission = member.policy.admit(member.index, now)
    seen[member] = admission is Admission.USE
    return admission is not Admission.SKIP


class Router:
    """Picks the members (and wire keys) of a cluster's requests; see the module notes."""

    def __init__(
        self,
        main: Pool,
        gutter: Pool | None,
        rules: Iterable[tuple[str, CopyRule]],
        *,
        gutter_ttl: int,
        lock: threading.Lock,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.main = main
        self.gutter = gutter
        # Longest prefix first, so the most specific rule wins.
        self.rules = sorted(rules, key=lambda rule: len(rule[0]), reverse=True)
        self.gutter_ttl = gutter_ttl
        self.unrouted = 0  # requests no live node could take; read under the lock
        self._lock = lock
        self._clock = clock
        self._rng = rng

    def rule_for(self, key: str) -> CopyRule | None:
        """The copy rule of ``key``'s longest matching prefix, if any."""
        for prefix, rule in self.rules:
            if key.startswith(prefix):
                return rule
        return None

    def rule(self, key: str, copies: CopyRule | None) -> CopyRule | None:
        """The rule a call applies to ``key``: its own ``copies``, else the prefix rule."""
        return copies or (self.rule_for(key) if self.rules else None)

    def plain(self, key: str, copies: CopyRule | None) -> bool:
        """Whether ``key`` has a single copy (no rule, or a rule of one copy)."""
        rule = self.rule(key, copies)
        return rule is None or rule.copies == 1

    def route(self, key: str) -> Target | None:
        """Where a key without copies goes now: owner, next live node, or the gutter."""
        main = self.main
        owner = main.ring.index_for(key)
        if main.policy.up(owner):
            return Target(main.members[owner], key)
        now = self._clock()
        with self._lock:
            member = self.route_locked(key, owner, now, {})
        if member is None:
            return None
        return Target(member, key, self.gutter_ttl if member.gutter else None)

    def route_locked(self, key: str, owner: int, now: float, seen: Admitted) -> Member | None:
        """``route`` for a key whose ring owner is ``owner``; the caller holds the lock.

        ``seen`` carries the admissions of one routing pass over many keys.
        """
        main = self.main
        member = main.members[owner]
        if _admitted(member, now, seen):
            return member
        if self.gutter is not None:
            return self._route_gutter(key, now, seen)
        for index in main.ring.walk(key):
            if index != owner:
                member = main.members[index]
                if _admitted(member, now, seen):
                    return member
        self.unrouted += 1
        return None

    def _route_gutter(self, key: str, now: float, seen: Admitted) -> Member | None:
        gutter = self.gutter
        assert gutter is not None
        for index in gutter.ring.walk(key):
            member = gutter.members[index]
            if _admitted(member, now, seen):
                return member
        self.unrouted += 1
        return None

    def copies(self, key: str, rule: CopyRule) -> list[Target]:
        """The live copies of ``key`` under ``rule``, in ring order (ejected ones left out)."""
        now = self._clock()
        main = self.main
        hot_key = isinstance(rule, Hot)
        out: list[Target] = []
        with self._lock:
            for position, index in enumerate(main.ring.indices_for(key, rule.copies)):
                member = main.members[index]
                if _admit(member, now):
                    wire = f"{key}{HOT_SEPARATOR}{position}" if hot_key and position else key
                    out.append(Target(member, wire))
            if not out:
                self.unrouted += 1
        return out

    def read_plan(self, key: str, rule: CopyRule | None) -> ReadPlan[Target]:
        """How a read asks for ``key`` under ``rule`` (None: a key without copies)."""
        if rule is None or rule.copies == 1:
            target = self.route(key)
            return ReadPlan(ReadShape.ONE, [target] if target else [])
        targets = self.copies(key, rule)
        if isinstance(rule, Hot):
            self._rng.shuffle(targets)
        return ReadPlan.for_rule(rule, targets, len(self.main.members))

    def unroutable(self, key: str) -> NodeError:
        """The error for ``key`` when no live node can take it, naming its ring owner."""
        owner = self.main.ring.node_for(key).address
        return NodeError(owner, "ejected, and no live node can take its keys", sent=False)
