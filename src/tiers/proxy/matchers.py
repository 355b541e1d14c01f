"""Matchers for client addresses and User-Agents, shared by routes and abuse limits.

``parse_address`` turns a peer address into one int and ``Networks`` tests
it against a set of CIDR blocks with one set probe per prefix length;
``UserAgentPattern`` searches a User-Agent for any of a list of regular
expressions, case-insensitively, merging plain word lists into one trie.
Both are built once from the configuration and probed per request, so they
are written for that: no allocation beyond what the lookup needs, plain
loops rather than generators.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any, Final

from tiers.errors import ConfigError

__all__ = ["Networks", "UserAgentPattern", "parse_address"]

# ---- addresses -------------------------------------------------------------------

# Addresses are one int: an IPv6 address is its 128-bit value, an IPv4 address
# (plain or IPv4-mapped) is _V4 plus its 32-bit value. The two ranges never
# meet, so an IPv6 network never matches an IPv4 client, even ::/0.
_V4: Final = 1 << 128
_MAPPED_PREFIX: Final = 0xFFFF  # ::ffff:0:0/96, shifted right by 32


def parse_address(ip: bytes) -> int | None:
    """The client address ``ip`` (as the server's peername gives it) as one int.

    IPv4 and IPv4-mapped IPv6 addresses become ``1 << 128`` plus the 32-bit
    address; other IPv6 addresses their 128-bit value (a ``%zone`` is
    ignored). Returns None for anything that is not an address (a Unix
    socket peer, ``b"-"``).
    """
    try:
        if b":" in ip:
            zone = ip.find(b"%")
            if zone != -1:
                ip = ip[:zone]
            value = int.from_bytes(inet_pton(AF_INET6, ip.decode("ascii")), "big")
            if value >> 32 == _MAPPED_PREFIX:
                return _V4 | (value & 0xFFFFFFFF)
            return value
        return _V4 | int.from_bytes(inet_pton(AF_INET, ip.decode("ascii")), "big")
    except (OSError, UnicodeDecodeError, ValueError):
        return None


class Networks:
    """A set of CIDR blocks, matched against ``parse_address`` values.

    Blocks are grouped by prefix length, so a lookup costs one set probe per
    distinct prefix length (at most 162), however long the list is.
    """

    __slots__ = ("_tables",)

    def __init__(
        self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
    ) -> None:
        by_shift: dict[int, set[int]] = {}
        for given in networks:
            net = given
            if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
                mapped = net.network_address.ipv4_mapped
                if mapped is not None:
                    net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
            if isinstance(net, ipaddress.IPv4Network):
                shift = 32 - net.prefixlen
                base = _V4 | int(net.network_address)
            else:
                shift = 128 - net.prefixlen
                base = int(net.network_address)
            by_shift.setdefault(shift, set()).add(base >> shift)
        # Most specific first: deny lists of single hosts are the common case.
        self._tables = tuple((shift, frozenset(by_shift[shift])) for shift in sorted(by_shift))

    def __bool__(self) -> bool:
        return bool(self._tables)

    def __contains__(self, address: int) -> bool:
        # A plain loop: any() over a generator costs more on this per-request path.
        for shift, bases in self._tables:  # noqa: SIM110
            if address >> shift in bases:
                return True
        return False

    @classmethod
    def parse(cls, specs: Sequence[str], source: str, key: str) -> Networks:
        """Parse CIDR blocks (``10.0.0.0/8``, ``2001:db8::/32``, a bare address).

        Host bits are ignored (``10.0.0.1/8`` is ``10.0.0.0/8``), as the config
        loader accepts them. Raises ConfigError naming ``key[i]`` for a block
        that does not parse.
        """
        parsed = []
        for i, spec in enumerate(specs):
            try:
                parsed.append(ipaddress.ip_network(spec.strip(), strict=False))
            except ValueError as exc:
                raise ConfigError(source, f"{key}[{i}]", f"not a network: {exc}") from exc
        return cls(parsed)


# ---- User-Agent patterns ---------------------------------------------------------

_META: Final = frozenset(".^$*+?{}[]()")


def _literal_words(pattern: str) -> list[bytes] | None:
    """The words of a pattern that is only ``word|word|...`` (``re.escape`` allowed), else None.

    A leading ``(?i)`` is dropped: these words are matched case-insensitively anyway.
    """
    text = pattern.removeprefix("(?i)")
    words: list[bytes] = []
    word: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, "")
            if not escaped or escaped.isalnum():
                return None  # a class (\d, \w), an anchor (\b) or a back-reference
            word.append(escaped)
        elif char == "|":
            if not word:
                return None
            words.append("".join(word).encode().lower())
            word = []
        elif char in _META:
            return None
        else:
            word.append(char)
    if not word:
        return None
    words.append("".join(word).encode().lower())
    return words


def _trie_pattern(words: Iterable[bytes]) -> bytes:
    """One regular expression for any of ``words``, factored on common prefixes.

    Python's ``re`` tries alternatives one by one at every position; a trie
    makes it test one character class first, which is several times faster
    on lists of dozens of words.
    """
    ordered = sorted(set(words))
    # A word that contains a shorter word of the list as a prefix adds nothing to a search.
    kept: list[bytes] = []
    for word in ordered:
        if not kept or not word.startswith(kept[-1]):
            kept.append(word)
    root: dict[int, dict[int, Any]] = {}
    for word in kept:
        node = root
        for byte in word:
            node = node.setdefault(byte, {})

    def emit(node: dict[int, Any]) -> bytes:
        alternatives = [re.escape(bytes([byte])) + emit(child) for byte, child in node.items()]
        if len(alternatives) == 1:
            return alternatives[0]
        return b"(?:" + b"|".join(alternatives) + b")" if alternatives else b""

    return emit(root)


class UserAgentPattern:
    """Case-insensitive regular expressions searched in a User-Agent (ASCII case folding).

    Patterns that are plain lists of words (``CRAWLER_USER_AGENTS``, most
    deny lists) are merged into one case-sensitive trie searched in the
    lower-cased text, which ``re`` runs an order of magnitude faster than
    ``re.IGNORECASE`` alternatives; other patterns are compiled as given.
    The constructor raises ``re.error`` for an invalid pattern.
    """

    __slots__ = ("_regexes", "_words")

    def __init__(self, patterns: Sequence[str]) -> None:
        words: list[bytes] = []
        regexes: list[re.Pattern[bytes]] = []
        for pattern in patterns:
            literal = _literal_words(pattern)
            if literal is not None:
                words += literal
            else:
                regexes.append(re.compile(pattern.encode(), re.IGNORECASE))
        self._words = re.compile(_trie_pattern(words)) if words else None
        self._regexes = tuple(regexes)

    def search(self, user_agent: bytes) -> bool:
        """True if any of the patterns is found in ``user_agent``."""
        words = self._words
        if words is not None and words.search(user_agent.lower()) is not None:
            return True
        for regex in self._regexes:  # noqa: SIM110 (no generator on the per-request path)
            if regex.search(user_agent) is not None:
                return True
        return False
