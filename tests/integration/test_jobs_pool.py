"""Real worker pools (`tiers worker`: a master and forked children) under real signals:
kill -9 of a child mid-job, graceful and aborted stops, recycling, job timeouts, SIGHUP,
a task module that does not import, and many jobs while children are killed."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration import jobtasks
from tests.integration.jobkit import connect, job_row, statuses, wait_until
from tiers.jobs import store
from tiers.jobs.spec import NewJob

REPO = Path(__file__).resolve().parents[2]


class Pool:
    """One `tiers worker` process group, started by the test and always stopped."""

    def __init__(self, root: Path, dsn: str, *args: str) -> None:
        self.root = root
        self.ready_file = root / f"ready-{time.monotonic_ns()}"
        self.log = root / "worker.log"
        command = [sys.executable, "-m", "tiers", "--state-dir", str(root / "state"),
                   "worker", "--dsn", dsn, "--pythonpath", str(REPO),
                   "--import", "tests.integration.jobtasks", "--ready-file",
                   str(self.ready_file), "--poll-interval", "0.2", *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "JOBTASKS_DSN": dsn},
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.ready_file.exists() or self.proc.poll() is not None, timeout,
                   "the pool to be ready")
        assert self.proc.poll() is None, self.output()

    def children(self) -> list[int]:
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children()
                          if c.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        # Whatever is left of the group (children outlive a killed master briefly).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)


@pytest.fixture
def pools(jobs_dsn: str, tmp_path: Path) -> Iterator[list[Pool]]:
    with connect(jobs_dsn) as conn:
        conn.execute(jobtasks.SCHEMA)
    started: list[Pool] = []
    yield started
    for pool in started:
        pool.stop()


def start(pools: list[Pool], root: Path, dsn: str, *args: str) -> Pool:
    pool = Pool(root, dsn, *args)
    pools.append(pool)
    pool.wait_ready()
    return pool


def runs(dsn: str) -> list[tuple[str, int, int, str]]:
    with connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            "SELECT key, pid, attempt, phase FROM job_runs ORDER BY at")]


def started_keys(dsn: str) -> dict[str, int]:
    """The pid that last started each key."""
    return {key: pid for key, pid, _, phase in runs(dsn) if phase == "start"}


def enqueue(dsn: str, task: Any, args: dict[str, Any], **options: Any) -> int:
    with connect(dsn) as conn:
        job_id = store.enqueue(conn, task, args, **options)
    assert job_id is not None
    return job_id


def test_kill_9_of_a_child_mid_job_runs_the_job_again_and_loses_nothing(
        pools: list[Pool], jobs_dsn: str, tmp_path: Path) -> None:
    pool = start(pools, tmp_path, jobs_dsn, "--processes", "2", "--no-scheduler")
    victim_job = enqueue(jobs_dsn, "test.record", {"key": "victim", "sleep": 1.5})
    other_job = enqueue(jobs_dsn, "test.record", {"key": "other", "sleep": 1.5})
    wait_until(lambda: {"victim", "other"} <= set(started_keys(jobs_dsn)), 15, "both running")
    before = pool.children()
    victim = started_keys(jobs_dsn)["victim"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: set(statuses(jobs_dsn).values()) == {"done"}, 30, "both jobs done")
    phases = [(pid, attempt, phase) for key, pid, attempt, phase in runs(jobs_dsn)
              if key == "victim"]
    assert phases[0] == (victim, 1, "start")
    assert [p[1:] for p in phases[1:]] == [(2, "start"), (2, "end")]
    assert job_row(jobs_dsn, victim_job)["attempts"] == 2
    assert "was killed by signal 9" in job_row(jobs_dsn, victim_job)["last_error"]
    assert job_row(jobs_dsn, other_job)["attempts"] == 1  # the other child went on
    # The dead child was replaced.
    wait_until(lambda: len(pool.children()) == 2, 10, "a replacement child")
    assert victim not in pool.children() and set(before) - {victim} <= set(pool.children())


def test_a_child_killed_as_soon_as_it_took_a_job_is_replaced_without_backoff(
        pools: list[Pool], jobs_dsn: str, tmp_path: Path) -> None:
    # A long backoff for children that fail to start, which a child that died
    # in the middle of a job must not get, however soon after its start.
    (tmp_path / "tiers.toml").write_text("[supervisor]\nbackoff_initial = 30.0\n")
    start(pools, tmp_path, jobs_dsn, "--processes", "1", "--no-scheduler")
    job = enqueue(jobs_dsn, "test.die_twice", {"key": "twice"})
    # The first child dies; its replacement takes the job again at once and
    # dies within moments of its start; the third completes it.
    wait_until(lambda: statuses(jobs_dsn).get(job) == "done", 15, "the job done")
    assert [(attempt, phase) for key, _, attempt, phase in runs(jobs_dsn)
            if key == "twice"] == [(1, "start"), (2, "start"), (3, "start"), (3, "end")]


def test_sigterm_lets_running_jobs_finish_then_the_pool_exits(pools: list[Pool],
                                                              jobs_dsn: str,
                                                              tmp_path: Path) -> None:
    pool = start(pools, tmp_path, jobs_dsn, "--processes", "2", "--scheduler")
    ids = [enqueue(jobs_dsn, "test.record", {"key": f"k{n}", "sleep": 1.5}) for n in range(2)]
    queued = enqueue(jobs_dsn, "test.record", {"key": "queued"}, delay=0.5)
    wait_until(lambda: {"k0", "k1"} <= set(started_keys(jobs_dsn)), 15, "both running")
    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0
    assert [statuses(jobs_dsn)[i] for i in ids] == ["done", "done"]
    assert sorted(key for key, _, _, phase in runs(jobs_dsn) if phase == "end") == ["k0", "k1"]
    assert statuses(jobs_dsn)[queued] == "pending"  # not started once stopping
    assert not pool.ready_file.exists()
    assert "stopping (SIGTERM)" in pool.output()


def test_a_second_sigterm_aborts_and_the_cut_job_runs_again_later(pools: list[Pool],
                                                                  jobs_dsn: str,
                                                                  tmp_path: Path) -> None:
    pool = start(pools, tmp_path, jobs_dsn, "--processes", "1", "--no-scheduler")
    job_id = enqueue(jobs_dsn, "test.record", {"key": "cut", "sleep": 30})
    wait_until(lambda: "cut" in started_keys(jobs_dsn), 15, "the job running")
    pool.signal(signal.SIGTERM)
    time.sleep(0.3)
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0
    row = job_row(jobs_dsn, job_id)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "stopped at once (abort)" in row["last_error"]
    # A new pool takes it (no need to wait for a lease).
    with connect(jobs_dsn) as conn:
        conn.execute("UPDATE tiers_jobs SET args = '{\"key\": \"cut\"}' WHERE id = %s",
                     (job_id,))
    start(pools, tmp_path, jobs_dsn, "--processes", "1", "--no-scheduler")
    wait_until(lambda: statuses(jobs_dsn)[job_id] == "done", 15, "the job done")


def test_the_graceful_timeout_kills_a_job_that_will_not_finish(pools: list[Pool],
                                                               jobs_dsn: str,
                                                               tmp_path: Path) -> None:
    pool = start(pools, tmp_path, jobs_dsn, "--processes", "1", "--no-scheduler",
                 "--graceful-timeout", "0.5")
    job_id = enqueue(jobs_dsn, "test.record", {"key": "slow", "sleep": 30})
    wait_until(lambda: "slow" in started_keys(jobs_dsn), 15, "the job running")
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0
    row = job_row(jobs_dsn, job_id)
    assert row["status"] == "pending"
    assert "did not finish its job within the graceful timeout" in row["last_error"]


def test_children_are_recycled_after_max_jobs(pools: list[Pool], jobs_dsn: str,
                                              tmp_path: Path) -> None:
    start(pools, tmp_path, jobs_dsn, "--processes", "2", "--no-scheduler", "--max-jobs", "5",
          "--max-jobs-jitter", "0")
    with connect(jobs_dsn) as conn:
        store.enqueue_many(conn, [NewJob("test.record", {"key": f"r{n}"}) for n in range(40)])
    wait_until(lambda: list(statuses(jobs_dsn).values()).count("done") == 40, 60,
               "every job done")
    per_pid: dict[int, int] = {}
    for _, pid, _, phase in runs(jobs_dsn):
        if phase == "end":
            per_pid[pid] = per_pid.get(pid, 0) + 1
    assert max(per_pid.values()) <= 5
    assert len(per_pid) >= 8  # 40 jobs, at most 5 each


def test_a_job_past_its_timeout_has_its_child_killed_and_is_retried(pools: list[Pool],
                                                                    jobs_dsn: str,
                                                                    tmp_path: Path) -> None:
    start(pools, tmp_path, jobs_dsn, "--processes", "2", "--no-scheduler")
    stuck = enqueue(jobs_dsn, jobtasks.hang, {"key": "stuck"})  # timeout 0.5 s, 2 attempts
    wait_until(lambda: statuses(jobs_dsn)[stuck] == "dead", 30, "the stuck job buried")
    row = job_row(jobs_dsn, stuck)
    assert row["attempts"] == 2
    assert f"job {stuck} ran past its timeout" in row["last_error"]
    pids = [pid for key, pid, _, _ in runs(jobs_dsn) if key == "stuck"]
    assert len(pids) == 2 and pids[0] != pids[1]  # each run's child was killed
    fine = enqueue(jobs_dsn, "test.record", {"key": "fine"})
    wait_until(lambda: statuses(jobs_dsn)[fine] == "done", 15, "the pool still works")


def test_sighup_replaces_every_child_gracefully(pools: list[Pool], jobs_dsn: str,
                                                tmp_path: Path) -> None:
    pool = start(pools, tmp_path, jobs_dsn, "--processes", "2", "--no-scheduler")
    before = pool.children()
    assert len(before) == 2
    job_id = enqueue(jobs_dsn, "test.record", {"key": "across", "sleep": 1.5})
    wait_until(lambda: "across" in started_keys(jobs_dsn), 15, "the job running")
    pool.signal(signal.SIGHUP)
    wait_until(lambda: len(pool.children()) == 2 and not set(pool.children()) & set(before),
               20, "two new children and none of the old")
    assert statuses(jobs_dsn)[job_id] == "done"
    assert job_row(jobs_dsn, job_id)["attempts"] == 1  # finished, not cut
    after = enqueue(jobs_dsn, "test.record", {"key": "after"})
    wait_until(lambda: statuses(jobs_dsn)[after] == "done", 15, "a job on the new children")
    assert started_keys(jobs_dsn)["after"] in pool.children()


def test_a_task_module_that_cannot_be_imported_stops_the_pool(jobs_dsn: str,
                                                              tmp_path: Path) -> None:
    pool = Pool(tmp_path, jobs_dsn, "--processes", "2", "--import",
                "tests.integration.no_such_module")
    try:
        assert pool.wait(30) == 3
        assert "cannot import the task module 'tests.integration.no_such_module'" in (
            pool.output())
    finally:
        pool.stop()


def test_many_jobs_while_children_are_killed_none_is_lost(pools: list[Pool], jobs_dsn: str,
                                                          tmp_path: Path) -> None:
    """A CI-sized form of the acceptance run (benchmarks/jobs_soak.py does 10,000)."""
    count = 1000
    pool = start(pools, tmp_path, jobs_dsn, "--processes", "3", "--no-scheduler")
    with connect(jobs_dsn) as conn:
        store.enqueue_many(conn, [NewJob("test.record", {"key": f"j{n}", "sleep": 0.002})
                                  for n in range(count)])
    chance = random.Random(9)
    kills = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = list(statuses(jobs_dsn).values()).count("done")
        if done == count:
            break
        children = pool.children()
        if kills < 4 and done > (kills + 1) * count // 6 and children:
            os.kill(chance.choice(children), signal.SIGKILL)
            kills += 1
        time.sleep(0.05)
    final = statuses(jobs_dsn)
    assert kills == 4
    assert list(final.values()).count("done") == count, {
        s: list(final.values()).count(s) for s in set(final.values())}
    ended = {key for key, _, _, phase in runs(jobs_dsn) if phase == "end"}
    assert ended == {f"j{n}" for n in range(count)}
