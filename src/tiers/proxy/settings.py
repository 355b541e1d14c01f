"""What the proxy process runs with: one frozen value, validated by the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from tiers.config.model import Address, ProxyConfig
from tiers.config.proxy import AdminConfig, Pool, ProxyPolicy, Route, RouteKind, Server
from tiers.proxy.requestparser import DEFAULT_LIMITS, Limits
from tiers.proxy.upstream import UpstreamSettings


@dataclass(frozen=True)
class ProxySettings:
    """Everything the proxy process runs with, validated by the command line."""

    listen: Address
    backends: tuple[Address, ...] = ()
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
    send_timeout: float = ProxyConfig.send_timeout
    shutdown_timeout: float = 10.0
    limits: Limits = DEFAULT_LIMITS
    # Routes, pools, limits, cache, admin. Empty pools: one pool of ``backends``
    # that every request goes to (the command line's --backend form).
    policy: ProxyPolicy = field(default_factory=ProxyPolicy)
    # Where a generated admin token is written (None: not written anywhere).
    admin_token_file: str | None = None
    # Processes sharing the port with SO_REUSEPORT; see tiers.proxy.workers.
    workers: int = 1
    worker: int = 0  # this process's index among them
    # With several workers: the name their peer sockets share (tiers.proxy.peers).
    peer_prefix: str | None = None

    def __post_init__(self) -> None:
        if not self.policy.pools:
            pool = Pool(name="default", servers=tuple(Server(a) for a in self.backends))
            route = Route(name="default", kind=RouteKind.POOL, pool="default")
            policy = ProxyPolicy(pools=(pool,), routes=(route,),
                                 admin=AdminConfig(listen=None))
            object.__setattr__(self, "policy", policy)
        elif not self.backends:
            servers = {s.address: None for p in self.policy.pools for s in p.servers}
            object.__setattr__(self, "backends", tuple(servers))

    @classmethod
    def from_config(
        cls, config: ProxyConfig, access_log: str | None, admin_token_file: str | None = None
    ) -> ProxySettings:
        """Settings from the topology's [proxy] section (pools and routes included)."""
        return cls(
            listen=config.listen,
            access_log=access_log,
            admin_token_file=admin_token_file,
            policy=config.policy,
            workers=config.workers,
            health_path=config.health_path,
            health_interval=config.health_interval,
            health_timeout=config.health_timeout,
            health_fall=config.health_fall,
            health_rise=config.health_rise,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            client_idle_timeout=config.client_idle_timeout,
            header_timeout=config.header_timeout,
            send_timeout=config.send_timeout,
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
