"""The site's background jobs, run by ``tiers worker`` (the stack's ``worker`` service).

Saving a bookmark enqueues two jobs in the save's own transaction
(:func:`enqueue_after_save`, wired by ``bookmarks.app``), so they exist if
and only if the bookmark does:

* ``bookmarks.fetch_title``: fetch the bookmarked page and take its
  ``<title>``. The demo has no outside network, so the page is fetched from
  the site's own stand-in for it, ``GET /preview?url=...`` on an app server,
  over loopback only (any other host is refused). An entry saved without a
  title (its URL standing in) gets the fetched one. One pending fetch per
  entry (unique key ``fetch-title:<entry id>``).
* ``bookmarks.notify_saved``: write a notification e-mail into a Maildir
  (``<state dir>/mail``, or ``BOOKMARKS_MAILDIR``): ``tmp/`` then a rename
  into ``new/``, as Maildir delivery goes. Named after the job id, so a run
  repeated after a crash (delivery is at least once) finds its message and
  writes no second one.

And every minute, enqueued by the pool's scheduler exactly once per tick:

* ``bookmarks.rank_hot``: recompute the hot ranking's counts (see
  ``bookmarks.store._HOT_SQL``); one failed run is simply replaced by the
  next minute's.

The workers get the databases as the app servers do (``TIERS_DB_*``), and
``TIERS_APP_URLS`` (the app servers, comma-separated) and ``TIERS_STATE_DIR``
from the stack.
"""

from __future__ import annotations

import html.parser
import ipaddress
import os
import socket
import time
import urllib.parse
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from bookmarks.forms import NewBookmark
from bookmarks.store import ProcessLocalStore, SqlStore
from tiers.db.clusters import Databases
from tiers.jobs import current_job, periodic, task

APP_URLS_ENV = "TIERS_APP_URLS"
MAILDIR_ENV = "BOOKMARKS_MAILDIR"
STATE_DIR_ENV = "TIERS_STATE_DIR"
USER_AGENT = "bookmarks-title-fetcher/1.0 (tiers demo)"
FETCH_TIMEOUT = 5.0
MAX_PAGE_BYTES = 256 * 1024
SITE_ADDRESS = "bookmarks@localhost"

_store = ProcessLocalStore(lambda: SqlStore.from_databases(Databases.from_env()))


def store() -> SqlStore:
    """This worker process's store (made on first use, after the fork)."""
    made = _store.get()
    assert isinstance(made, SqlStore)
    return made


# ---- enqueued when a bookmark is saved ------------------------------------------------


def enqueue_after_save(conn: Any, entry_id: int, bookmark: NewBookmark) -> None:
    """Enqueue the save's jobs on ``conn``, inside the save's transaction."""
    fetch_title.enqueue(conn, {"entry_id": entry_id, "url": bookmark.url},
                        unique_key=f"fetch-title:{entry_id}")
    notify_saved.enqueue(conn, {"entry_id": entry_id, "user": bookmark.user,
                                "url": bookmark.url, "title": bookmark.title,
                                "comment": bookmark.comment})


@task("bookmarks.fetch_title", max_attempts=6, timeout=30, retry_base=2.0, retry_max=60.0)
def fetch_title(entry_id: int, url: str) -> dict[str, Any]:
    """Fetch the page's title (from the site's loopback stand-in) for the entry."""
    page = fetch_loopback(preview_urls(url))
    title = page_title(page)
    if not title:
        raise ValueError(f"the page for {url} has no <title>")
    now = store().apply_fetched_title(entry_id, title)
    return {"fetched": title, "title": now}


@task("bookmarks.notify_saved", max_attempts=10, timeout=30)
def notify_saved(entry_id: int, user: str, url: str, title: str, comment: str) -> dict[str, str]:
    """Deliver a 'bookmark saved' message to the user's mailbox (a Maildir)."""
    job = current_job()
    maildir = maildir_path()
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    marker = f".J{job.id}."
    for sub in ("new", "cur"):
        for existing in (maildir / sub).iterdir():
            if marker in existing.name:
                return {"file": existing.name, "delivered": "before"}
    message = EmailMessage()
    message["From"] = SITE_ADDRESS
    message["To"] = f"{user}@localhost"
    message["Subject"] = f"Saved: {title}"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(idstring=f"job{job.id}", domain="bookmarks.localhost")
    lines = [f"{user}, you bookmarked {url}", ""]
    if comment:
        lines += [f"  {comment}", ""]
    lines.append(f"The entry: /entry/{entry_id}")
    message.set_content("\n".join(lines) + "\n")
    name = f"{int(time.time())}{marker}{socket.gethostname().replace('/', '_')}"
    partial = maildir / "tmp" / name
    partial.write_bytes(bytes(message))
    os.replace(partial, maildir / "new" / name)
    return {"file": name, "delivered": "now"}


@periodic("* * * * *")
@task("bookmarks.rank_hot", max_attempts=1, timeout=50)
def rank_hot() -> dict[str, int]:
    """Recompute the hot ranking's counts (every minute)."""
    return {"entries": store().recompute_hot()}


# ---- helpers --------------------------------------------------------------------------


def maildir_path() -> Path:
    """``BOOKMARKS_MAILDIR``, else ``<TIERS_STATE_DIR>/mail``; RuntimeError without either."""
    explicit = os.environ.get(MAILDIR_ENV)
    if explicit:
        return Path(explicit)
    state = os.environ.get(STATE_DIR_ENV)
    if not state:
        raise RuntimeError(f"set {MAILDIR_ENV} or {STATE_DIR_ENV}: no Maildir to deliver to")
    return Path(state) / "mail"


def preview_urls(url: str) -> list[str]:
    """The stand-in page for ``url`` on each app server (``TIERS_APP_URLS``)."""
    bases = [b.strip().rstrip("/") for b in os.environ.get(APP_URLS_ENV, "").split(",")
             if b.strip()]
    if not bases:
        raise RuntimeError(f"{APP_URLS_ENV} is not set: no app server to fetch pages from")
    query = urllib.parse.urlencode({"url": url})
    return [f"{base}/preview?{query}" for base in bases]


def is_loopback(url: str) -> bool:
    """Whether ``url`` is http(s) to a loopback address (127.0.0.0/8, ::1, localhost)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect could lead off loopback; the stand-in page never redirects.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_loopback(urls: list[str]) -> str:
    """The body of the first of ``urls`` that answers 200; only loopback URLs are tried.

    ValueError for a URL off loopback (nothing is fetched); OSError if none answers.
    """
    for url in urls:
        if not is_loopback(url):
            raise ValueError(f"refusing to fetch {url}: only loopback addresses are allowed")
    opener = urllib.request.build_opener(_NoRedirects())
    failures = []
    for url in urls:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with opener.open(request, timeout=FETCH_TIMEOUT) as response:
                body = response.read(MAX_PAGE_BYTES)
                charset = response.headers.get_content_charset() or "utf-8"
                return str(body.decode(charset, errors="replace"))
        except OSError as exc:
            failures.append(f"{url}: {exc}")
    raise OSError("no app server answered: " + "; ".join(failures))


class _TitleParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.inside = False
        self.done = False
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title" and not self.done:
            self.inside = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.inside:
            self.inside = False
            self.done = True

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.parts.append(data)


def page_title(page: str) -> str:
    """The text of the page's first ``<title>``, whitespace collapsed ('' if none)."""
    parser = _TitleParser()
    parser.feed(page)
    parser.close()
    return " ".join("".join(parser.parts).split())
