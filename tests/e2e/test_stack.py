"""The walking skeleton end to end: `tiers up -d` runs proxy, app servers, job workers and
replicated PostgreSQL for real; bookmarks are read back through the proxy; a saved bookmark's
jobs run (its title fetched, a notification in the Maildir); a killed app server costs no
request and a killed worker master is replaced without orphans; `down` leaves nothing; data
survives the next `up`."""

from __future__ import annotations

import email
import email.message
import html
import http.cookiejar
import json
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.stackctl import StackHandle, make_handle, tear_down


@pytest.fixture(scope="module")
def running_stack() -> Iterator[StackHandle]:
    root = Path(tempfile.mkdtemp(prefix="tiers-e2e-"))
    root.chmod(0o755)
    handle = make_handle(root)
    try:
        handle.tiers("up", "-d")
        yield handle
    finally:
        tear_down(handle)
        shutil.rmtree(root, ignore_errors=True)


def browser() -> urllib.request.OpenerDirector:
    """A client that keeps cookies and follows redirects, like a person's browser."""
    return urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def post_bookmark(client: urllib.request.OpenerDirector, base: str, url: str,
                  comment: str) -> tuple[str, str]:
    form = urllib.parse.urlencode({"url": url, "title": f"Title of {url}", "user": "alice",
                                   "comment": comment}).encode()
    with client.open(f"{base}/bookmarks", data=form, timeout=10) as response:
        return response.geturl(), response.read().decode()


def test_status_shows_every_service_ready_and_the_replica_streaming(
        running_stack: StackHandle) -> None:
    status = running_stack.status()
    assert status["running"] is True
    assert status["phase"] == "running"
    roles = [s["role"] for s in status["services"]]
    assert roles == ["primary", "replica", "cache", "worker", "app", "app", "proxy"]
    for service in status["services"]:
        assert service["state"] == "ready", service
        assert isinstance(service["pid"], int)
    replica = status["services"][1]
    assert replica["replication"]["state"] == "streaming"


def test_home_page_through_the_proxy(running_stack: StackHandle) -> None:
    with urllib.request.urlopen(running_stack.base_url + "/", timeout=10) as response:
        assert response.status == 200
        assert "text/html" in response.headers["Content-Type"]
        page = response.read().decode()
    assert "<form" in page and "bookmarks" in page.lower()
    access_log = running_stack.state_dir / "logs" / "access.log"
    running_stack.wait_for(lambda: "uri:/\t" in access_log.read_text(), 5, "access log line")


def test_a_posted_bookmark_is_on_the_page_the_redirect_leads_to(
        running_stack: StackHandle) -> None:
    client = browser()
    for attempt in range(50):
        comment = f"read-your-writes check {attempt} {time.time_ns()}"
        final_url, page = post_bookmark(client, running_stack.base_url,
                                        f"https://example.com/article/{attempt}", comment)
        assert re.search(r"/entry/\d+$", final_url), final_url
        assert comment in page, f"attempt {attempt}: the new bookmark is missing"


def test_killing_an_app_server_fails_no_get_and_it_comes_back(
        running_stack: StackHandle) -> None:
    victim = running_stack.service("app1")
    failures = []
    killed_at = None
    for index in range(500):
        if index == 100:
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at = time.monotonic()
        try:
            with urllib.request.urlopen(running_stack.base_url + "/", timeout=10) as response:
                response.read()
                if response.status != 200:
                    failures.append((index, response.status))
        except (urllib.error.URLError, OSError) as exc:
            failures.append((index, repr(exc)))
    assert failures == []
    assert killed_at is not None

    def back() -> bool:
        now = running_stack.service("app1")
        return now["state"] == "ready" and now["pid"] != victim["pid"]

    running_stack.wait_for(back, max(0.0, 10 - (time.monotonic() - killed_at)) + 0.5,
                           "app1 to be restarted and ready")
    assert running_stack.service("app1")["restarts"] >= 1


def entry_title(base: str, entry_id: int) -> str:
    with urllib.request.urlopen(f"{base}/entry/{entry_id}", timeout=10) as response:
        page = response.read().decode()
    found = re.search(r"<h1><a [^>]*>([^<]*)</a></h1>", page)
    assert found, page
    return html.unescape(found.group(1))


def test_a_saved_bookmark_gets_its_title_fetched_and_a_notification(
        running_stack: StackHandle) -> None:
    url = f"https://example.net/untitled-page-{time.time_ns()}"
    form = urllib.parse.urlencode({"url": url, "title": "", "user": "alice",
                                   "comment": "no title typed"}).encode()
    with browser().open(f"{running_stack.base_url}/bookmarks", data=form,
                        timeout=10) as response:
        entry_id = int(response.geturl().rsplit("/", 1)[1])
    expected = f"{url.rsplit('/', 1)[1].replace('-', ' ').capitalize()} - example.net"
    running_stack.wait_for(lambda: entry_title(running_stack.base_url, entry_id) == expected,
                           30, "the worker to fetch the title")
    mail = running_stack.state_dir / "mail" / "new"

    def delivered() -> list[email.message.Message]:
        if not mail.is_dir():
            return []
        messages = [email.message_from_bytes(p.read_bytes()) for p in mail.iterdir()]
        return [m for m in messages if url in str(m.get_payload())]

    running_stack.wait_for(lambda: len(delivered()) == 1, 30, "the notification")
    assert delivered()[0]["To"] == "alice@localhost"
    queues = json.loads(running_stack.tiers("jobs", "queues", "--json").stdout)
    assert all(queue["dead"] == 0 for queue in queues), queues


def test_tiers_jobs_reaches_the_stacks_queue_and_the_ranking_job_runs(
        running_stack: StackHandle) -> None:
    done = running_stack.tiers("jobs", "enqueue", "bookmarks.rank_hot", "--json")
    job_id = json.loads(done.stdout)["id"]

    def job() -> dict[str, Any]:
        answer = running_stack.tiers("jobs", "inspect", str(job_id), "--json")
        result: dict[str, Any] = json.loads(answer.stdout)
        return result

    running_stack.wait_for(lambda: job()["status"] == "done", 30, "the ranking job")
    assert job()["result"]["entries"] >= 1
    assert running_stack.tiers("jobs", "list").stdout.strip() == "no dead jobs"


def test_a_killed_worker_master_is_replaced_and_leaves_no_orphans(
        running_stack: StackHandle) -> None:
    worker = running_stack.service("worker")
    children = psutil.Process(worker["pid"]).children()
    assert len(children) == 3  # two workers and the scheduler
    os.kill(worker["pid"], signal.SIGKILL)

    def back() -> bool:
        now = running_stack.service("worker")
        return now["state"] == "ready" and now["pid"] != worker["pid"]

    running_stack.wait_for(back, 30, "the worker to be restarted and ready")
    _, gone_alive = psutil.wait_procs(children, timeout=10)
    assert gone_alive == []
    done = running_stack.tiers("jobs", "enqueue", "bookmarks.rank_hot", "--json")
    job_id = json.loads(done.stdout)["id"]
    running_stack.wait_for(
        lambda: json.loads(running_stack.tiers("jobs", "inspect", str(job_id), "--json")
                           .stdout)["status"] == "done", 30, "a job on the new workers")


def test_a_second_up_on_a_running_state_dir_is_refused(running_stack: StackHandle) -> None:
    done = running_stack.tiers("up", "-d", check=False, timeout=30)
    assert done.returncode == 1
    assert "already running" in done.stderr


def test_logs_shows_a_services_log_prefixed(running_stack: StackHandle) -> None:
    done = running_stack.tiers("logs", "db-primary", "-n", "50")
    assert re.search(r"^db-primary \| .*ready to accept connections", done.stdout, re.MULTILINE)
    unknown = running_stack.tiers("logs", "nosuch", check=False)
    assert unknown.returncode == 2
    assert "no logs for service 'nosuch'" in unknown.stderr


def test_down_leaves_nothing_and_up_reuses_the_data(open_tmp: Path,
                                                    running_stack: StackHandle) -> None:
    # A second stack in its own state directory runs beside the first one.
    handle = make_handle(open_tmp, apps=1)
    try:
        handle.tiers("up", "-d")
        client = browser()
        _, page = post_bookmark(client, handle.base_url, "https://example.org/kept",
                                "kept across restarts")
        assert "kept across restarts" in page
        processes = handle.processes()
        assert len(processes) >= 6  # supervisor, postgres x2 (+ their workers), job workers,
        #                             app, proxy

        handle.tiers("down")
        assert [p for p in processes if p.is_running() and p.status() != "zombie"] == []
        assert handle.status()["running"] is False

        handle.tiers("up", "-d")
        with urllib.request.urlopen(handle.base_url + "/", timeout=10) as response:
            assert "https://example.org/kept" in response.read().decode()
        assert running_stack.status()["phase"] == "running"
    finally:
        tear_down(handle)


def test_foreground_up_streams_prefixed_logs_and_stops_on_sigint(open_tmp: Path) -> None:
    import subprocess
    import sys

    handle = make_handle(open_tmp, apps=1, replicas=0)
    command = [sys.executable, "-m", "tiers", "--state-dir", str(handle.state_dir),
               "--file", str(handle.topology), "up"]
    output = open_tmp / "up.out"
    with open(output, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   cwd=open_tmp)
    try:
        handle.wait_for(lambda: "all services are ready" in output.read_text(), 120,
                        "foreground stack to be ready")
        processes = handle.processes()
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        text = output.read_text()
        assert re.search(r"^db-primary \| .*database system is ready", text, re.MULTILINE)
        assert re.search(r"^app1\s+\| ", text, re.MULTILINE)
        assert [p for p in processes if p.is_running() and p.status() != "zombie"] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        tear_down(handle)


def test_a_service_that_fails_on_every_start_gives_up_cleanly(open_tmp: Path) -> None:
    (open_tmp / "broken.py").write_text("raise RuntimeError('this app cannot start')\n")
    handle = make_handle(open_tmp, apps=1, replicas=0, extra=(
        "[supervisor]\nbackoff_initial = 0.1\nmax_failed_starts = 2\n"))
    text = handle.topology.read_text().replace(
        "[app]\n", f'[app]\napp = "broken:app"\npythonpath = ["{open_tmp}"]\n')
    handle.topology.write_text(text)
    try:
        done = handle.tiers("up", "-d", check=False)
        assert done.returncode == 1
        assert "did not start" in done.stderr
        assert "app1" in done.stderr and "failed on every start" in done.stderr
        handle.wait_for(lambda: not handle.status()["running"], 30, "supervisor to exit")
        assert handle.processes() == []
    finally:
        tear_down(handle)


def test_reload_signals_the_proxy_after_checking_the_file(
        running_stack: StackHandle) -> None:
    proxy_log = running_stack.state_dir / "logs" / "proxy.log"
    before = proxy_log.read_text().count("configuration reloaded")
    running_stack.tiers("reload")
    running_stack.wait_for(
        lambda: proxy_log.read_text().count("configuration reloaded") > before, 5,
        "the proxy to reload")
    with urllib.request.urlopen(running_stack.base_url + "/", timeout=10) as response:
        assert response.status == 200
    good = running_stack.topology.read_text()
    try:
        running_stack.topology.write_text(good + "\n[proxy.cache]\nsize = 1\n")
        done = running_stack.tiers("reload", check=False)
        assert done.returncode == 2 and "proxy.cache.size: unknown key" in done.stderr
    finally:
        running_stack.topology.write_text(good)
