"""Time-window pinning: the common read-your-writes recipe, for comparison with causal tokens.

After a write commits, the client's reads go to the primary for a fixed
window (Django's and SQLAlchemy's usual "pin to the primary after a write"
routers); otherwise they go to any healthy replica, with no token. That is
read-your-writes only while no replica lags by more than the window, and
every read in the window loads the primary whether the replicas have the
write or not. Causal tokens (:mod:`tiers.db.router`) send a read to the
primary only when no replica has the write yet.

A PinnedReads belongs to one cluster: a write on another cluster does not
pin this one's reads. Its writes still record their causal tokens, under the
cluster's name, as every write through the cluster does.

The cluster counts each read under the node that served it
(:meth:`tiers.db.router.Cluster.served`; pinned reads are ``read_primary``
ones), so a benchmark can compare how many reads each recipe put on the
primary.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from tiers.db.nodes import Connection
from tiers.db.router import Cluster, WriteTransaction


class _Pins(threading.local):
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.until = 0.0


class PinnedReads:
    """Reads and writes through ``cluster``, pinned to the primary ``window`` seconds per write.

    The pin is per thread (one client per thread); a web app would carry
    :attr:`pinned_until` in a cookie. ``clock`` is for tests and must be the
    same clock for every use of one PinnedReads.
    """

    def __init__(self, cluster: Cluster, window: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 0:
            raise ValueError("window must not be negative")
        self.cluster = cluster
        self.window = window
        self._clock = clock
        self._pins = _Pins()

    @property
    def pinned_until(self) -> float:
        """The clock time until which this thread's reads go to the primary (0: not pinned)."""
        if self._pins.pid != os.getpid():
            self._pins.pid, self._pins.until = os.getpid(), 0.0
        return self._pins.until

    @pinned_until.setter
    def pinned_until(self, value: float) -> None:
        self._pins.pid, self._pins.until = os.getpid(), value

    @property
    def pinned(self) -> bool:
        return self._clock() < self.pinned_until

    def write(self) -> WriteTransaction:
        """``Cluster.write``, pinning this thread's reads to the primary after the commit."""
        return WriteTransaction(self.cluster, on_commit=self._pin)

    def read(self) -> AbstractContextManager[Connection]:
        """The primary while pinned, else any healthy replica."""
        if self.pinned:
            return self.cluster.read_primary()
        return self.cluster.read(None)

    def _pin(self, _token: str) -> None:
        self.pinned_until = self._clock() + self.window
