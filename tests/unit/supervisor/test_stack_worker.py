"""The worker service in the stack: where it starts, what it runs, what it is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiers.config.loader import parse_topology
from tiers.supervisor.stack import Stack


def test_the_worker_starts_after_the_data_tier_and_before_the_app_servers(
        tmp_path: Path) -> None:
    stack = Stack(parse_topology("[cache]\nnodes = 1\n"), tmp_path)
    specs = stack.specs()
    assert [s.name for s in specs] == ["db-primary", "db-replica1", "cache1", "worker", "app1",
                                       "app2", "proxy"]
    worker = specs[3]
    assert worker.role == "worker"
    assert worker.depends == ("db-primary", "db-replica1", "cache1")
    assert worker.address == "queues default (2 processes + scheduler)"


def test_the_worker_runs_tiers_worker_with_the_services_environment(tmp_path: Path) -> None:
    topology_file = tmp_path / "tiers.toml"
    topology_file.write_text("[worker]\nprocesses = 3\n")
    from tiers.config import load_topology

    stack = Stack(load_topology(topology_file), tmp_path / "state")
    (tmp_path / "state").mkdir()
    stack.worker_ready_file.write_text("stale")
    worker = next(s for s in stack.specs() if s.name == "worker")
    command = worker.prepare()
    assert not stack.worker_ready_file.exists()  # a fresh start is not ready yet
    argv = list(command.argv)
    assert argv[1:] == ["-m", "tiers", "--state-dir", str(tmp_path / "state"), "--file",
                        str(topology_file), "worker", "--ready-file",
                        str(stack.worker_ready_file)]
    env = dict(command.env)
    assert env["TIERS_DB_PRIMARY"].endswith(":15432/tiers")
    assert env["TIERS_APP_URLS"] == "http://127.0.0.1:8401,http://127.0.0.1:8402"
    assert env["TIERS_STATE_DIR"] == str(tmp_path / "state")
    assert env["TIERS_SECRET_KEY"] and env["TIERS_CACHE_NODES"]
    with pytest.raises(ConnectionError):
        worker.probe()
    stack.worker_ready_file.write_text("1\n")
    worker.probe()


def test_no_worker_without_task_modules_or_anything_to_run(tmp_path: Path) -> None:
    bare = parse_topology('[app]\napp = "myapp:app"\npythonpath = ["."]\n', base=tmp_path)
    assert "worker" not in [s.name for s in Stack(bare, tmp_path).specs()]
    idle = parse_topology("[worker]\nprocesses = 0\nscheduler = false\n")
    assert "worker" not in [s.name for s in Stack(idle, tmp_path).specs()]
