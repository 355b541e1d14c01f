"""The CLI-to-supervisor request channel, with the supervisor played by this process."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tiers.errors import DatabaseError, StateError
from tiers.supervisor.control import ControlServer, control_dir, send_request


@pytest.fixture
def usr1_polls(tmp_path: Path) -> Iterator[list[str]]:
    """SIGUSR1 to this process makes a ControlServer poll, as the supervisor loop does."""
    said: list[str] = []

    def switchover(request: Mapping[str, Any]) -> str:
        if request.get("to") == "nowhere":
            raise DatabaseError("no database node named 'nowhere'")
        return f"{request.get('to')} is the primary"

    def crash(request: Mapping[str, Any]) -> str:
        raise RuntimeError("a bug")

    server = ControlServer(tmp_path, {"switchover": switchover, "crash": crash}, said.append)
    # The handler only starts threads, as the loop would right after the signal.
    previous = signal.signal(signal.SIGUSR1, lambda *_: server.poll())
    try:
        yield said
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_request_is_answered_and_its_files_removed(tmp_path: Path,
                                                     usr1_polls: list[str]) -> None:
    ok, message = send_request(tmp_path, os.getpid(), "switchover", 5, to="db-replica1")
    assert (ok, message) == (True, "db-replica1 is the primary")
    assert list(control_dir(tmp_path).iterdir()) == []
    assert usr1_polls == ["switchover: db-replica1 is the primary"]


def test_a_failed_request_says_why(tmp_path: Path, usr1_polls: list[str]) -> None:
    ok, message = send_request(tmp_path, os.getpid(), "switchover", 5, to="nowhere")
    assert not ok and "no database node named 'nowhere'" in message
    ok, message = send_request(tmp_path, os.getpid(), "crash", 5)
    assert not ok and "unexpected RuntimeError: a bug" in message
    ok, message = send_request(tmp_path, os.getpid(), "reboot", 5)
    assert not ok and "unknown request 'reboot'" in message


def test_an_unreadable_request_is_answered_not_retried(tmp_path: Path,
                                                       usr1_polls: list[str]) -> None:
    directory = control_dir(tmp_path)
    directory.mkdir()
    (directory / "abc.request.json").write_text("{not json")
    os.kill(os.getpid(), signal.SIGUSR1)
    result = directory / "abc.result.json"
    done = threading.Event()
    for _ in range(100):
        if result.exists():
            done.set()
            break
        done.wait(0.02)
    assert done.is_set() and "unreadable request" in result.read_text()
    assert not (directory / "abc.request.json").exists()


def test_no_answer_in_time_is_a_state_error(tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a supervisor that never answers
    try:
        with pytest.raises(StateError, match=r"no answer from the supervisor within 0\.2s"):
            send_request(tmp_path, os.getpid(), "switchover", 0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_gone_supervisor_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="is gone"):
        send_request(tmp_path, 2**22 + 12345, "switchover", 1)
    assert list(control_dir(tmp_path).glob("*.request.json")) == []
