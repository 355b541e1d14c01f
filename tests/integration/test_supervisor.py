"""The runner with real processes and signals: readiness, restart, graceful stop, SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path

import psutil

from tiers.config.model import SupervisorConfig
from tiers.supervisor.plan import Phase, Plan, Service, ServiceState
from tiers.supervisor.runner import Command, Runner, ServiceSpec
from tiers.supervisor.statedir import StateDir

# A tiny server: listens, writes its pid, optionally ignores SIGTERM, logs a line on stop.
SERVER = """
import os, signal, socket, sys, time
port, ignore_term = int(sys.argv[1]), sys.argv[2] == "1"
def stop(*_):
    print("stopping", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else stop)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen()
print("listening", port, flush=True)
while True:
    time.sleep(0.05)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        pass


def spec(name: str, port: int, depends: tuple[str, ...] = (), ignore_term: bool = False,
         after_ready: object = None) -> ServiceSpec:
    command = Command([sys.executable, "-c", SERVER, str(port), "1" if ignore_term else "0"])
    return ServiceSpec(name=name, role="test", address=f"127.0.0.1:{port}",
                       prepare=lambda: command, depends=depends,
                       probe=partial(probe, port),
                       after_ready=after_ready)  # type: ignore[arg-type]


class Harness:
    def __init__(self, tmp: Path, specs: list[ServiceSpec], **config: float) -> None:
        self.state = StateDir(tmp / "state")
        self.state.create()
        settings = SupervisorConfig(**{"backoff_initial": 0.1, "stop_timeout": 5.0,
                                       **config})  # type: ignore[arg-type]
        self.plan = Plan([Service(s.name, s.depends) for s in specs], settings)
        self.messages: list[str] = []
        self.runner = Runner(specs, self.plan, self.state, say=self.messages.append)
        self.result: Phase | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = self.runner.run()

    def __enter__(self) -> Harness:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.runner.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive()

    def wait(self, predicate: object, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out; supervisor said: {self.messages}")

    def state_of(self, name: str) -> ServiceState:
        return self.plan.get(name).state


def test_services_start_in_order_and_stop_in_reverse(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    specs = [spec("first", ports[0]), spec("second", ports[1], depends=("first",))]
    with Harness(tmp_path, specs) as h:
        h.wait(lambda: h.plan.phase() is Phase.RUNNING)
        pids = [h.plan.get(n).pid for n in ("first", "second")]
        # The runner writes the status file after the step that made the plan
        # running; this thread may look in between.
        h.wait(lambda: (h.state.read_status() or {}).get("phase") == "running")
        status = h.state.read_status()
        assert status is not None
        assert [s["state"] for s in status["services"]] == ["ready", "ready"]
    assert h.result is Phase.STOPPED
    started = [m for m in h.messages if "started" in m]
    stopped = [m for m in h.messages if m.endswith(": stopped")]
    assert started[0].startswith("first") and started[1].startswith("second")
    assert stopped[0].startswith("second") and stopped[1].startswith("first")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in pids if p)
    assert "stopping" in (tmp_path / "state" / "logs" / "first.log").read_text()


def test_a_killed_service_is_restarted(tmp_path: Path) -> None:
    port = free_port()
    with Harness(tmp_path, [spec("svc", port)]) as h:
        h.wait(lambda: h.state_of("svc") is ServiceState.READY)
        first = h.plan.get("svc").pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        h.wait(lambda: h.state_of("svc") is ServiceState.READY and h.plan.get("svc").pid != first)
        assert h.plan.get("svc").restarts == 1


def test_stop_escalates_to_sigkill_after_the_timeout(tmp_path: Path) -> None:
    port = free_port()
    with Harness(tmp_path, [spec("stubborn", port, ignore_term=True)], stop_timeout=0.5) as h:
        h.wait(lambda: h.state_of("stubborn") is ServiceState.READY)
        pid = h.plan.get("stubborn").pid
        began = time.monotonic()
    assert time.monotonic() - began < 10
    assert any("killing" in m for m in h.messages)
    assert pid is not None and not (psutil.pid_exists(pid)
                                    and psutil.Process(pid).status() != "zombie")


def test_a_failing_post_start_step_fails_the_service(tmp_path: Path) -> None:
    def broken() -> None:
        raise RuntimeError("migration 001 failed")

    port = free_port()
    with Harness(tmp_path, [spec("db", port, after_ready=broken)], max_failed_starts=2) as h:
        h.wait(lambda: h.state_of("db") is ServiceState.FAILED)
        assert "migration 001 failed" in h.plan.get("db").last_error
        h.wait(lambda: h.plan.phase() is Phase.STOPPED)  # a stack that never came up stops
    assert h.result is Phase.FAILED


def test_a_second_stop_request_kills_at_once(tmp_path: Path) -> None:
    port = free_port()
    with Harness(tmp_path, [spec("stubborn", port, ignore_term=True)], stop_timeout=60) as h:
        h.wait(lambda: h.state_of("stubborn") is ServiceState.READY)
        h.runner.request_stop()
        h.wait(lambda: h.state_of("stubborn") is ServiceState.STOPPING)
        began = time.monotonic()
        h.runner.request_stop()
        h.wait(lambda: h.plan.phase() is Phase.STOPPED, timeout=10)
    assert time.monotonic() - began < 10  # not the 60 s stop timeout
    assert any("killing every service" in m for m in h.messages)
