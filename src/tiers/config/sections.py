"""Typed, key-checked access to the tables of a topology file.

Every accessor raises ConfigError naming the file, the dotted key and the
reason, so a mistake is reported before anything starts.
"""

from __future__ import annotations

from typing import Any

from tiers.config.address import Address
from tiers.errors import ConfigError


class Section:
    """Typed access to one table of the file that remembers which keys were used."""

    def __init__(self, source: str, name: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(source, name, "must be a table")
        self.source = source
        self.name = name
        self.raw: dict[str, Any] = raw

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, f"{self.name}.{key}", reason)

    def check_keys(self, allowed: set[str]) -> None:
        unknown = sorted(set(self.raw) - allowed)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known: {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in self.raw:
            return default
        value = self.raw[key]
        # bool is an int in Python; a count of `true` is a mistake, not 1.
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(key, f"expected {kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.fail(key, f"expected {kind_name(kinds)}, got {type(value).__name__}")
        if float in kinds and isinstance(value, int):
            return float(value)
        return value

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        value: int = self.get(key, int, default)
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise self.fail(key, f"must be {bounds}, got {value}")
        return value

    def seconds(self, key: str, default: float, low: float = 0.001) -> float:
        value: float = self.get(key, (int, float), default)
        if value < low:
            raise self.fail(key, f"must be at least {low} seconds, got {value}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A string or a list of strings, as a tuple."""
        value = self.get(key, (str, list), None)
        if value is None:
            return default
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(item, str) for item in items):
            raise self.fail(key, "must be a string or a list of strings")
        return tuple(items)

    def sub(self, key: str) -> Section:
        """A nested table (empty when absent)."""
        return Section(self.source, f"{self.name}.{key}", self.raw.get(key, {}))

    def port(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"a port must be an integer, got {value!r}")
        if not 1 <= value <= 65535:
            raise self.fail(key, f"port {value} is outside 1-65535")
        return value

    def ports(self, count: int, default_base: int) -> tuple[int, ...]:
        """``ports = [..]`` (exactly ``count`` of them) or ``port = base`` counting up."""
        if "ports" in self.raw and "port" in self.raw:
            raise self.fail("ports", "give either 'port' (the first) or 'ports' (all), not both")
        if "ports" in self.raw:
            listed = self.raw["ports"]
            if not isinstance(listed, list):
                raise self.fail("ports", "must be a list of integers")
            if len(listed) != count:
                raise self.fail("ports", f"needs exactly {count} ports, got {len(listed)}")
            return tuple(self.port("ports", p) for p in listed)
        base = self.port("port", self.raw.get("port", default_base))
        if base + count - 1 > 65535:
            raise self.fail("port", f"{count} ports from {base} run past 65535")
        return tuple(range(base, base + count))


def kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_address(section: Section, key: str, default: Address) -> Address:
    text = section.get(key, str, None)
    if text is None:
        return default
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise section.fail(key, f"expected 'host:port', got {text!r}")
    return Address(host.strip("[]"), section.port(key, int(port_text)))
