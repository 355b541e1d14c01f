"""The causal-token middleware: the cookie's encoding, signing, tampering, and round trips
through a tiny WSGI app, with tokens of one cluster and of several."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import string
from collections.abc import Iterable, Iterator
from urllib.parse import parse_qsl
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest
from werkzeug.test import Client

from tiers.app.causal import (
    COOKIE_NAME,
    ENVIRON_KEY,
    MAX_ENTRIES,
    MAX_VALUE,
    CausalMiddleware,
    KeySource,
    cookie_tokens,
    cookie_values,
    decode_tokens,
    encode_tokens,
    resolve_key,
    sign,
    verify,
)
from tiers.db.tokens import CausalScope, current_token, current_tokens, note_write

KEY = "k" * 32
# What RFC 6265 lets a cookie value hold unquoted.
COOKIE_SAFE = set(string.ascii_letters + string.digits + "!#$%&'()*+-./:<=>?@[]^_`{|}~")


V1, V2 = b"tiers causal token v1\x00", b"tiers causal tokens v2\x00"


def mac_of(payload: str, purpose: bytes, key: str = KEY) -> str:
    digest = hmac.new(key.encode(), purpose + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signed(payload: str, key: str = KEY) -> str:
    """``payload`` with a genuine signature: what only a holder of the key could make."""
    return f"{payload}.{mac_of(payload, V2, key)}"


def signed_v1(token: str, key: str = KEY) -> str:
    """A cookie value as app servers signed it before tokens were kept per cluster."""
    return f"{token}.{mac_of(token, V1, key)}"


def many(count: int) -> dict[str, str]:
    return {f"c{n:02d}": f"0/{n + 1:X}" for n in range(count)}


# -- encoding --------------------------------------------------------------------------------


def test_entries_are_sorted_by_cluster_and_round_trip() -> None:
    text = encode_tokens({"social": "0/5A10", "main": "0/16B3D28"})
    assert text == "main:0/16B3D28.social:0/5A10"
    assert decode_tokens(text) == {"main": "0/16B3D28", "social": "0/5A10"}
    assert decode_tokens("social:0/5A10.main:0/16B3D28") == {"main": "0/16B3D28",
                                                             "social": "0/5A10"}
    assert encode_tokens("0/1") == "main:0/1"  # a bare token is main's


@pytest.mark.parametrize(
    "tokens",
    [
        {},
        {"Main": "0/1"},
        {"a-b": "0/1"},
        {"a.b": "0/1"},
        {"a:b": "0/1"},
        {"\u00e4": "0/1"},  # a lower-case identifier, but not ASCII
        {"1st": "0/1"},
        {"x" * 64: "0/1"},
        {"main": "soon"},
        {"main": "0/1.x"},
        many(MAX_ENTRIES + 1),
        "yesterday",
    ],
)
def test_encoding_refuses_bad_names_tokens_and_too_many(tokens: dict[str, str] | str) -> None:
    with pytest.raises(ValueError):
        encode_tokens(tokens)
    with pytest.raises(ValueError):
        sign(tokens, KEY)


@pytest.mark.parametrize(
    "text",
    ["", "main", "main:", ":0/1", "main:0/1.", "main:0/1..social:0/2", "main:0/1.main:0/2",
     "Main:0/1", "main:0/1:0/2", "main=0/1", "main:0/1;social:0/2",
     ".".join(f"{k}:{v}" for k, v in many(MAX_ENTRIES + 1).items())],
)
def test_decoding_refuses_what_encoding_never_makes(text: str) -> None:
    assert decode_tokens(text) is None


# -- signing -------------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    value = sign({"social": "0/5A10", "main": "16/B374D848"}, KEY)
    assert value.startswith("main:16/B374D848.social:0/5A10.")
    both = {"main": "16/B374D848", "social": "0/5A10"}
    assert verify(value, KEY) == both
    assert verify(value, KEY.encode()) == both
    assert verify(f'"{value}"', KEY) == both  # a quoted cookie value
    assert verify(sign("0/2A", KEY), KEY) == {"main": "0/2A"}


def test_the_value_is_cookie_safe_and_bounded_at_its_largest() -> None:
    largest = {f"{n:x}".rjust(63, "z"): "FFFFFFFF/FFFFFFFF" for n in range(MAX_ENTRIES)}
    value = sign(largest, KEY)
    assert set(value) <= COOKIE_SAFE
    assert len(value) == MAX_VALUE
    assert verify(value, KEY) == largest
    assert set(sign({"main": "0/1", "social_2": "A/B"}, KEY)) <= COOKIE_SAFE


def test_the_old_one_token_format_is_read_as_mains_token() -> None:
    assert verify(signed_v1("16/B374D848"), KEY) == {"main": "16/B374D848"}
    assert verify(f'"{signed_v1("0/1")}"', KEY) == {"main": "0/1"}
    assert verify(signed_v1("0/1", "another key of enough length...."), KEY) is None
    # Each format's signature holds for its own format only.
    assert verify(signed("0/1"), KEY) is None
    _, _, v1_mac = signed_v1("main:0/1").rpartition(".")
    assert verify(f"main:0/1.{v1_mac}", KEY) is None


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
        "main:0/1",
        "main:0/1.",
        "main:0/1.YWJj",
        "main:0/1.social:0/2",  # the last entry taken for a signature
        "main:0/1.\u00e9\u00e9\u00e9",
        "x" * (MAX_VALUE + 3),
    ],
)
def test_malformed_or_unsigned_values_are_refused(value: str | None) -> None:
    assert verify(value, KEY) is None


@pytest.mark.parametrize(
    "payload",
    [
        ".".join(f"{k}:{v}" for k, v in many(MAX_ENTRIES + 1).items()),  # too many
        "main:0/1.main:0/2",  # a cluster twice
        "Main:0/1",
        "so-cial:0/1",
        "main:0/1.:0/2",
        "main:soon",
        "main:0/1." + "x" * 64 + ":0/2",
    ],
)
def test_a_signed_value_that_breaks_the_format_is_refused(payload: str) -> None:
    # Signed with the real key, as no client could: the format is checked for itself.
    assert verify(signed(payload), KEY) is None


def test_a_tampered_token_or_another_key_is_refused() -> None:
    value = sign({"main": "0/10", "social": "0/20"}, KEY)
    payload, _, mac = value.rpartition(".")
    assert payload == "main:0/10.social:0/20"
    for forged in ("main:FF/10.social:0/20", "main:0/10", "social:0/20",
                   "social:0/20.main:0/10", "main:0/20.social:0/10",
                   "main:0/10.social:0/20.other:0/1", "FF/10"):
        assert verify(f"{forged}.{mac}", KEY) is None, forged
    assert verify(value[:-2] + ("AA" if not value.endswith("AA") else "BB"), KEY) is None
    assert verify(value, "another key of enough length....") is None


def test_the_cookie_keeps_the_written_clusters_first_when_there_are_too_many() -> None:
    scope = CausalScope.starting(many(MAX_ENTRIES + 4))
    assert cookie_tokens(scope) == dict(list(many(MAX_ENTRIES + 4).items())[:MAX_ENTRIES])
    scope.tokens["c19"] = "1/0"
    scope.written.add("c19")
    scope.tokens["zz"] = "2/0"
    scope.written.add("zz")
    kept = cookie_tokens(scope)
    assert len(kept) == MAX_ENTRIES
    assert list(kept)[:2] == ["c19", "zz"] and kept["c19"] == "1/0" and kept["zz"] == "2/0"
    assert list(kept)[2:] == [f"c{n:02d}" for n in range(MAX_ENTRIES - 2)]


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
    """``POST /write?lsn=X&cluster=C...`` commits "at" each X in turn, on C (default main);
    ``GET /`` answers main's token its reads would use, ``GET /all`` every cluster's."""
    path = environ["PATH_INFO"]
    scope = environ.get(ENVIRON_KEY)
    assert isinstance(scope, CausalScope)
    if path == "/write":
        query = parse_qsl(str(environ["QUERY_STRING"]))
        clusters = [value for key, value in query if key == "cluster"]
        for index, lsn in enumerate(value for key, value in query if key == "lsn"):
            note_write(lsn, *clusters[index:index + 1])
        start_response("303 See Other", [("Location", "/")])
        return [b""]
    if path == "/boom":
        raise RuntimeError("app failure")
    if path == "/lazy":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            yield str(current_token()).encode()

        return body()
    if path == "/all":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(current_tokens()).encode()]
    SEEN.append(current_token())
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(current_token()).encode()]


def tokens_seen(browser: Client) -> dict[str, str]:
    found: dict[str, str] = json.loads(browser.get("/all").text)
    return found


def client(key: str = KEY, **options: object) -> Client:
    return Client(CausalMiddleware(app, secret_key=key, **options))  # type: ignore[arg-type]


def test_a_write_sets_the_signed_cookie_and_later_reads_use_it() -> None:
    browser = client()
    response = browser.post("/write?lsn=0/2A")
    assert response.status_code == 303
    header = response.headers["Set-Cookie"]
    assert header.startswith(f"{COOKIE_NAME}=main:0/2A.")
    for part in ("Max-Age=3600", "Path=/", "HttpOnly", "SameSite=Lax"):
        assert part in header
    assert "Secure" not in header
    cookie = browser.get_cookie(COOKIE_NAME)
    assert cookie is not None and verify(cookie.value, KEY) == {"main": "0/2A"}
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
    "value",
    ["0/2A", "'; DROP TABLE entries; --", "FF/0.AAAA", "x" * 4000, "0/1.%%%", "main:0/2A",
     "main:0/2A.AAAA", signed("main:0/1.main:0/2"), signed("Main:0/1"),
     signed(".".join(f"{k}:{v}" for k, v in many(MAX_ENTRIES + 1).items())),
     signed_v1("0/2A", "another key of enough length....")],
)
def test_a_tampered_or_malformed_cookie_is_ignored_never_an_error(value: str) -> None:
    browser = client()
    browser.set_cookie(COOKIE_NAME, value)
    response = browser.get("/all")
    assert response.status_code == 200
    assert response.json == {}
    assert browser.get("/").text == "None"


def test_a_forged_token_with_a_real_signature_of_another_token_is_ignored() -> None:
    browser = client()
    browser.post("/write?lsn=0/10")
    cookie = browser.get_cookie(COOKIE_NAME)
    assert cookie is not None
    _, _, mac = cookie.value.rpartition(".")
    for forged in (f"main:FFFFFFFF/0.{mac}", f"FFFFFFFF/0.{mac}", f"social:0/10.{mac}"):
        browser.set_cookie(COOKIE_NAME, forged)
        assert browser.get("/all").json == {}


def test_a_second_write_in_a_later_request_replaces_the_cookie() -> None:
    browser = client()
    browser.post("/write?lsn=0/10")
    browser.post("/write?lsn=0/20")
    assert browser.get("/").text == "0/20"


def test_the_secure_flag_and_other_cookie_settings() -> None:
    response = client(secure=True, max_age=60, path="/app",
                      cookie_name="c").post("/write?lsn=0/1")
    header = response.headers["Set-Cookie"]
    assert header.startswith("c=main:0/1.")
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


# -- tokens of several clusters ----------------------------------------------------------------


def test_a_write_on_another_cluster_keeps_the_first_clusters_token() -> None:
    browser = client()
    browser.post("/write?lsn=0/2A")
    browser.post("/write?lsn=0/5&cluster=social")
    assert tokens_seen(browser) == {"main": "0/2A", "social": "0/5"}
    cookie = browser.get_cookie(COOKIE_NAME)
    assert cookie is not None and cookie.value.startswith("main:0/2A.social:0/5.")
    # A later write replaces its own cluster's token only.
    browser.post("/write?lsn=0/40")
    assert tokens_seen(browser) == {"main": "0/40", "social": "0/5"}
    assert browser.get("/").text == "0/40"


def test_writes_on_two_clusters_in_one_request_are_both_handed_back() -> None:
    browser = client()
    response = browser.post("/write?lsn=0/10&cluster=main&lsn=3/0&cluster=social")
    assert response.headers["Set-Cookie"].startswith(f"{COOKIE_NAME}=main:0/10.social:3/0.")
    other = client()
    cookie = browser.get_cookie(COOKIE_NAME)
    assert cookie is not None
    other.set_cookie(COOKIE_NAME, cookie.value)
    assert tokens_seen(other) == {"main": "0/10", "social": "3/0"}


def test_within_a_cluster_the_latest_commit_wins_and_other_clusters_stay() -> None:
    browser = client()
    browser.set_cookie(COOKIE_NAME, sign({"main": "0/50", "social": "0/60"}, KEY))
    # After a failover the new primary's positions may lie below the received token.
    browser.post("/write?lsn=0/30&cluster=main&lsn=0/10&cluster=main")
    assert tokens_seen(browser) == {"main": "0/10", "social": "0/60"}


def test_an_old_format_cookie_is_honoured_and_replaced_by_the_new_format() -> None:
    browser = client()
    browser.set_cookie(COOKIE_NAME, signed_v1("0/2A"))
    response = browser.get("/all")
    assert response.json == {"main": "0/2A"} and "Set-Cookie" not in response.headers
    browser.post("/write?lsn=0/7&cluster=social")
    cookie = browser.get_cookie(COOKIE_NAME)
    assert cookie is not None and cookie.value.startswith("main:0/2A.social:0/7.")
    assert tokens_seen(browser) == {"main": "0/2A", "social": "0/7"}


def test_a_request_that_only_reads_hands_back_nothing() -> None:
    browser = client()
    browser.set_cookie(COOKIE_NAME, sign({"main": "0/1", "social": "0/2"}, KEY))
    response = browser.get("/all")
    assert response.json == {"main": "0/1", "social": "0/2"}
    assert "Set-Cookie" not in response.headers


def test_more_clusters_than_a_cookie_holds_keep_the_written_ones(
        caplog: pytest.LogCaptureFixture) -> None:
    browser = client()
    browser.set_cookie(COOKIE_NAME, sign(many(MAX_ENTRIES), KEY))
    with caplog.at_level(logging.WARNING, logger="tiers.app"):
        response = browser.post("/write?lsn=5/0&cluster=zz")
    assert response.status_code == 303
    assert "holds 16 clusters' tokens, not 17" in caplog.text
    kept = tokens_seen(browser)
    assert len(kept) == MAX_ENTRIES and kept["zz"] == "5/0"
    assert set(kept) == {"zz", *list(many(MAX_ENTRIES))[:MAX_ENTRIES - 1]}
