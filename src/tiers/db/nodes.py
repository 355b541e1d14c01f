"""Database nodes as the router sees them: names, DSNs, and the app servers' environment.

A node is a name and a DSN (for PostgreSQL a libpq conninfo string or URI;
the DSN's scheme chooses the engine, :func:`tiers.db.engine.engine_for_dsn`).
Names are stable identities, not roles: after a failover the node called
``db-primary`` may be a replica. Where only DSNs are known (the environment of an app server),
:func:`node_names` names each node by its ``host:port/dbname``.

App servers learn about the databases from the environment the stack gives
them (:func:`settings_from_env`):

    TIERS_DB_PRIMARY           DSN of the node believed to be the primary (required)
    TIERS_DB_REPLICAS          comma-separated DSNs of the other nodes (optional)
    TIERS_DB_CAUSAL_WAIT       seconds a causal read waits for a replica (default 0.05)
    TIERS_DB_MONITOR_INTERVAL  seconds between health rounds (default 0.25)

A bad value raises :class:`tiers.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tiers.db.engine import Connection, Engine, UnsupportedEngine, engine_for_dsn
from tiers.errors import ConfigError

__all__ = [
    "CAUSAL_WAIT_ENV",
    "MONITOR_INTERVAL_ENV",
    "PRIMARY_ENV",
    "REPLICAS_ENV",
    "Connection",
    "Connector",
    "EnvSettings",
    "describe_dsn",
    "node_names",
    "one_line",
    "settings_from_env",
]

# (dsn, connect timeout in seconds) -> an open connection with autocommit off.
Connector = Callable[[str, float], Connection]

PRIMARY_ENV = "TIERS_DB_PRIMARY"
REPLICAS_ENV = "TIERS_DB_REPLICAS"
CAUSAL_WAIT_ENV = "TIERS_DB_CAUSAL_WAIT"
MONITOR_INTERVAL_ENV = "TIERS_DB_MONITOR_INTERVAL"

DEFAULT_CAUSAL_WAIT = 0.05
DEFAULT_MONITOR_INTERVAL = 0.25
_MAX_SECONDS = 3600.0


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, without the password, for messages; never raises.

    Asks the DSN's engine (:meth:`tiers.db.engine.Engine.address`);
    ``<unparsable conninfo>`` if it cannot say.
    """
    try:
        return engine_for_dsn(dsn).address(dsn)
    except ValueError:
        return "<unparsable conninfo>"


def node_names(dsns: Sequence[str]) -> list[str]:
    """A name per DSN: its ``host:port/dbname``, with ``#2``, ``#3`` ... on repeats."""
    names: list[str] = []
    for dsn in dsns:
        base = name = describe_dsn(dsn)
        count = 1
        while name in names:
            count += 1
            name = f"{base}#{count}"
        names.append(name)
    return names


def one_line(exc: BaseException) -> str:
    """An error's message on one line, for messages that wrap it."""
    text = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


@dataclass(frozen=True)
class EnvSettings:
    """What the environment says: nodes by name (the believed primary first), their
    engine (by the DSNs' scheme) and timings."""

    nodes: dict[str, str]
    primary: str
    causal_wait: float
    monitor_interval: float
    engine: Engine


def settings_from_env(env: Mapping[str, str]) -> EnvSettings:
    """Read the variables in the module docstring; ConfigError names a missing or bad one.

    A DSN listed twice (or the primary among the replicas) is one node. A
    DSN whose scheme names an engine tiers has no adapter for, or another
    engine than the primary's, is a bad value too.
    """
    primary = env.get(PRIMARY_ENV, "").strip()
    if not primary:
        raise ConfigError("environment", PRIMARY_ENV, "not set")
    replicas = [part.strip() for part in env.get(REPLICAS_ENV, "").split(",")]
    replicas = [part for part in dict.fromkeys(replicas) if part and part != primary]
    engine: Engine | None = None
    for key, dsn in [(PRIMARY_ENV, primary)] + [(REPLICAS_ENV, r) for r in replicas]:
        try:
            found = engine_for_dsn(dsn)
        except UnsupportedEngine as exc:
            raise ConfigError("environment", key, str(exc)) from None
        if engine is not None and found is not engine:
            raise ConfigError("environment", key,
                              f"a {found.name} node in a cluster of {engine.name}")
        engine = found
        try:
            engine.address(dsn)
        except ValueError as exc:
            raise ConfigError("environment", key, str(exc)) from exc
    assert engine is not None
    dsns = [primary, *replicas]
    names = node_names(dsns)
    return EnvSettings(
        nodes=dict(zip(names, dsns, strict=True)),
        primary=names[0],
        causal_wait=_seconds(env, CAUSAL_WAIT_ENV, DEFAULT_CAUSAL_WAIT, zero_ok=True),
        monitor_interval=_seconds(env, MONITOR_INTERVAL_ENV, DEFAULT_MONITOR_INTERVAL,
                                  zero_ok=False),
        engine=engine,
    )


def _seconds(env: Mapping[str, str], key: str, default: float, *, zero_ok: bool) -> float:
    text = env.get(key, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("environment", key, f"not a number of seconds: {text!r}") from None
    if not (0 <= value < _MAX_SECONDS) or (value == 0 and not zero_ok):
        bound = "at least 0" if zero_ok else "above 0"
        raise ConfigError("environment", key,
                          f"must be {bound} and below {_MAX_SECONDS:g} seconds")
    return value
