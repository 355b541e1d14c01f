"""Several proxy workers on one port: spread, respawn, reload and stop through the master."""

from __future__ import annotations

import signal
from collections.abc import Callable

import psutil

from tests.integration.proxykit import Backend, Proxy, _wait
from tiers.proxy.accesslog import parse_line


def workers_of(proxy: Proxy) -> list[psutil.Process]:
    return [c for c in psutil.Process(proxy.process.pid).children()
            if c.status() != psutil.STATUS_ZOMBIE]


def test_workers_share_the_port_and_are_kept_at_their_count(
        backends: Callable[[int], list[Backend]], proxy: Callable[..., Proxy]) -> None:
    (a,) = backends(1)
    p = proxy([a], "--workers", "2")
    assert _wait(lambda: len(workers_of(p)) == 2, 5)
    p.wait_for(r"listening on", timeout=5)
    for i in range(40):  # a new connection each: the kernel spreads them
        status, _, _ = p.get(f"/spread/{i}")
        assert status == 200

    first = workers_of(p)
    victim = first[1]
    victim.kill()
    assert _wait(lambda: len(workers_of(p)) == 2
                 and victim.pid not in {w.pid for w in workers_of(p)}, 10)
    p.wait_for(rf"worker \d \(pid {victim.pid}\) was killed by SIGKILL", timeout=5)
    for i in range(5):
        status, _, _ = p.get(f"/after/{i}")
        assert status == 200

    mark = len(p.lines)
    children = workers_of(p)
    p.process.send_signal(signal.SIGHUP)  # passed on to each worker, which stays up
    assert _wait(lambda: sum("nothing to reload" in line for line in p.lines[mark:]) == 2, 5)
    assert {c.pid for c in workers_of(p)} == {c.pid for c in children}
    assert p.stop() == 0
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    prefixes = {parse_line(line)["reqid"].split(b"-")[0]
                for line in p.access_log.read_bytes().splitlines()
                if parse_line(line)["uri"].startswith(b"/spread/")}
    assert len(prefixes) == 2  # both workers served some of the 40 connections
