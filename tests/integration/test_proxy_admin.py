"""The admin listener of a real proxy process: token, status JSON, Prometheus metrics."""

from __future__ import annotations

import http.client
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.stackctl import free_ports
from tests.integration.proxykit import FAST_HEALTH, Backend, Proxy

TOKEN = "s3cret-token-for-tests-0123"


def topology(tmp_path: Path, servers: list[Backend], admin_port: int, token: str | None) -> Path:
    listed = ", ".join(f'"{b.address}"' for b in servers)
    text = (f"[app]\nport = 1\n[proxy.pools.web]\nservers = [{listed}]\n"
            f'[[proxy.routes]]\npool = "web"\n'
            f'[proxy.admin]\nlisten = "127.0.0.1:{admin_port}"\n')
    if token:
        text += f'token = "{token}"\n'
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    return path


def admin_get(port: int, path: str, token: str | None,
              method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def start(tmp_path: Path, servers: list[Backend], token: str | None,
          extra: list[str] | None = None) -> tuple[Proxy, int]:
    (admin_port,) = free_ports(1)
    path = topology(tmp_path, servers, admin_port, token)
    args = ["--topology", str(path), "--access-log", str(tmp_path / "access.log"),
            *(extra or [])]
    return Proxy(args, tmp_path / "access.log"), admin_port


def test_status_and_metrics_need_the_token(
        tmp_path: Path, backends: Callable[[int], list[Backend]]) -> None:
    (a,) = backends(1)
    proxy, admin_port = start(tmp_path, [a], TOKEN)
    try:
        for _ in range(3):
            status, _, _ = proxy.get("/hello")
            assert status == 200
        code, body, headers = admin_get(admin_port, "/status", None)
        assert code == 401 and "Bearer" in headers["WWW-Authenticate"]
        code, _, _ = admin_get(admin_port, "/status", "wrong-token-of-some-length")
        assert code == 401

        code, body, headers = admin_get(admin_port, "/status", TOKEN)
        assert code == 200 and headers["Content-Type"] == "application/json"
        info: dict[str, Any] = json.loads(body)
        assert info["requests"]["2xx"] >= 3
        pools = {pool["name"]: pool for pool in info["pools"]}
        (server,) = pools["web"]["servers"]
        assert server["address"] == a.address and server["state"] == "up"
        assert server["requests"] == 3 and server["active"] == 0
        assert info["abuse"]["allowed"] == 3

        code, body, headers = admin_get(admin_port, "/metrics", TOKEN)
        assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        assert 'tiers_proxy_requests_total{code="2xx"} 3' in text
        assert f'tiers_proxy_server_up{{pool="web",server="{a.address}"}} 1' in text
        assert f'tiers_proxy_server_requests_total{{pool="web",server="{a.address}"}} 3' in text
        assert "# TYPE tiers_proxy_requests_total counter" in text

        assert admin_get(admin_port, "/nothing", TOKEN)[0] == 404
        assert admin_get(admin_port, "/metrics", TOKEN, method="POST")[0] == 405
    finally:
        proxy.stop()


def test_a_generated_token_is_written_for_the_operator(
        tmp_path: Path, backends: Callable[[int], list[Backend]]) -> None:
    (a,) = backends(1)
    token_file = tmp_path / "admin.token"
    proxy, admin_port = start(tmp_path, [a], None, ["--admin-token-file", str(token_file),
                                                    *FAST_HEALTH])
    try:
        token = token_file.read_text().strip()
        assert len(token) >= 24
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert admin_get(admin_port, "/status", token)[0] == 200
        assert admin_get(admin_port, "/status", None)[0] == 401
    finally:
        proxy.stop()
