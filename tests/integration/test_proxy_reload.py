"""SIGHUP reloads the topology without dropping requests in flight or open connections."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

from tests.integration.proxykit import Backend, Proxy, _json, _wait


def write_topology(path: Path, backend: Backend, extra: str = "") -> None:
    path.write_text(f'[app]\nport = 1\n[proxy.admin]\nlisten = false\n'
                    f'[proxy.pools.web]\nservers = ["{backend.address}"]\n'
                    f'[[proxy.routes]]\npool = "web"\n{extra}')


def test_reload_switches_pools_without_dropping_anything(
        tmp_path: Path, backends: Callable[[int], list[Backend]]) -> None:
    a, b = backends(2)
    topology = tmp_path / "tiers.toml"
    write_topology(topology, a)
    p = Proxy(["--topology", str(topology)], tmp_path / "unused.log")
    try:
        kept = p.connection()
        kept.request("GET", "/before")
        response = kept.getresponse()
        assert _json(response.read())["backend"] == "A"

        slow_result: list[tuple[int, str]] = []

        def slow() -> None:
            conn = p.connection()
            conn.request("GET", "/slow?s=1.0")
            answer = conn.getresponse()
            slow_result.append((answer.status, _json(answer.read())["backend"]))
            conn.close()

        in_flight = threading.Thread(target=slow)
        in_flight.start()
        assert _wait(lambda: bool(a.requests("GET", "/slow?s=1.0")), 5)
        mark = len(p.lines)
        write_topology(topology, b)
        p.process.send_signal(signal.SIGHUP)
        p.wait_for(r"configuration reloaded", timeout=5, start=mark)

        # The connection opened before the reload carries on, to the new pool.
        kept.request("GET", "/after")
        assert _json(kept.getresponse().read())["backend"] == "B"
        kept.close()
        in_flight.join(10)
        assert slow_result == [(200, "A")]  # finished on the pool it started with

        # A broken file is refused and the running configuration kept.
        mark = len(p.lines)
        topology.write_text("[[proxy.routes]]\npool = 'nowhere'\n")
        p.process.send_signal(signal.SIGHUP)
        p.wait_for(r"reload failed, keeping the running configuration", timeout=5, start=mark)
        status, body, _ = p.get("/still")
        assert status == 200 and _json(body)["backend"] == "B"
    finally:
        assert p.stop() == 0
