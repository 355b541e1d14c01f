"""What the proxy process runs with: one frozen value, validated by the command line."""

from __future__ import annotations

from dataclasses import dataclass

from tiers.config.model import Address, ProxyConfig
from tiers.proxy.http1 import DEFAULT_LIMITS, Limits
from tiers.proxy.upstream import UpstreamSettings


@dataclass(frozen=True)
class ProxySettings:
    """Everything the proxy process runs with, validated by the command line."""

    listen: Address
    backends: tuple[Address, ...]
    access_log: str | None = None
    health_path: str = ProxyConfig.health_path
    health_interval: float = ProxyConfig.health_interval
    health_timeout: float = ProxyConfig.health_timeout
    health_fall: int = ProxyConfig.health_fall
    health_rise: int = ProxyConfig.health_rise
    connect_timeout: float = ProxyConfig.connect_timeout
    read_timeout: float = ProxyConfig.read_timeout
    client_idle_timeout: float = ProxyConfig.client_idle_timeout
    header_timeout: float = ProxyConfig.header_timeout
    shutdown_timeout: float = 10.0
    limits: Limits = DEFAULT_LIMITS

    @classmethod
    def from_config(
        cls, config: ProxyConfig, backends: tuple[Address, ...], access_log: str | None
    ) -> ProxySettings:
        return cls(
            listen=config.listen,
            backends=backends,
            access_log=access_log,
            health_path=config.health_path,
            health_interval=config.health_interval,
            health_timeout=config.health_timeout,
            health_fall=config.health_fall,
            health_rise=config.health_rise,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            client_idle_timeout=config.client_idle_timeout,
            header_timeout=config.header_timeout,
        )

    def upstream_settings(self) -> UpstreamSettings:
        return UpstreamSettings(
            health_path=self.health_path,
            health_interval=self.health_interval,
            health_timeout=self.health_timeout,
            health_fall=self.health_fall,
            health_rise=self.health_rise,
            connect_timeout=self.connect_timeout,
        )
