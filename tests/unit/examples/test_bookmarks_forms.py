from __future__ import annotations

import pytest
from bookmarks.forms import (
    COMMENT_MAX,
    TITLE_MAX,
    URL_MAX,
    NewBookmark,
    ValidationError,
    normalize_url,
    validate_bookmark,
)


def form(**fields: str) -> dict[str, str]:
    base = {"url": "https://example.com/a", "title": "A", "user": "alice", "comment": "nice"}
    base.update(fields)
    return base


def test_valid_form() -> None:
    assert validate_bookmark(form()) == NewBookmark(
        url="https://example.com/a", title="A", user="alice", comment="nice"
    )


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("https://example.com/a", "https://example.com/a"),
        ("  HTTPS://Example.COM/Path?q=1#frag  ", "https://example.com/Path?q=1#frag"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com:8080/x", "http://example.com:8080/x"),
        (
            "https://例え.jp/パス?q=日本",
            "https://xn--r8jz45g.jp/%E3%83%91%E3%82%B9?q=%E6%97%A5%E6%9C%AC",
        ),
        ("https://example.com/a%20b", "https://example.com/a%20b"),
        ('https://example.com/"<x>"', "https://example.com/%22%3Cx%3E%22"),
        ("http://[::1]:8000/", "http://[::1]:8000/"),
    ],
)
def test_urls_are_normalised(typed: str, stored: str) -> None:
    assert normalize_url(typed) == stored


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "Enter the URL"),
        ("javascript:alert(1)", "Only http:// and https://"),
        ("ftp://example.com/", "Only http:// and https://"),
        ("data:text/html,<b>x</b>", "Only http:// and https://"),
        ("example.com/page", "Only http:// and https://"),
        ("https:///path", "no host name"),
        ("https://exa mple.com/", "spaces or control characters"),
        ("https://example.com/\x00", "spaces or control characters"),
        ("https://user:pw@example.com/", "user name and password"),
        ("https://example.com:99999/", "not a valid URL"),
        ("https://example.com/" + "a" * URL_MAX, "too long"),
        # Short as typed, too long once percent-encoded.
        ("https://example.com/" + "あ" * 700, "too long"),
    ],
)
def test_bad_urls(url: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        validate_bookmark(form(url=url))


@pytest.mark.parametrize("user", ["al", "alice", "a_b-c9", "A" * 32])
def test_good_user_names(user: str) -> None:
    assert validate_bookmark(form(user=user)).user == user


@pytest.mark.parametrize("user", ["", "a", "9lives", "_x", "al ice", "alice!", "A" * 33, "<b>"])
def test_bad_user_names(user: str) -> None:
    with pytest.raises(ValidationError, match="user name"):
        validate_bookmark(form(user=user))


def test_comment_is_one_line_and_bounded() -> None:
    assert validate_bookmark(form(comment="  two\nlines\t here ")).comment == "two lines here"
    assert validate_bookmark(form(comment="c" * COMMENT_MAX)).comment == "c" * COMMENT_MAX
    with pytest.raises(ValidationError, match="comment is too long"):
        validate_bookmark(form(comment="c" * (COMMENT_MAX + 1)))


def test_title_is_bounded_and_defaults_to_the_url() -> None:
    with pytest.raises(ValidationError, match="title is too long"):
        validate_bookmark(form(title="t" * (TITLE_MAX + 1)))
    assert validate_bookmark(form(title="  ")).title == "https://example.com/a"
    long_url = "https://example.com/" + "p" * 400
    assert validate_bookmark(form(url=long_url, title="")).title == long_url[:TITLE_MAX]


def test_missing_fields() -> None:
    with pytest.raises(ValidationError):
        validate_bookmark({})
    assert validate_bookmark({"url": "https://example.com/", "user": "bob"}).comment == ""
