"""Run real stacks for end-to-end tests: temp state dirs, ephemeral ports, nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out as free right now (held together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class StackHandle:
    """One stack under test: its state dir, topology file and ports."""

    root: Path
    proxy_port: int
    app_ports: list[int]
    db_ports: list[int]
    admin_port: int = 0
    cache_ports: list[int] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def topology(self) -> Path:
        return self.root / "tiers.toml"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def tiers(self, *args: str, timeout: float = 180.0,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tiers", "--state-dir", str(self.state_dir),
                   "--file", str(self.topology), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"tiers {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.tiers("status", "--json").stdout)
        return result

    def service(self, name: str) -> dict[str, Any]:
        return next(s for s in self.status()["services"] if s["name"] == name)

    def processes(self) -> list[psutil.Process]:
        """Every live process of the stack: supervisor, services and their groups."""
        try:
            recorded = json.loads((self.state_dir / "status.json").read_text())
        except FileNotFoundError:
            return []
        leaders = {recorded.get("supervisor_pid")}
        leaders |= {s["pid"] for s in recorded["services"] if s.get("pid")}
        found = []
        for process in psutil.process_iter():
            try:
                in_stack = process.pid in leaders or os.getpgid(process.pid) in leaders
                if in_stack and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_topology(handle: StackHandle, extra: str = "", cache_extra: str = "") -> None:
    cache_ports = ", ".join(map(str, handle.cache_ports))
    app_ports = ", ".join(map(str, handle.app_ports))
    db_ports = ", ".join(map(str, handle.db_ports))
    handle.topology.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{handle.proxy_port}"\n'
        f'[proxy.admin]\nlisten = "127.0.0.1:{handle.admin_port}"\n\n'
        f"[app]\ncount = {len(handle.app_ports)}\nworkers = 2\nports = [{app_ports}]\n\n"
        f"[db]\nreplicas = {len(handle.db_ports) - 1}\nports = [{db_ports}]\n\n"
        f"[cache]\nnodes = {len(handle.cache_ports)}\nports = [{cache_ports}]\n"
        f"{cache_extra}\n"
        f"{extra}")


def make_handle(root: Path, apps: int = 2, replicas: int = 1, extra: str = "", *,
                caches: int = 1, cache_extra: str = "") -> StackHandle:
    """A stack's topology on free ports; ``cache_extra`` adds lines to its [cache] table."""
    ports = free_ports(1 + apps + replicas + 1 + 1 + caches)
    db_end = 1 + apps + replicas + 1
    handle = StackHandle(root=root, proxy_port=ports[0], app_ports=ports[1:1 + apps],
                         db_ports=ports[1 + apps:db_end], admin_port=ports[db_end],
                         cache_ports=ports[db_end + 1:])
    write_topology(handle, extra, cache_extra)
    return handle


def tear_down(handle: StackHandle) -> None:
    """Stop whatever is left, however the test ended."""
    handle.tiers("down", check=False, timeout=120)
    for process in handle.processes():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, 9)
