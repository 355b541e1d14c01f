"""The tiers command's answers when there is nothing to run or something is wrong."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from tiers.cli.main import cli


def run(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "state"), *args])
    return result.exit_code, result.output


def test_a_bad_topology_exits_2_naming_file_key_and_reason(tmp_path: Path) -> None:
    topology = tmp_path / "tiers.toml"
    topology.write_text("[db]\nreplicas = -1\n")
    code, output = run(tmp_path, "-f", str(topology), "up", "-d")
    assert code == 2
    assert f"{topology}: db.replicas: must be between 0 and 16, got -1" in output
    assert not (tmp_path / "state" / "status.json").exists()


def test_a_busy_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        topology = tmp_path / "tiers.toml"
        topology.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\n'
                            "[app]\nport = 47101\n[db]\nport = 47111\n")
        code, output = run(tmp_path, "-f", str(topology), "up", "-d")
    assert code == 1
    assert f"already in use: proxy.listen 127.0.0.1:{port}" in output
    assert not (tmp_path / "state" / "status.json").exists()


def test_status_and_down_without_a_stack(tmp_path: Path) -> None:
    code, output = run(tmp_path, "status")
    assert code == 0 and "no stack is running" in output
    code, output = run(tmp_path, "status", "--json")
    assert code == 0
    status = json.loads(output)
    assert status["running"] is False and status["services"] == []
    code, output = run(tmp_path, "down")
    assert code == 0 and "no stack is running" in output


def test_logs_of_an_unknown_service_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "state" / "logs").mkdir(parents=True)
    (tmp_path / "state" / "logs" / "app1.log").write_text("line one\nline two\n")
    code, output = run(tmp_path, "logs", "app1", "-n", "1")
    assert code == 0 and output.endswith("app1 | line two\n")
    code, output = run(tmp_path, "logs", "app9")
    assert code == 2 and "known: app1" in output


def test_state_dir_comes_from_the_environment(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERS_STATE_DIR", str(tmp_path / "from-env"))
    result = CliRunner().invoke(cli, ["status", "--json"])
    assert json.loads(result.output)["state_dir"] == str(tmp_path / "from-env")
