"""Requests from the CLI to a running supervisor: a file per request, then SIGUSR1.

Some operations must run inside the supervisor because they change what it
supervises (a switchover stops the primary; the supervisor must not restart
it as a primary meanwhile). The CLI writes ``control/<id>.request.json`` in
the state directory and signals the supervisor; the supervisor runs each new
request in a thread and writes ``control/<id>.result.json`` when it is done.
A request file is removed once taken, so a later signal does not repeat it.

Results are ``{"ok": bool, "message": str}``. The CLI gives up waiting after
its timeout, but the supervisor still finishes the operation: a switchover
cut in half would be worse than a late answer.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tiers.errors import StateError, TiersError

Handler = Callable[[Mapping[str, Any]], str]


def control_dir(state_path: Path) -> Path:
    return state_path / "control"


class ControlServer:
    """The supervisor's side: ``poll()`` (from the supervisor loop) starts new requests."""

    def __init__(self, state_path: Path, handlers: Mapping[str, Handler],
                 say: Callable[[str], None]) -> None:
        self._dir = control_dir(state_path)
        self._handlers = handlers
        self._say = say

    def poll(self) -> None:
        if not self._dir.is_dir():
            return
        for request in sorted(self._dir.glob("*.request.json")):
            ident = request.name.removesuffix(".request.json")
            try:
                body = json.loads(request.read_text(encoding="utf-8"))
                request.unlink()
            except (OSError, ValueError) as exc:
                self._finish(ident, False, f"unreadable request: {exc}")
                request.unlink(missing_ok=True)
                continue
            threading.Thread(target=self._run, args=(ident, body), daemon=True,
                             name=f"control-{ident[:8]}").start()

    def _run(self, ident: str, body: Any) -> None:
        command = body.get("command") if isinstance(body, dict) else None
        handler = self._handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            self._finish(ident, False, f"unknown request {command!r}")
            return
        try:
            message = handler(body)
        except TiersError as exc:
            self._say(f"{command}: failed: {exc}")
            self._finish(ident, False, str(exc))
        except Exception as exc:  # a bug must answer the CLI, not leave it waiting
            self._say(f"{command}: unexpected {type(exc).__name__}: {exc}")
            self._finish(ident, False, f"unexpected {type(exc).__name__}: {exc}")
        else:
            self._say(f"{command}: {message}")
            self._finish(ident, True, message)

    def _finish(self, ident: str, ok: bool, message: str) -> None:
        result = self._dir / f"{ident}.result.json"
        partial = result.with_suffix(".partial")
        partial.write_text(json.dumps({"ok": ok, "message": message}), encoding="utf-8")
        os.replace(partial, result)


def send_request(state_path: Path, supervisor_pid: int, command: str, timeout: float,
                 **arguments: Any) -> tuple[bool, str]:
    """The CLI's side: ask the supervisor and wait for its answer (ok, message).

    Raises StateError when the supervisor does not answer within ``timeout``.
    """
    directory = control_dir(state_path)
    directory.mkdir(parents=True, exist_ok=True)
    ident = uuid.uuid4().hex
    request = directory / f"{ident}.request.json"
    partial = request.with_suffix(".partial")
    partial.write_text(json.dumps({"command": command, **arguments}), encoding="utf-8")
    os.replace(partial, request)
    result = directory / f"{ident}.result.json"
    try:
        os.kill(supervisor_pid, signal.SIGUSR1)
    except ProcessLookupError as exc:
        request.unlink(missing_ok=True)
        raise StateError(f"the supervisor (pid {supervisor_pid}) is gone") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result.exists():
            answer = json.loads(result.read_text(encoding="utf-8"))
            result.unlink()
            return bool(answer.get("ok")), str(answer.get("message", ""))
        time.sleep(0.05)
    raise StateError(f"no answer from the supervisor within {timeout:g}s; it goes on with "
                     f"the request: see 'tiers logs supervisor'")
