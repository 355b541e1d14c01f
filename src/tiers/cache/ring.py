"""The ketama ring that maps cache keys to memcached nodes, as libmemcached does.

A key goes to the same node here as in libmemcached 1.x with
``MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED`` (what pylibmc, PHP's memcached and
most C clients call ketama) given the same server list and weights:

* Each server gets ``floor(weight / total_weight * 40 * n_servers) * 4``
  points (160 for every server when the weights are equal), computed in
  single-precision floats as libmemcached does.
* Its points come from md5 of ``"{name}-{i}"`` for ``i`` in ``0 ..
  points/4 - 1``: each digest gives four points, its bytes 0-3, 4-7, 8-11
  and 12-15 read as little-endian unsigned 32-bit integers.
* ``name`` is ``host`` when the port is 11211 and ``host:port`` otherwise
  (libmemcached's rule; ``PointNames.LIBMEMCACHED``). The original libketama
  and uhashring name the points after whatever string the server list holds,
  usually ``host:port`` even on 11211: ``PointNames.HOST_PORT`` does that.
* A key's hash is the first four bytes of its md5, little-endian; the key
  belongs to the server owning the first point at or after that hash, or
  the first point of the ring when none is.

Where the implementations part (documented so nobody chases a ghost):
uhashring computes the point count in integer arithmetic and takes the first
point strictly *after* the hash; both differ from libmemcached only for a
key whose hash equals a point exactly, or for weights where single-precision
rounding lands below an integer. Two servers owning the very same point are
ordered by their position in the list (libmemcached's ``qsort`` leaves that
order undefined).

``walk`` gives the distinct servers clockwise from a key: the first is the
key's owner, the next the node that takes the key when the owner is out (so
a node ejected for a while hands its keys to its ring successor instead of
reshuffling the ring; with equal weights that is exactly where libmemcached's
rebuilt ring would put them), and the first ``n`` are where copies of a
replicated key live. Adding or removing one of N servers moves about 1/N of
the keys.

Nothing here does I/O; a ring is immutable once built and safe to share
between threads.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

DEFAULT_PORT = 11211
# libmemcached's MEMCACHED_POINTS_PER_SERVER_KETAMA: points per server of average weight.
POINTS_PER_SERVER = 160
_POINTS_PER_HASH = 4

_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
_md5 = hashlib.md5


class PointNames(enum.Enum):
    """How a server's ring points are named (the string hashed with ``-i``)."""

    # "host" on the default port, "host:port" elsewhere: libmemcached.
    LIBMEMCACHED = "libmemcached"
    # Always "host:port": libketama's server files, uhashring given "host:port" names.
    HOST_PORT = "host_port"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One memcached node: where it listens and its share of the keys."""

    host: str
    port: int = DEFAULT_PORT
    weight: int = 1

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("a cache node needs a host")
        if not 0 < self.port < 65536:
            raise ValueError(f"cache node {self.host}: port {self.port} is out of range")
        if self.weight < 1:
            raise ValueError(f"cache node {self.address}: weight must be at least 1")

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``), the node's name in logs and metrics."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, weight: int = 1) -> NodeSpec:
        """A node from ``host``, ``host:port`` or ``[v6]:port``; ValueError when malformed."""
        host, port = text, DEFAULT_PORT
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError(f"cache node {text!r}: unclosed '['")
            host, rest = text[1:close], text[close + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"cache node {text!r}: expected ':port' after ']'")
                port = _port(text, rest[1:])
        elif text.count(":") == 1:
            host, _, digits = text.partition(":")
            port = _port(text, digits)
        return cls(host, port, weight)


def _port(text: str, digits: str) -> int:
    if not digits.isdigit():
        raise ValueError(f"cache node {text!r}: port {digits!r} is not a number")
    return int(digits)


def point_name(node: NodeSpec, names: PointNames = PointNames.LIBMEMCACHED) -> str:
    """The string whose md5 gives ``node``'s ring points (before ``-i``)."""
    if names is PointNames.LIBMEMCACHED and node.port == DEFAULT_PORT:
        return node.host
    return f"{node.host}:{node.port}"


def _f32(value: float) -> float:
    """``value`` rounded to single precision, as C's ``float`` would hold it."""
    return float(_F32.unpack(_F32.pack(value))[0])


def point_count(weight: int, total_weight: int, servers: int) -> int:
    """Points of one server: libmemcached's ``floor(pct * 160 / 4 * n) * 4`` in C floats.

    Each step rounds to single precision as the C expression does; the
    ``1e-10`` libmemcached adds vanishes in that rounding except at zero.
    """
    pct = _f32(_f32(weight) / _f32(total_weight))
    scaled = _f32(_f32(_f32(pct * POINTS_PER_SERVER) / 4) * _f32(servers))
    return int(_f32(scaled + 0.0000000001) // 1) * _POINTS_PER_HASH


def key_hash(key: str | bytes) -> int:
    """A key's position on the ring: md5's first four bytes, little-endian."""
    data = key.encode() if isinstance(key, str) else key
    hashed: int = _U32.unpack_from(_md5(data, usedforsecurity=False).digest())[0]
    return hashed


class KetamaRing:
    """A libmemcached-compatible ketama continuum over ``nodes`` (see the module notes).

    Servers are referred to by their index in ``nodes``. Two nodes with the
    same point name are refused (they would own the same points).
    """

    __slots__ = ("_nodes", "_owners", "_points")

    def __init__(
        self, nodes: Sequence[NodeSpec], names: PointNames = PointNames.LIBMEMCACHED
    ) -> None:
        self._nodes = tuple(nodes)
        seen: set[str] = set()
        for node in self._nodes:
            name = point_name(node, names)
            if name in seen:
                raise ValueError(f"cache node {node.address} is listed twice")
            seen.add(name)
        total = sum(node.weight for node in self._nodes)
        count = len(self._nodes)
        ring: list[tuple[int, int]] = []
        for index, node in enumerate(self._nodes):
            name = point_name(node, names)
            for i in range(point_count(node.weight, total, count) // _POINTS_PER_HASH):
                digest = hashlib.md5(f"{name}-{i}".encode(), usedforsecurity=False).digest()
                for k in range(0, 16, 4):
                    ring.append((int.from_bytes(digest[k : k + 4], "little"), index))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [index for _, index in ring]

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        """The nodes, in the order given (indices refer to this)."""
        return self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def points(self) -> list[tuple[int, int]]:
        """The continuum as sorted ``(point, node index)`` pairs."""
        return list(zip(self._points, self._owners, strict=True))

    def _start(self, key: str | bytes) -> int:
        position = bisect_left(self._points, key_hash(key))
        return 0 if position == len(self._points) else position

    def index_for(self, key: str | bytes) -> int:
        """The index of the node that owns ``key``; IndexError on an empty ring."""
        points = self._points
        if not points:
            raise IndexError("the ring has no nodes")
        # key_hash and _start inlined: this runs once per key of every request.
        data = key.encode() if isinstance(key, str) else key
        hashed = _U32.unpack_from(_md5(data, usedforsecurity=False).digest())[0]
        position = bisect_left(points, hashed)
        return self._owners[position if position < len(points) else 0]

    def indices_for_keys(self, keys: Iterable[str | bytes]) -> list[int]:
        """``index_for`` of each key, in order; IndexError on an empty ring."""
        points = self._points
        if not points:
            raise IndexError("the ring has no nodes")
        owners = self._owners
        size = len(points)
        unpack = _U32.unpack_from
        out: list[int] = []
        append = out.append
        for key in keys:
            data = key.encode() if isinstance(key, str) else key
            position = bisect_left(points, unpack(_md5(data, usedforsecurity=False).digest())[0])
            append(owners[position if position < size else 0])
        return out

    def point_for(self, key: str | bytes) -> tuple[int, int]:
        """The continuum point ``key`` lands on and its node's index; IndexError when empty."""
        if not self._points:
            raise IndexError("the ring has no nodes")
        position = self._start(key)
        return self._points[position], self._owners[position]

    def node_for(self, key: str | bytes) -> NodeSpec:
        """The node that owns ``key``; IndexError on an empty ring."""
        return self._nodes[self.index_for(key)]

    def walk(self, key: str | bytes) -> Iterator[int]:
        """Every node index once, clockwise from ``key``: its owner first, then successors."""
        points = self._points
        size = len(points)
        if not size:
            return
        owners = self._owners
        position = self._start(key)
        left = len(self._nodes)
        seen = 0  # bit set of node indices already given
        for _ in range(size):
            index = owners[position]
            position = position + 1 if position + 1 < size else 0
            bit = 1 << index
            if seen & bit:
                continue
            seen |= bit
            yield index
            left -= 1
            if not left:
                return

    def indices_for(self, key: str | bytes, n: int) -> list[int]:
        """The first ``n`` distinct node indices clockwise from ``key`` (fewer if N < n)."""
        out: list[int] = []
        if n <= 0:
            return out
        for index in self.walk(key):
            out.append(index)
            if len(out) == n:
                break
        return out

    def nodes_for(self, key: str | bytes, n: int) -> list[NodeSpec]:
        """The first ``n`` distinct nodes clockwise from ``key`` (all of them if N < n)."""
        return [self._nodes[index] for index in self.indices_for(key, n)]
