"""The causal-token middleware: signing, tampering, and a round trip through a tiny WSGI app."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest
from werkzeug.test import Client

from tiers.app.causal import (
    COOKIE_NAME,
    ENVIRON_KEY,
    CausalMiddleware,
    KeySource,
    cookie_values,
    resolve_key,
    sign,
    verify,
)
from tiers.db.tokens import CausalScope, current_token, note_write

KEY = "k" * 32

# -- signing -------------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    value = sign("16/B374D848", KEY)
    assert value.startswith("16/B374D848.")
    assert verify(value, KEY) == "16/B374D848"
    assert verify(value, KEY.encode()) == "16/B374D848"
    assert verify(f'"{value}"', KEY) == "16/B374D848"  # a quoted cookie value


def test_sign_refuses_what_is_no_token() -> None:
    with pytest.raises(ValueError):
        sign("yesterday", KEY)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "0/1",  # unsigned
        "0/1.",
        ".abc",
        "yesterday.abc",
        "0/1.not*base64",
        "0/1.YWJj",  # well-formed, wrong signature
        "0/1." + "A" * 100,
    ],
)
def test_malformed_or_unsigned_values_are_refused(value: str | None) -> None:
    assert verify(value, KEY) is None


def test_a_tampered_token_or_another_key_is_refused() -> None:
    value = sign("0/10", KEY)
    _token, _, mac = value.partition(".")
    assert verify(f"FF/10.{mac}", KEY) is None
    assert verify(value[:-2] + ("AA" if not value.endswith("AA") else "BB"), KEY) is None
    assert verify(value, "another key of enough length....") is None


def test_cookie_values_finds_every_value_of_the_name() -> None:
    header = f"a=1; {COOKIE_NAME}=x; b; {COOKIE_NAME} = y ;c=2"
    assert cookie_values(header, COOKIE_NAME) == ["x", "y"]
    assert cookie_values("", COOKIE_NAME) == []
    assert cookie_values(";;==;", COOKIE_NAME) == []


def test_the_key_comes_from_the_argument_then_the_environment_else_is_random() -> None:
    env = {"TIERS_SECRET_KEY": "env", "TIERS_DB_PRIMARY": "a", "TIERS_DB_REPLICAS": "b,c"}
    assert resolve_key("given", env) == (b"given", KeySource.ARGUMENT)
    assert resolve_key(None, env) == (b"env", KeySource.ENVIRONMENT)
    del env["TIERS_SECRET_KEY"]
    # Database settings are no secret: they never stand in for the key.
    made, source = resolve_key(None, env)
    assert source is KeySource.RANDOM and resolve_key(None, env)[0] != made
    made, source = resolve_key(None, {})
    assert source is KeySource.RANDOM and len(made) == 32
    assert resolve_key(None, {})[0] != made


@pytest.mark.parametrize(
    ("environ", "warning"),
    [
        ({}, "a key of this process only"),
        ({"TIERS_DB_PRIMARY": "a"}, "a key of this process only"),
        ({"TIERS_SECRET_KEY": "short"}, "only 5 bytes"),
        ({"TIERS_SECRET_KEY": KEY}, ""),
    ],
)
def test_a_weak_or_missing_key_is_warned_about(
        caplog: pytest.LogCaptureFixture, environ: dict[str, str], warning: str) -> None:
    with caplog.at_level(logging.WARNING, logger="tiers.app"):
        CausalMiddleware(app, environ=environ)
    assert warning in caplog.text
    if not warning:
        assert caplog.text == ""


# -- through a WSGI app ------------------------------------------------------------------------

SEEN: list[str | None] = []


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """``POST /write?lsn=X`` commits "at" X; ``GET /`` answers the token its reads would use."""
    path = environ["PATH_INFO"]
    scope = environ.get(ENVIRON_KEY)
    assert isinstance(scope, CausalScope)
    if path == "/write":
        note_write(str(environ["QUERY_STRING"]).removeprefix("lsn="))
        start_response("303 See Other", [("Location", "/")])
        return [b""]
    if path == "/boom":
        raise RuntimeError("app failure")
    if path == "/lazy":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            yield str(current_token()).encode()

        return body()
    SEEN.append(current_token())
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(current_token()).encode()]


def client(key: str = KEY, **options: object) -> Client:
    return Client(CausalMiddleware(app, secret_key=key, **options))  # type: ignore[arg-type]


def test_a_write_sets_the_signed_cookie_and_later_reads_use_it() -> None:
    browser = client()
    response = browser.post("/write?lsn=0/2A")
    assert response.status_code == 303
    header = response.headers["Set-Cookie"]
    assert header.startswith(f"{COOKIE_NAME}=0/2A.")
    for part in ("Max-Age=3600", "Path=/", "HttpOnly", "SameSite=Lax"):
        assert part in header
    assert "Secure" not in header
    cookie = browser.get_cookie(COOKIE_NAME)
    assert cookie is not None and verify(cookie.value, KEY) == "0/2A"
    assert browser.get("/").text == "0/2A"
    assert current_token() is None  # the scope ended with the response


def test_another_app_server_with_the_same_key_honours_the_cookie() -> None:
    writer = client()
    writer.post("/write?lsn=1/0")
    cookie = writer.get_cookie(COOKIE_NAME)
    assert cookie is not None
    other = client()
    other.set_cookie(COOKIE_NAME, cookie.value)
    assert other.get("/").text == "1/0"
    stranger = client(key="another key of enough length....")
    stranger.set_cookie(COOKIE_NAME, cookie.value)
    assert stranger.get("/").text == "None"


def test_reads_without_a_write_set_no_cookie() -> None:
    response = client().get("/")
    assert "Set-Cookie" not in response.headers
    assert response.text == "None"


@pytest.mark.parametrize(
    "value", ["0/2A", "'; DROP TABLE entries; --", "FF/0.AAAA", "x" * 4000, "0/1.%%%"]
)
def test_a_tampered_or_malformed_cookie_is_ignored_never_an_error(value: str) -> None:
    browser = client()
    browser.set_cookie(COOKIE_NAME, value)
    response = browser.get("/")
    assert response.status_code == 200
    assert response.text == "None"


def test_a_forged_token_with_a_real_signature_of_another_token_is_ignored() -> None:
    browser = client()
    browser.post("/write?lsn=0/10")
    cookie = browser.get_cookie(COOKIE_NAME)
    assert cookie is not None
    _, _, mac = cookie.value.partition(".")
    browser.set_cookie(COOKIE_NAME, f"FFFFFFFF/0.{mac}")
    assert browser.get("/").text == "None"


def test_a_second_write_in_a_later_request_replaces_the_cookie() -> None:
    browser = client()
    browser.post("/write?lsn=0/10")
    browser.post("/write?lsn=0/20")
    assert browser.get("/").text == "0/20"


def test_the_secure_flag_and_other_cookie_settings() -> None:
    response = client(secure=True, max_age=60, path="/app",
                      cookie_name="c").post("/write?lsn=0/1")
    header = response.headers["Set-Cookie"]
    assert header.startswith("c=0/1.")
    assert "Secure" in header and "Max-Age=60" in header and "Path=/app" in header


def test_a_lazy_body_reads_with_the_token() -> None:
    browser = client()
    browser.post("/write?lsn=0/30")
    assert browser.get("/lazy").text == "0/30"
    assert current_token() is None


def test_an_app_error_propagates_and_ends_the_scope() -> None:
    with pytest.raises(RuntimeError, match="app failure"):
        client().get("/boom")
    assert current_token() is None
