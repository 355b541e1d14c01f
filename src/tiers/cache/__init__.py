"""The cache tier: memcached nodes addressed by consistent hashing.

The protocol layer is ``codec`` (memcached text protocol, client side, no
I/O), ``serde`` (values to bytes and flags), ``client`` (blocking, one node),
``rounds`` (one pipelined round of requests over several blocking clients),
``aio`` (asyncio, one node), ``serverproto`` and ``server`` (an embedded
memcached-compatible server for machines without memcached). Errors are in
``errors``.

Above it: ``ring`` (ketama consistent hashing, as libmemcached does it),
``policy`` (ejecting a failing node and taking it back; copies of replicated
and hot keys), ``cluster`` (the client applications use: one ring,
multi-get batched per node in one pipelined round), which decides where
requests go with ``routing`` (owner, failover, gutter, copies) and runs them
with ``nodes`` (a pool of connections and counters per node), and
``stampede`` (``get_or_compute`` with a lease and early recomputation).
``fake`` holds in-memory nodes for tests, and ``env`` builds the process's
cluster from the environment an app server is given (``cluster_from_env``).
"""

from tiers.cache.cluster import CacheCluster
from tiers.cache.env import close_cluster, cluster_from_env
from tiers.cache.policy import hot, replicated
from tiers.cache.stampede import get_or_compute

__all__ = [
    "CacheCluster",
    "close_cluster",
    "cluster_from_env",
    "get_or_compute",
    "hot",
    "replicated",
]
