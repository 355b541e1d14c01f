"""The state directory: the one place a stack keeps everything it owns.

    <state dir>/
      supervisor.lock   held (flock) by the running supervisor; the kernel drops it on death
      status.json       the supervisor's view of every service, rewritten atomically
      logs/<name>.log   each service's stdout and stderr; logs/supervisor.log when detached
      db/               PostgreSQL data directories (see tiers.db.embedded)

Because the lock is an flock and not a pid file, a supervisor killed with
SIGKILL leaves nothing that blocks the next ``up``; the pids it recorded in
status.json let the next supervisor find and stop any orphaned service.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from tiers.errors import StateError

ENV_VAR = "TIERS_STATE_DIR"
DEFAULT_NAME = ".tiers"


def resolve_state_dir(option: str | None, cwd: Path | None = None) -> Path:
    """``--state-dir``, else ``$TIERS_STATE_DIR``, else ``.tiers`` in the working directory."""
    chosen = option or os.environ.get(ENV_VAR) or str((cwd or Path.cwd()) / DEFAULT_NAME)
    return Path(chosen).expanduser().absolute()


class StateDir:
    """Paths and the lock of one state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path / "supervisor.lock"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log_path(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.logs.mkdir(exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.path}: {exc.strerror}") from exc

    # ---- the supervisor lock ----------------------------------------------

    def acquire(self) -> None:
        """Take the supervisor lock or raise StateError naming the running supervisor."""
        self.create()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.supervisor_pid()
            who = f" (supervisor pid {pid})" if pid else ""
            raise StateError(
                f"a stack is already running in {self.path}{who}; "
                f"use 'tiers status' to see it or 'tiers down' to stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def is_locked(self) -> bool:
        """Whether a live supervisor holds the lock (checked without taking it for long)."""
        if not self.lock_path.exists():
            return False
        fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def supervisor_pid(self) -> int | None:
        try:
            text = self.lock_path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    # ---- status.json --------------------------------------------------------

    def write_status(self, status: dict[str, Any]) -> None:
        temporary = self.status_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.status_path)

    def read_status(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.status_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {self.status_path}: {exc}") from exc
        return data


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """Whether ``pid`` is still the process that was recorded (not a reused pid)."""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(process.create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def stop_orphans(state: StateDir, timeout: float = 5.0) -> int:
    """Kill the process groups of services recorded by a supervisor that has died.

    Only processes that are still the recorded ones (same pid and start time)
    are touched, so a reused pid is never signalled. Returns how many groups.
    """
    status = state.read_status()
    if not status:
        return 0
    leaders = []
    for entry in status.get("services", []):
        pid = entry.get("pid")
        if process_alive(pid, entry.get("pid_created")):
            try:
                os.killpg(pid, signal.SIGKILL)
                leaders.append(psutil.Process(pid))
            except (ProcessLookupError, psutil.Error):
                pass
    psutil.wait_procs(leaders, timeout=timeout)
    return len(leaders)
