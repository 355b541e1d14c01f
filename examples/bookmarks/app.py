"""The bookmarks site's pages: a Flask app over a Store.

    GET  /             recent entries and hot entries (most bookmarked in the last day)
    GET  /entry/<id>   one entry with its bookmarks and comments; 404 if there is none
    POST /bookmarks    url, title, user, comment -> 303 to the entry; 400 if invalid
    POST /stars        user, entry_id -> 303 to the user's stars; 404 if no such entry
    GET  /preview?url=U the page at U as the demo imagines it (its <title> made from the
                       URL): what the title job fetches instead of the outside world
    GET  /users/<name>/stars
                       the user's stars, newest first, from the cluster of the user's
                       shard; JSON when the client asks for application/json
    POST /users/<name>/stars/copy
                       to -> 303 to the other user's stars, which now include these;
                       409 with the reason if the two users' stars live on different
                       clusters (one transaction cannot span them), nothing written

Read-your-writes: the app runs inside ``tiers.app.causal.CausalMiddleware``.
The POST's response carries the causal token of its commit, under the name
of the cluster that made it, in the signed cookie ``tiers_causal`` (with the
tokens the client already had for other clusters), and every later request's
reads on each cluster use that cluster's token from the cookie, so the page
the redirect leads to (and every later one) shows the new bookmark or star
even if the replica that serves it lags, on whichever app server it lands.
Give every app server the same ``TIERS_SECRET_KEY`` to sign it (see
``tiers.app.causal`` for what happens without one).

Caching: with ``TIERS_CACHE_NODES`` set (``tiers up`` sets it), a user's
rendered stars and the hot-entries ranking go through the cache tier; see
``bookmarks.caching`` for the keys, the TTLs and why a user who just starred
something never gets the list from before. Without it every page reads the
database. A malformed ``TIERS_CACHE_*`` variable stops the import with
ConfigError naming it.

Jobs: saving a bookmark enqueues, in the save's transaction, a job that
fetches the page's title and one that writes a notification into a Maildir
(``bookmarks.tasks``, run by ``tiers worker``); a cron job recomputes the hot
ranking's counts every minute.

``app`` is built with a store that connects on first use in each process
(``TIERS_DB_PRIMARY``, ``TIERS_DB_REPLICAS``, and with more clusters
``TIERS_DB_CLUSTERS``, ``TIERS_DB_TABLES`` and ``TIERS_DB_SHARDS``: see
``tiers.db.clusters.Databases.from_env`` and, for what lives where,
``bookmarks.store``). A table map that splits the page tables stops the
import with CrossShardError, so an app server never starts with pages that
cannot work. Tests call ``create_app`` with a ``bookmarks.memory.MemoryStore``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

import psycopg
from flask import Flask, jsonify, redirect, render_template, request, url_for
from markupsafe import Markup
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from bookmarks.caching import SiteCache, stars_key
from bookmarks.forms import (
    COMMENT_MAX,
    TITLE_MAX,
    URL_MAX,
    USER_RE,
    ValidationError,
    normalize_url,
    validate_bookmark,
    validate_star,
    validate_user,
)
from bookmarks.store import FrontPage, ProcessLocalStore, SqlStore, StarsPage, Store
from bookmarks.tasks import enqueue_after_save
from tiers.app.causal import COOKIE_NAME, CausalMiddleware
from tiers.cache import CacheCluster, cluster_from_env
from tiers.cache.env import settings_from_env
from tiers.db.clusters import CLUSTERS_ENV, SHARDS_ENV, TABLES_ENV, Databases
from tiers.db.sharding import CrossShardError
from tiers.errors import DatabaseError

TOKEN_COOKIE = COOKIE_NAME
# The form is four short fields; anything larger is not a browser using it.
MAX_FORM_BYTES = 16 * 1024


def _default_store() -> Store:
    if any(key in os.environ for key in (CLUSTERS_ENV, TABLES_ENV, SHARDS_ENV)):
        # Checked now, in the importing process: building the maps connects to
        # nothing, and a map the pages cannot work with stops the app server.
        SqlStore.from_databases(Databases.from_env(monitor=False))
    return ProcessLocalStore(lambda: SqlStore.from_databases(
        Databases.from_env(), after_save=enqueue_after_save))


def preview_title(url: str) -> str:
    """The title the demo imagines for the page at ``url``: its last path segment, its host."""
    parts = urlsplit(url)
    host = parts.hostname or url
    segment = unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])
    words = " ".join(segment.rsplit(".", 1)[0].replace("-", " ").replace("_", " ").split())
    return f"{words[:1].upper()}{words[1:]} - {host}" if words else host


def _wants_json() -> bool:
    """True if the client prefers JSON to HTML (``Accept: application/json``)."""
    accept = request.accept_mimetypes
    return accept["application/json"] > accept["text/html"]


def _stars_json(page: StarsPage) -> dict[str, object]:
    return {
        "user": page.user,
        "shard": page.shard,
        "stars": [{"id": star.id, "entry_id": star.entry_id, "url": star.url,
                   "title": star.title, "created_at": star.created_at.isoformat()}
                  for star in page.stars],
    }


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _site(url: str) -> str:
    return urlsplit(url).hostname or ""


CacheSource: TypeAlias = CacheCluster | Callable[[], CacheCluster | None] | None


def _site_cache(cache: CacheSource) -> SiteCache:
    if cache is cluster_from_env:
        settings_from_env()  # a malformed variable stops the app server now, not per request
    if cache is None or isinstance(cache, CacheCluster):
        cluster = cache
        return SiteCache(lambda: cluster)
    return SiteCache(cache)


def create_app(store: Store | None = None, *, secret_key: str | None = None,
               cache: CacheSource = cluster_from_env) -> Flask:
    """Build the site over ``store`` (by default PostgreSQL through tiers' router, lazily).

    ``secret_key`` signs the causal-token cookie; by default ``TIERS_SECRET_KEY``.
    ``cache`` is a cache cluster, a function giving the one to use (by
    default this process's, from ``TIERS_CACHE_NODES``), or None for none.
    """
    app = Flask(__name__)
    app.wsgi_app = CausalMiddleware(app.wsgi_app, secret_key=secret_key)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = MAX_FORM_BYTES
    data = store if store is not None else _default_store()
    site = _site_cache(cache)
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["site"] = _site
    limits = {"url_max": URL_MAX, "title_max": TITLE_MAX, "comment_max": COMMENT_MAX}

    @app.get("/")
    def index() -> str:
        if site.cluster() is None:
            page = data.front_page()
        else:
            page = FrontPage(recent=data.recent_entries(),
                             hot=site.hot_entries(data.hot_entries))
        return render_template("index.html", page=page, limits=limits)

    @app.get("/entry/<int:entry_id>")
    def entry(entry_id: int) -> str | tuple[str, int]:
        page = data.entry_page(entry_id)
        if page is None:
            return render_template("error.html", status=404, message="No such entry."), 404
        return render_template("entry.html", page=page, limits=limits)

    @app.post("/bookmarks")
    def add_bookmark() -> Response:
        bookmark = validate_bookmark(request.form)
        saved = data.save_bookmark(bookmark)
        # The middleware adds the commit's token to this response as a cookie.
        return redirect(url_for("entry", entry_id=saved.entry_id), code=303)

    @app.post("/stars")
    def add_star() -> Response | tuple[str, int]:
        user, entry_id = validate_star(request.form)
        starred = data.star(user, entry_id)
        if starred is None:
            return render_template("error.html", status=404, message="No such entry."), 404
        # After the commit, before the redirect: the next visitor renders the list
        # afresh. The writer is safe even if a stale refill lands after this
        # delete (bookmarks.caching: fragments are tagged with causal tokens).
        site.forget(stars_key(user))
        return redirect(url_for("user_stars", user=user), code=303)

    @app.get("/preview")
    def preview() -> tuple[str, int, dict[str, str]]:
        url = normalize_url(request.args.get("url", ""))
        title = preview_title(url)
        page = render_template("preview.html", url=url, title=title)
        return page, 200, {"Cache-Control": "public, max-age=3600"}

    @app.get("/users/<user>/stars")
    def user_stars(user: str) -> Response | str | tuple[str, int]:
        if not USER_RE.match(user):
            return render_template("error.html", status=404, message="No such user."), 404
        if _wants_json():
            return jsonify(_stars_json(data.stars_page(user)))
        stars = site.fragment(stars_key(user), lambda: render_template(
            "_stars.html", page=data.stars_page(user)))
        return render_template("stars.html", user=user, stars=Markup(stars))

    @app.post("/users/<user>/stars/copy")
    def copy_stars(user: str) -> Response | tuple[str, int]:
        if not USER_RE.match(user):
            return render_template("error.html", status=404, message="No such user."), 404
        target = validate_user(request.form.get("to", ""), "name of the user to copy to")
        if target == user:
            raise ValidationError("Choose another user to copy the stars to.")
        data.copy_stars(user, target)
        site.forget(stars_key(target))  # as in add_star: after the commit
        return redirect(url_for("user_stars", user=target), code=303)

    @app.errorhandler(CrossShardError)
    def cross_shard(exc: CrossShardError) -> tuple[str, int] | tuple[Response, int]:
        # Flask picks the handler of the most specific class, so this one wins
        # over DatabaseError's: the request is impossible, not the database down.
        if _wants_json():
            return jsonify({"error": str(exc), "clusters": list(exc.clusters)}), 409
        return render_template("error.html", status=409, message=str(exc)), 409

    @app.errorhandler(ValidationError)
    def invalid(exc: ValidationError) -> tuple[str, int]:
        return render_template("error.html", status=400, message=str(exc)), 400

    @app.errorhandler(DatabaseError)
    @app.errorhandler(psycopg.OperationalError)
    def database_down(exc: Exception) -> tuple[str, int, dict[str, str]]:
        app.logger.error("database unavailable: %s", exc)
        message = "The database is unavailable just now. Please try again in a moment."
        return render_template("error.html", status=503, message=message), 503, {"Retry-After": "1"}

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[str, int]:
        status = exc.code or 500
        return render_template("error.html", status=status, message=exc.description), status

    return app


app = create_app()
