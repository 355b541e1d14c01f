"""Validation of the bookmark form: what may be stored, and in which normal form.

URLs are normalised before they are stored, because an entry is one row per
URL: the host is lower-cased and IDNA-encoded, other non-ASCII characters
are percent-encoded, so the same page typed two ways is one entry and every
stored URL is plain ASCII (which also keeps it within the unique index's
size limit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

URL_MAX = 2048
TITLE_MAX = 200
COMMENT_MAX = 100
USER_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_-]{1,31}\Z")

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACE_RE = re.compile(r"\s+")
# Characters left as they are in the path, query and fragment: the URL
# delimiters and '%' (an escape already there). Others that are not
# letters, digits or "-._~" are percent-encoded.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


class ValidationError(ValueError):
    """The form cannot be stored; the message says why, in words for the person who sent it."""


@dataclass(frozen=True)
class NewBookmark:
    """A validated bookmark: ``url`` normalised, ``title`` never empty, ``comment`` one line."""

    url: str
    title: str
    user: str
    comment: str


def _one_line(text: str) -> str:
    return _SPACE_RE.sub(" ", _CONTROL_RE.sub(" ", text)).strip()


def normalize_url(text: str) -> str:
    """The stored form of a URL typed by a person; ValidationError if it is not http(s)."""
    text = text.strip()
    if not text:
        raise ValidationError("Enter the URL to bookmark.")
    if len(text) > URL_MAX:
        raise ValidationError(f"The URL is too long (at most {URL_MAX} characters).")
    if _CONTROL_RE.search(text) or _SPACE_RE.search(text):
        raise ValidationError("The URL must not contain spaces or control characters.")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"That is not a valid URL ({exc}).") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValidationError("Only http:// and https:// URLs can be bookmarked.")
    host = parts.hostname
    if not host:
        raise ValidationError("The URL has no host name.")
    if parts.username is not None or parts.password is not None:
        raise ValidationError("Remove the user name and password from the URL.")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValidationError("The URL's host name is not valid.") from None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    url = urlunsplit(
        (
            parts.scheme.lower(),
            netloc,
            quote(parts.path, safe=_URL_SAFE) or "/",
            quote(parts.query, safe=_URL_SAFE),
            quote(parts.fragment, safe=_URL_SAFE),
        )
    )
    if len(url) > URL_MAX:
        raise ValidationError(f"The URL is too long (at most {URL_MAX} characters).")
    return url


def validate_bookmark(form: Mapping[str, str]) -> NewBookmark:
    """Check and normalise the fields ``url``, ``title``, ``user``, ``comment``.

    Raises ValidationError with the first problem found. A missing title
    becomes the URL (cut to the title limit), as an untitled link still needs
    a text to click.
    """
    url = normalize_url(form.get("url", ""))
    user = validate_user(form.get("user", ""))
    title = _one_line(form.get("title", ""))
    if len(title) > TITLE_MAX:
        raise ValidationError(f"The title is too long (at most {TITLE_MAX} characters).")
    comment = _one_line(form.get("comment", ""))
    if len(comment) > COMMENT_MAX:
        raise ValidationError(f"The comment is too long (at most {COMMENT_MAX} characters).")
    return NewBookmark(url=url, title=title or url[:TITLE_MAX], user=user, comment=comment)


USER_MESSAGE = "The user name must be 2 to 32 letters, digits, '-' or '_', starting with a letter."


def validate_user(text: str, what: str = "user name") -> str:
    """A user name as stored (surrounding space removed); ValidationError if it is not one."""
    user = text.strip()
    if not USER_RE.match(user):
        raise ValidationError(USER_MESSAGE.replace("user name", what, 1))
    return user


def validate_star(form: Mapping[str, str]) -> tuple[str, int]:
    """The fields ``user`` and ``entry_id`` of the star form; ValidationError if either is bad."""
    user = validate_user(form.get("user", ""))
    text = form.get("entry_id", "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) == 0:
        raise ValidationError("Choose an entry to star.")
    return user, int(text)
