"""Several proxy workers on one port: spread, respawn, reload and stop through the master,
and one admin listener that speaks for all of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import require
from tests.e2e.stackctl import free_ports
from tests.integration.proxykit import Backend, Proxy, _wait
from tests.integration.test_proxy_admin import TOKEN, admin_get
from tiers.proxy.accesslog import parse_line
from tiers.proxy.peers import PeerListener, ask, new_prefix, socket_name


def workers_of(proxy: Proxy) -> list[psutil.Process]:
    workers = []
    for child in psutil.Process(proxy.process.pid).children():
        # A child may be reaped between the listing and this look at it.
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
    return workers


def test_workers_share_the_port_and_are_kept_at_their_count(
        backends: Callable[[int], list[Backend]], proxy: Callable[..., Proxy]) -> None:
    (a,) = backends(1)
    p = proxy([a], "--workers", "2")
    assert _wait(lambda: len(workers_of(p)) == 2, 5)
    # Both workers listen (each says so) before the connections that should spread.
    assert _wait(lambda: sum("listening on" in line for line in p.lines) == 2, 5)
    for i in range(40):  # a new connection each: the kernel spreads them
        status, _, _ = p.get(f"/spread/{i}")
        assert status == 200

    def spread_ids() -> list[bytes]:
        lines = [parse_line(line) for line in p.access_log.read_bytes().splitlines()]
        return [line["reqid"] for line in lines if line["uri"].startswith(b"/spread/")]

    # Each worker writes its log lines within a second; read them before one
    # of the workers is killed with its buffer.
    assert _wait(lambda: len(spread_ids()) == 40, 5)
    prefixes = {reqid.split(b"-")[0] for reqid in spread_ids()}
    assert len(prefixes) == 2  # both workers served some of the 40 connections

    first = workers_of(p)
    victim = first[1]
    victim.kill()
    assert _wait(lambda: len(workers_of(p)) == 2
                 and victim.pid not in {w.pid for w in workers_of(p)}, 10)
    p.wait_for(rf"worker \d \(pid {victim.pid}\) was killed by SIGKILL", timeout=5)
    # Its replacement listens too before it is told anything.
    assert _wait(lambda: sum("listening on" in line for line in p.lines) == 3, 10)
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


def test_a_stop_while_a_worker_is_about_to_be_started_again_stops_everything(
        backends: Callable[[int], list[Backend]], proxy: Callable[..., Proxy]) -> None:
    (a,) = backends(1)
    p = proxy([a], "--workers", "2")
    assert _wait(lambda: sum("listening on" in line for line in p.lines) == 2, 10)
    children = workers_of(p)
    victim = children[0]
    victim.kill()
    p.wait_for(rf"worker \d \(pid {victim.pid}\) was killed by SIGKILL", timeout=5)
    mark = len(p.lines)
    # The master pauses before it starts the worker again; a stop in that
    # pause ends the proxy without a new worker.
    assert p.stop(timeout=10) == 0
    assert not any("listening on" in line for line in p.lines[mark:]), p.lines[mark:]
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def _start_with_admin(tmp_path: Path, backend: Backend) -> tuple[Proxy, int]:
    (admin_port,) = free_ports(1)
    path = tmp_path / "tiers.toml"
    path.write_text(f'[app]\nport = 1\n[proxy]\nworkers = 2\n'
                    f'[proxy.pools.web]\nservers = ["{backend.address}"]\n'
                    f'[[proxy.routes]]\npool = "web"\n'
                    f'[proxy.admin]\nlisten = "127.0.0.1:{admin_port}"\ntoken = "{TOKEN}"\n')
    proxy = Proxy(["--topology", str(path), "--access-log", str(tmp_path / "access.log")],
                  tmp_path / "access.log")
    assert _wait(lambda: len(workers_of(proxy)) == 2, 5)
    # Both workers listen once each has said so.
    assert _wait(lambda: sum("listening on" in line for line in proxy.lines) == 2, 10)
    return proxy, admin_port


def _status(admin_port: int) -> dict[str, Any]:
    code, body, _ = admin_get(admin_port, "/status", TOKEN)
    assert code == 200, body
    answer: dict[str, Any] = json.loads(body)
    return answer


def test_the_admin_listener_reports_every_worker(
        tmp_path: Path, backends: Callable[[int], list[Backend]]) -> None:
    (a,) = backends(1)
    p, admin_port = _start_with_admin(tmp_path, a)
    try:
        for i in range(40):  # a new connection each: the kernel spreads them
            assert p.get(f"/spread/{i}")[0] == 200
        info = _status(admin_port)
        assert (info["workers"], info["answered"]) == (2, 2)
        assert info["requests"] == {"2xx": 40}
        pool = next(pool for pool in info["pools"] if pool["name"] == "web")
        (server,) = pool["servers"]
        assert (server["requests"], server["state"], server["states"]) == (40, "up", ["up", "up"])
        per_worker = info["per_worker"]
        assert {w["pid"] for w in per_worker} == {w.pid for w in workers_of(p)}
        assert all(w["requests"] > 0 for w in per_worker)  # both served some
        assert sum(w["requests"] for w in per_worker) == 40

        code, body, _ = admin_get(admin_port, "/metrics", TOKEN)
        assert code == 200
        samples = re.findall(r'tiers_proxy_requests_total\{code="2xx",worker="(\d)"\} (\d+)',
                             body.decode())
        assert sorted(w for w, _ in samples) == ["0", "1"]
        assert sum(int(n) for _, n in samples) == 40
    finally:
        p.stop()


def test_purges_and_posts_reach_every_workers_cache_and_a_silent_worker_is_named(
        tmp_path: Path, backends: Callable[[int], list[Backend]]) -> None:
    (a,) = backends(1)
    p, admin_port = _start_with_admin(tmp_path, a)
    try:
        # New connections until both workers hold the page in their caches.
        assert _wait(lambda: p.get("/cacheable")[0] == 200
                     and _status(admin_port)["cache"]["entries"] == 2, 10)
        code, body, _ = admin_get(admin_port, "/cache/purge?url=127.0.0.1", TOKEN,
                                  method="POST")
        assert (code, json.loads(body)) == (200, {"purged": 2})
        assert _status(admin_port)["cache"]["entries"] == 0
        fetched = len(a.requests(path="/cacheable"))
        assert p.get("/cacheable")[0] == 200
        assert len(a.requests(path="/cacheable")) == fetched + 1  # a miss: it was purged

        # A successful POST drops the page in the other worker's cache too
        # (and the client need not read the answer for that).
        assert _wait(lambda: p.get("/cacheable")[0] == 200
                     and _status(admin_port)["cache"]["entries"] == 2, 10)
        conn = p.connection()
        try:
            conn.request("POST", "/cacheable", body=b"x=1")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        assert _wait(lambda: _status(admin_port)["cache"]["entries"] == 0, 5)

        # A worker that cannot answer is reported as such, and a purge that
        # could not reach it says so rather than claiming success.
        index0 = _status(admin_port)["per_worker"][0]["pid"]
        other = next(w for w in workers_of(p) if w.pid != index0)
        other.suspend()
        try:
            info = _status(admin_port)
            assert (info["workers"], info["answered"]) == (2, 1)
            assert info["per_worker"][1] == {"worker": 1, "answered": False}
            code, body, _ = admin_get(admin_port, "/cache/purge?url=127.0.0.1", TOKEN,
                                      method="POST")
            assert code == 503 and b"workers 1 did not answer" in body
        finally:
            other.resume()
        assert _wait(lambda: _status(admin_port)["answered"] == 2, 5)
    finally:
        p.stop()


def test_a_worker_started_again_after_a_reload_serves_the_new_configuration(
        tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"

    def configure(body: str) -> None:
        path.write_text(f'[app]\nport = 1\n[proxy]\nworkers = 2\n[proxy.admin]\nlisten = false\n'
                        f'[[proxy.routes]]\nrespond = 200\nbody = "{body}"\n')

    configure("before")
    p = Proxy(["--topology", str(path)], tmp_path / "access.log")
    try:
        assert _wait(lambda: sum("listening on" in line for line in p.lines) == 2, 10)
        configure("after")
        mark = len(p.lines)
        p.process.send_signal(signal.SIGHUP)
        assert _wait(lambda: sum("configuration reloaded" in line
                                 for line in p.lines[mark:]) == 2, 5)
        victim = workers_of(p)[0]
        victim.kill()
        assert _wait(lambda: len(workers_of(p)) == 2
                     and victim.pid not in {w.pid for w in workers_of(p)}, 10)
        assert _wait(lambda: sum("listening on" in line for line in p.lines[mark:]) == 1, 10)
        bodies = {p.get(f"/{i}")[1] for i in range(20)}  # a new connection each
        assert bodies == {b"after"}
    finally:
        p.stop()


def test_a_peer_socket_answers_its_own_user_only() -> None:
    # Abstract socket names have no file permissions: the worker checks who asks.
    require(os.geteuid() == 0, "connecting as another user needs root")
    nobody = pwd.getpwnam("nobody").pw_uid
    prefix = new_prefix()

    async def status(_argument: str) -> dict[str, bool]:
        return {"ok": True}

    async def scenario() -> tuple[Any, bytes]:
        listener = PeerListener(prefix, 0, {"status": status})
        await listener.start()
        try:
            mine = await ask(prefix, 0, "status", 2.0)
            theirs = await asyncio.get_running_loop().run_in_executor(
                None, _ask_as, nobody, socket_name(prefix, 0))
            return mine, theirs
        finally:
            await listener.close()

    mine, theirs = asyncio.run(scenario())
    assert mine == {"ok": True}
    assert theirs == b""  # closed without an answer


def _ask_as(uid: int, name: str) -> bytes:
    """What a process running as ``uid`` reads after sending ``status`` to socket ``name``."""
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(readable)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(name)
                try:
                    sock.sendall(b"status\n")
                    answer = sock.recv(1000)
                except (BrokenPipeError, ConnectionResetError):
                    # Closed before the command went out, or with it unread.
                    answer = b""
                os.write(writable, b"answer:" + answer)
            code = 0
        finally:
            os._exit(code)
    os.close(writable)
    with os.fdopen(readable, "rb") as pipe:
        got = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got.startswith(b"answer:")
    return got.removeprefix(b"answer:")
