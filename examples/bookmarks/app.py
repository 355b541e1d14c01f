"""The bookmarks site's pages: a Flask app over a Store.

    GET  /             recent entries and hot entries (most bookmarked in the last day)
    GET  /entry/<id>   one entry with its bookmarks and comments; 404 if there is none
    POST /bookmarks    url, title, user, comment -> 303 to the entry; 400 if invalid

Read-your-writes: the app runs inside ``tiers.app.causal.CausalMiddleware``.
The POST's response carries the causal token of its commit in the signed
cookie ``tiers_causal``, and every later request's reads use the token from
the cookie, so the page the redirect leads to (and every later one) shows the
new bookmark even if the replica that serves it lags, on whichever app server
it lands. Give every app server the same ``TIERS_SECRET_KEY`` to sign it (see
``tiers.app.causal`` for what happens without one).

``app`` is built with a store that connects on first use in each process
(``TIERS_DB_PRIMARY``, ``TIERS_DB_REPLICAS``, see
``tiers.db.router.Cluster.from_env``); tests call ``create_app`` with a
``bookmarks.memory.MemoryStore``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

import psycopg
from flask import Flask, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from bookmarks.forms import COMMENT_MAX, TITLE_MAX, URL_MAX, ValidationError, validate_bookmark
from bookmarks.store import ProcessLocalStore, SqlStore, Store
from tiers.app.causal import COOKIE_NAME, CausalMiddleware
from tiers.db.router import Cluster
from tiers.errors import DatabaseError

TOKEN_COOKIE = COOKIE_NAME
# The form is four short fields; anything larger is not a browser using it.
MAX_FORM_BYTES = 16 * 1024


def _default_store() -> Store:
    return ProcessLocalStore(lambda: SqlStore(Cluster.from_env()))


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _site(url: str) -> str:
    return urlsplit(url).hostname or ""


def create_app(store: Store | None = None, *, secret_key: str | None = None) -> Flask:
    """Build the site over ``store`` (by default PostgreSQL through tiers' router, lazily).

    ``secret_key`` signs the causal-token cookie; by default ``TIERS_SECRET_KEY``.
    """
    app = Flask(__name__)
    app.wsgi_app = CausalMiddleware(app.wsgi_app, secret_key=secret_key)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = MAX_FORM_BYTES
    data = store if store is not None else _default_store()
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["site"] = _site
    limits = {"url_max": URL_MAX, "title_max": TITLE_MAX, "comment_max": COMMENT_MAX}

    @app.get("/")
    def index() -> str:
        page = data.front_page()
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
