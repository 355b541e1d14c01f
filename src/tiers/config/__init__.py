"""Topology configuration: frozen typed values loaded once from ``tiers.toml``."""

from tiers.config.loader import load_topology
from tiers.config.model import (
    Address,
    AppConfig,
    DbConfig,
    ProxyConfig,
    SupervisorConfig,
    Topology,
    WorkerConfig,
)

__all__ = [
    "Address",
    "AppConfig",
    "DbConfig",
    "ProxyConfig",
    "SupervisorConfig",
    "Topology",
    "WorkerConfig",
    "load_topology",
]
