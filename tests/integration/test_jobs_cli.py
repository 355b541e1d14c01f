"""`tiers jobs` against a real database: depths, dead jobs (list, inspect, retry, delete),
enqueue, batches, prune; JSON output; clear errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.integration.jobkit import connect, job_row, statuses
from tiers.cli.main import cli
from tiers.jobs import batch, store
from tiers.jobs.spec import NewJob
from tiers.jobs.store import Outcome


def tiers(tmp_path: Path, dsn: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "state"), *args,
                                      "--dsn", dsn])
    return result.exit_code, result.output


def bury(dsn: str, count: int, **job: Any) -> list[int]:
    with connect(dsn) as conn:
        ids = store.enqueue_many(conn, [NewJob("mail.send", {"n": n}, max_attempts=1, **job)
                                        for n in range(count)])
        while (claimed := store.claim(conn, "w", [job.get("queue", "default")], 30)):
            store.finish(conn, claimed.id, "w", Outcome(
                "dead", error=f"Traceback ...\nSMTPError: no route for {claimed.args['n']}"))
    return ids


def test_dead_jobs_are_listed_inspected_retried_and_deleted(jobs_dsn: str,
                                                            tmp_path: Path) -> None:
    ids = bury(jobs_dsn, 3)
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "QUEUE", "TASK", "STATUS", "ATTEMPTS", "RUN", "AT",
                                "LAST", "ERROR"]
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in reversed(ids)]
    assert "SMTPError: no route for 2" in lines[1]
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "list", "--json")
    assert [job["id"] for job in json.loads(out)] == list(reversed(ids))

    code, out = tiers(tmp_path, jobs_dsn, "jobs", "inspect", str(ids[0]))
    assert code == 0
    assert "status:        dead" in out and "SMTPError: no route for 0" in out
    assert 'args:          {"n": 0}' in out
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "inspect", str(ids[0]), "--json")
    assert json.loads(out)["last_error"].endswith("no route for 0")

    code, out = tiers(tmp_path, jobs_dsn, "jobs", "retry", str(ids[0]))
    assert (code, out.strip()) == (0, f"tiers: 1 job(s) back in their queue: {ids[0]}")
    assert job_row(jobs_dsn, ids[0])["status"] == "pending"
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "retry", str(ids[0]))
    assert code == 1 and f"cannot retry: {ids[0]} (it is pending, not dead)" in out

    code, out = tiers(tmp_path, jobs_dsn, "jobs", "delete", str(ids[1]), "--json")
    assert (code, json.loads(out)) == (0, {"deleted": [ids[1]]})
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "delete", "--all")
    assert code == 0 and out.strip() == f"tiers: 1 dead job(s) deleted: {ids[2]}"
    assert statuses(jobs_dsn) == {ids[0]: "pending"}


@pytest.mark.parametrize("args", [("jobs", "retry"), ("jobs", "retry", "1", "--all"),
                                  ("jobs", "delete", "1", "--queue", "q")])
def test_retry_and_delete_need_a_clear_selection(jobs_dsn: str, tmp_path: Path,
                                                 args: tuple[str, ...]) -> None:
    code, out = tiers(tmp_path, jobs_dsn, *args)
    assert code == 2 and "Error:" in out


def test_queue_depths_enqueue_batches_and_prune(jobs_dsn: str, tmp_path: Path) -> None:
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "queues")
    assert (code, out.strip()) == (0, "no pending, running or dead jobs")
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "enqueue", "mail.send", "--args",
                      '{"to": "a"}', "--queue", "mail", "--unique-key", "a")
    assert code == 0 and out.startswith("tiers: job ")
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "enqueue", "mail.send", "--queue", "mail",
                      "--unique-key", "a", "--json")
    assert (code, json.loads(out)) == (0, {"id": None})
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "enqueue", "mail.send", "--args", "[1]")
    assert code == 1 and "args must be a mapping" in out
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "enqueue", "mail.send", "--args", "{")
    assert code == 2 and "not JSON" in out
    bury(jobs_dsn, 2, queue="reports")
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "queues")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["QUEUE", "READY", "SCHEDULED", "RUNNING", "DEAD", "OLDEST", "READY"]
    assert rows[1][:5] == ["mail", "1", "0", "0", "0"] and rows[1][5].endswith("s")
    assert rows[2] == ["reports", "0", "0", "0", "2", "-"]
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "queues", "--json")
    assert {q["queue"]: q["dead"] for q in json.loads(out)} == {"mail": 0, "reports": 2}

    with connect(jobs_dsn) as conn:
        made = batch.enqueue_batch(conn, "chunk", [{"n": 1}, {"n": 2}], name="nightly")
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "batches")
    assert code == 0 and out.splitlines()[1].split() == [str(made.id), "nightly", "2", "0",
                                                          "0", "2", "running"]
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "batches", "--json")
    assert json.loads(out)[0]["open"] == 2

    with connect(jobs_dsn) as conn:
        job = store.claim(conn, "w", ["mail"], 30)
        assert job is not None
        store.finish(conn, job.id, "w", Outcome("done"))
        conn.execute("UPDATE tiers_jobs SET finished_at = now() - interval '2 days'")
    code, out = tiers(tmp_path, jobs_dsn, "jobs", "prune")
    assert (code, out.strip()) == (0, "tiers: 1 done job(s) deleted")


def test_an_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    code, out = tiers(tmp_path, "host=127.0.0.1 port=1 dbname=x connect_timeout=1", "jobs",
                      "queues")
    assert code == 1
    assert "cannot connect to the jobs database" in out and "tiers up" in out


def test_the_worker_refuses_bad_options_naming_them(tmp_path: Path) -> None:
    code, out = tiers(tmp_path, "host=127.0.0.1 port=1", "worker", "--queue", "bad queue",
                      "--import", "x")
    assert code == 2 and "a queue name is 1 to 63" in out
