"""``python -m tiers.app`` as a process: serving, recycling, stopping, dying with its master."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prefork on Linux")

MINI_APP = """
import os, time
from urllib.parse import parse_qs

def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if environ["PATH_INFO"] == "/slow":
        open(query["mark"][0], "w").close()
        time.sleep(float(query["secs"][0]))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.port = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log:\n{self.text()}")

    def get(self, path: str, timeout: float = 20.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def workers(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.proc.pid).children()]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    (tmp_path / "tiers_mini_app.py").write_text(MINI_APP)
    started: list[Server] = []

    def run(*extra: str, app: str = "tiers_mini_app:app", wait: bool = True) -> Server:
        log = tmp_path / f"server{len(started)}.log"
        argv = [
            sys.executable, "-m", "tiers.app",
            "--name", "apptest",
            "--bind", "127.0.0.1:0",
            "--app", app,
            "--pythonpath", str(tmp_path),
            *extra,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = Server(proc, log)
        started.append(server)
        if wait:
            server.port = int(server.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
            server.wait_for(r"Booting worker")
        return server

    yield run
    for server in started:
        # The server runs in its own session: end its whole group, workers included.
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
        else:
            # Workers may outlive a killed master; the group is gone once they are.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_serves_the_app_and_the_health_check(start: Callable[..., Server]) -> None:
    server = start("--workers", "2")
    assert server.get("/_tiers/health") == (200, "ok")
    status, body = server.get("/anything")
    assert status == 200
    assert int(body) in server.workers()
    assert "[apptest]" in server.text()
    assert "Using worker: gthread" in server.text()


def test_workers_recycle_after_max_requests(start: Callable[..., Server]) -> None:
    server = start("--workers", "1", "--max-requests", "3", "--max-requests-jitter", "0")
    pids = set()
    for _ in range(10):
        status, body = server.get("/")
        assert status == 200
        pids.add(int(body))
    assert len(pids) >= 2
    assert "Autorestarting worker" in server.text()


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(
    start: Callable[..., Server], tmp_path: Path
) -> None:
    server = start("--workers", "1", "--graceful-timeout", "10")
    mark = tmp_path / "in-flight"
    result: list[tuple[int, str]] = []
    request = threading.Thread(
        target=lambda: result.append(server.get(f"/slow?secs=1.5&mark={mark}"))
    )
    request.start()
    deadline = time.monotonic() + 10
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mark.exists()
    server.proc.send_signal(signal.SIGTERM)
    request.join(15)
    assert result and result[0][0] == 200
    assert server.proc.wait(15) == 0


def test_graceful_timeout_bounds_the_stop(start: Callable[..., Server], tmp_path: Path) -> None:
    server = start("--workers", "1", "--graceful-timeout", "1")
    mark = tmp_path / "in-flight"

    def doomed_request() -> None:
        # The worker is killed under it: the connection drops, as it should.
        with pytest.raises((http.client.HTTPException, OSError)):
            server.get(f"/slow?secs=60&mark={mark}", timeout=70)

    threading.Thread(target=doomed_request, daemon=True).start()
    deadline = time.monotonic() + 10
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = server.workers()
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    # One second of grace plus the master's polling, far from the request's 60 s.
    assert time.monotonic() - began < 10
    assert all(gone(pid) for pid in workers)


def test_workers_exit_when_the_master_is_killed(start: Callable[..., Server]) -> None:
    server = start("--workers", "2")
    deadline = time.monotonic() + 10
    while len(server.workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = server.workers()
    assert len(workers) == 2
    server.proc.kill()
    server.proc.wait(5)
    deadline = time.monotonic() + 3
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(gone(pid) for pid in workers)


def test_import_error_exits_4_with_a_clear_message(start: Callable[..., Server]) -> None:
    server = start(app="tiers_no_such_module:app", wait=False)
    assert server.proc.wait(20) == 4
    text = server.text()
    assert "tiers.app[apptest]" in text
    assert "cannot import 'tiers_no_such_module'" in text
    assert "Listening at" not in text
