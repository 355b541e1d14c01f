"""The site's jobs: the title fetch (loopback only), the Maildir notification (once per job,
however often it runs), the minutely ranking, and how they are registered."""

from __future__ import annotations

import email
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from bookmarks import tasks
from bookmarks.app import create_app
from bookmarks.memory import MemoryStore

from tiers.jobs.registry import REGISTRY, JobContext, running


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    """The demo app on a loopback port of its own."""
    app = create_app(MemoryStore(), cache=None, secret_key="k" * 32)
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def context(job_id: int = 5, attempt: int = 1) -> JobContext:
    return JobContext(id=job_id, task="t", queue="default", attempt=attempt, max_attempts=5,
                      worker="w", args={})


def test_the_jobs_are_registered_and_the_ranking_runs_every_minute() -> None:
    assert {"bookmarks.fetch_title", "bookmarks.notify_saved", "bookmarks.rank_hot"} <= set(
        REGISTRY.tasks)
    schedule = REGISTRY.schedules["bookmarks.rank_hot"]
    assert str(schedule.cron) == "* * * * *" and schedule.task == "bookmarks.rank_hot"


@pytest.mark.parametrize(("page", "title"), [
    ("<html><head><title> A &amp; B\n page </title></head></html>", "A & B page"),
    ("<TITLE>Upper</TITLE><title>second</title>", "Upper"),
    ("<p>no title</p>", ""),
])
def test_page_titles(page: str, title: str) -> None:
    assert tasks.page_title(page) == title


@pytest.mark.parametrize(("url", "loopback"), [
    ("http://127.0.0.1:8401/preview", True), ("http://127.8.9.10/", True),
    ("http://[::1]:80/", True), ("http://localhost/", True),
    ("http://example.com/", False), ("http://10.0.0.1/", False), ("file:///etc/passwd", False),
    ("http://127.0.0.1.example.com/", False),
])
def test_only_loopback_is_loopback(url: str, loopback: bool) -> None:
    assert tasks.is_loopback(url) is loopback


def test_a_url_off_loopback_is_refused_before_anything_is_fetched() -> None:
    with pytest.raises(ValueError, match="only loopback addresses are allowed"):
        tasks.fetch_loopback(["http://127.0.0.1:1/", "http://example.com/"])


def test_the_title_is_fetched_from_the_sites_stand_in_page(site: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    applied: list[tuple[int, str]] = []

    class Recorder:
        def apply_fetched_title(self, entry_id: int, title: str) -> str:
            applied.append((entry_id, title))
            return title

    # The first app server is down: the next one answers.
    monkeypatch.setenv(tasks.APP_URLS_ENV, f"http://127.0.0.1:1,{site}")
    monkeypatch.setattr(tasks, "store", Recorder)
    with running(context()):
        result = tasks.fetch_title(entry_id=3, url="https://example.com/hot-news")
    assert applied == [(3, "Hot news - example.com")]
    assert result == {"fetched": "Hot news - example.com", "title": "Hot news - example.com"}


def test_fetching_fails_clearly_when_no_app_server_answers(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv(tasks.APP_URLS_ENV, "http://127.0.0.1:1")
    with pytest.raises(OSError, match="no app server answered"):
        tasks.fetch_title(entry_id=1, url="https://example.com/")
    monkeypatch.delenv(tasks.APP_URLS_ENV)
    with pytest.raises(RuntimeError, match="TIERS_APP_URLS is not set"):
        tasks.fetch_title(entry_id=1, url="https://example.com/")


def test_a_notification_is_delivered_into_the_maildir_once_per_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tasks.MAILDIR_ENV, str(tmp_path / "mail"))
    args = {"entry_id": 4, "user": "alice", "url": "https://example.com/", "title": "Ex",
            "comment": "worth a look"}
    with running(context(job_id=9)):
        first = tasks.notify_saved(**args)
    with running(context(job_id=9, attempt=2)):  # the same job run again after a crash
        again = tasks.notify_saved(**args)
    assert first["delivered"] == "now" and again == {"file": first["file"],
                                                     "delivered": "before"}
    delivered = list((tmp_path / "mail" / "new").iterdir())
    assert [p.name for p in delivered] == [first["file"]]
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []
    message = email.message_from_bytes(delivered[0].read_bytes())
    assert message["To"] == "alice@localhost" and message["Subject"] == "Saved: Ex"
    assert "worth a look" in message.get_payload()
    with running(context(job_id=10)):
        tasks.notify_saved(**args)
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 2


def test_the_maildir_is_under_the_state_directory_unless_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tasks.MAILDIR_ENV, raising=False)
    monkeypatch.setenv(tasks.STATE_DIR_ENV, str(tmp_path))
    assert tasks.maildir_path() == tmp_path / "mail"
    monkeypatch.delenv(tasks.STATE_DIR_ENV)
    with pytest.raises(RuntimeError, match="no Maildir"):
        tasks.maildir_path()


def test_the_ranking_job_recomputes_the_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    class Counter:
        def recompute_hot(self) -> int:
            return 12

    monkeypatch.setattr(tasks, "store", Counter)
    assert tasks.rank_hot() == {"entries": 12}
