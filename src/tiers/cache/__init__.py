"""The cache tier: memcached nodes addressed by consistent hashing.

The protocol layer is ``codec`` (memcached text protocol, client side, no
I/O), ``serde`` (values to bytes and flags), ``client`` (blocking, one node),
``aio`` (asyncio, one node), ``serverproto`` and ``server`` (an embedded
memcached-compatible server for machines without memcached). Errors are in
``errors``.

Above it: ``ring`` (ketama consistent hashing, as libmemcached does it),
``policy`` (ejecting a failing node and taking it back; copies of replicated
and hot keys), ``cluster`` (the client applications use: one ring, a pool of
connections per node, multi-get batched per node in parallel) and
``stampede`` (``get_or_compute`` with a lease and early recomputation).
``fake`` holds in-memory nodes for tests.
"""
