"""Static file decisions: path mapping and refusals, content types, validators, ranges.

The decisions run against real files in a temporary directory (symlinks,
a FIFO, a directory with and without an index); no socket is involved.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import require
from tiers.config.proxy import Match, Route, RouteKind
from tiers.errors import ConfigError
from tiers.proxy.httpdate import http_date, parse_http_date
from tiers.proxy.static import (
    StaticPlan,
    StaticRoot,
    _open_inside,
    content_type,
    parse_range,
    plan_static,
    plan_static_file,
    resolve_target,
)

MTIME = 1_700_000_000  # Tue, 14 Nov 2023 22:13:20 GMT
LAST_MODIFIED = "Tue, 14 Nov 2023 22:13:20 GMT"
NOW = 1_800_000_000.25
DATA = bytes(range(100))
SECRET = b"the secret outside the root\n"


@pytest.fixture
def tree(open_tmp: Path) -> Path:
    """``root/`` to serve, and ``outside/`` beside it that must never be reached."""
    outside = open_tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    root = open_tmp / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello, world\n")
    (root / "data.bin").write_bytes(DATA)
    (root / "empty.txt").write_bytes(b"")
    (root / "sp ace.txt").write_bytes(b"space\n")
    (root / "%41.txt").write_bytes(b"percent\n")
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_bytes(b"<p>index</p>\n")
    (root / "noindex").mkdir()
    (root / "noindex" / "x.css").write_bytes(b"p{}\n")
    (root / "static").mkdir()
    (root / "static" / "b.txt").write_bytes(b"not stripped\n")
    (root / "link_in").symlink_to("sub/index.html")
    (root / "link_out").symlink_to("../outside/secret.txt")
    (root / "dirlink_out").symlink_to("../outside")
    (root / "abs_out").symlink_to(outside / "secret.txt")
    os.mkfifo(root / "fifo")
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (MTIME, MTIME))
    return open_tmp


@pytest.fixture
def root(tree: Path) -> StaticRoot:
    return StaticRoot(tree / "root")


@pytest.fixture
def plans() -> Iterator[list[StaticPlan]]:
    made: list[StaticPlan] = []
    yield made
    for plan in made:
        plan.close()


def _fields(plan: StaticPlan) -> dict[str, str]:
    lines = plan.fields.decode("latin-1").split("\r\n")
    assert lines[-1] == ""
    out: dict[str, str] = {}
    for line in lines[:-1]:
        name, _, value = line.partition(": ")
        assert name.lower() not in out, f"repeated {name}"
        out[name.lower()] = value
    return out


def _body(plan: StaticPlan) -> bytes:
    if plan.file is None:
        return plan.body
    return os.pread(plan.file.fileno(), plan.count, plan.offset)


class _Get:
    """Plans requests against one root and keeps them to close at the end."""

    def __init__(self, root: StaticRoot, plans: list[StaticPlan]) -> None:
        self.root = root
        self.plans = plans

    def __call__(
        self,
        path: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        method: bytes = b"GET",
        now: float = NOW,
    ) -> StaticPlan:
        plan = plan_static(self.root, method, path, list(headers), now)
        self.plans.append(plan)
        return plan


@pytest.fixture
def get(root: StaticRoot, plans: list[StaticPlan]) -> _Get:
    return _Get(root, plans)


# ---- compiling the root -------------------------------------------------------------


def test_root_is_resolved_once(tree: Path) -> None:
    (tree / "current").symlink_to("root")
    root = StaticRoot(tree / "current")
    assert root.directory == os.fsencode(os.path.realpath(tree / "root"))
    assert root.inside == root.directory + b"/"


def test_from_route_takes_root_and_prefix(tree: Path) -> None:
    route = Route(
        "assets", RouteKind.STATIC, match=Match(path_prefix="/static/"), root=tree / "root"
    )
    root = StaticRoot.from_route(route)
    assert root.strip == b"/static/"
    assert root.name == "assets"
    unstripped = Route(
        "assets",
        RouteKind.STATIC,
        match=Match(path_prefix="/static/"),
        root=tree / "root",
        strip_prefix=False,
    )
    assert StaticRoot.from_route(unstripped).strip == b""


@pytest.mark.parametrize(
    ("route", "key"),
    [
        (Route("p", RouteKind.POOL, pool="app"), "kind"),
        (Route("s", RouteKind.STATIC), "root"),
        (Route("s", RouteKind.STATIC, root=Path("/nonexistent/tiers/static")), "root"),
    ],
)
def test_from_route_refuses_bad_routes(route: Route, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        StaticRoot.from_route(route)
    assert info.value.key == key
    assert info.value.source == f"route {route.name}"


def test_root_must_be_a_directory(tree: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        StaticRoot(tree / "root" / "a.txt")


# ---- refusals -------------------------------------------------------------------------

ESCAPES = [
    b"/../outside/secret.txt",
    b"/../../etc/passwd",
    b"/%2e%2e/outside/secret.txt",
    b"/%2E%2E/outside/secret.txt",
    b"/.%2e/outside/secret.txt",
    b"/sub/%2f..%2f..%2foutside/secret.txt",
    b"/a/%2F..",
    b"/..%5c..%5coutside%5csecret.txt",
    b"/..%5C..",
    b"/..\\outside\\secret.txt",
    b"/sub/../a.txt",
    b"/./a.txt",
    b"/sub/..",
    b"/a.txt%00.png",
    b"/a.txt\x00",
    b"/link_out",
    b"/abs_out",
    b"/dirlink_out/secret.txt",
    b"/link_out?x=1",
]


@pytest.mark.parametrize("path", ESCAPES, ids=[p.decode("latin-1") for p in ESCAPES])
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_escapes_are_forbidden(get: _Get, path: bytes, method: bytes) -> None:
    plan = get(path, method=method)
    assert plan.status == 403
    assert plan.file is None
    assert SECRET not in plan.body
    assert plan.body == (b"" if method == b"HEAD" else b"forbidden\n")
    assert _fields(plan)["content-length"] == "10"


def test_escapes_are_refused_before_the_file_system(root: StaticRoot) -> None:
    # A bare ".." segment is refused even where it would stay inside the root.
    assert resolve_target(root, b"/sub/../a.txt") == 403
    assert resolve_target(root, b"/a.txt") == root.directory + b"/" + b"/a.txt"


@pytest.mark.parametrize("path", [b"/%zz", b"/%2", b"/a%", b"/%g0.txt", b"/%%41"])
def test_bad_percent_escapes_are_400(get: _Get, path: bytes) -> None:
    assert get(path).status == 400


def test_path_is_decoded_exactly_once(get: _Get) -> None:
    # "%2541" decodes to "%41" (a file of that name), not to "A".
    assert _body(get(b"/%2541.txt")) == b"percent\n"
    assert get(b"/%41.txt").status == 404
    assert get(b"/%252e%252e/outside/secret.txt").status == 404
    assert _body(get(b"/sp%20ace.txt")) == b"space\n"


def test_symlink_inside_the_root_is_followed(get: _Get) -> None:
    plan = get(b"/link_in")
    assert plan.status == 200
    assert _body(plan) == b"<p>index</p>\n"
    # The type is the served file's, not the link name's.
    assert _fields(plan)["content-type"] == "text/html; charset=utf-8"


def test_missing_files_are_404(get: _Get) -> None:
    for path in (b"/nope.txt", b"/sub/nope", b"/a.txt/", b"/a.txt/x", b"/" + b"x" * 5000):
        plan = get(path)
        assert plan.status == 404, path
        assert plan.body == b"not found\n"


def test_fifo_is_refused_without_blocking(get: _Get) -> None:
    assert get(b"/fifo").status == 403


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])
def test_other_methods_are_405_with_allow(get: _Get, method: bytes) -> None:
    plan = get(b"/a.txt", method=method)
    assert plan.status == 405
    assert _fields(plan)["allow"] == "GET, HEAD"
    assert plan.body == b"method not allowed\n"
    assert plan.file is None


def test_query_is_ignored(get: _Get) -> None:
    plan = get(b"/a.txt?v=3&x=../../etc/passwd")
    assert plan.status == 200
    assert _body(plan) == b"hello, world\n"


# ---- directories ------------------------------------------------------------------------


def test_directory_with_slash_serves_its_index(get: _Get) -> None:
    plan = get(b"/sub/")
    assert plan.status == 200
    assert _body(plan) == b"<p>index</p>\n"
    assert _fields(plan)["content-type"] == "text/html; charset=utf-8"


def test_directory_without_slash_is_redirected(get: _Get) -> None:
    plan = get(b"/sub?page=2")
    assert plan.status == 301
    assert _fields(plan)["location"] == "/sub/?page=2"
    assert plan.size == 0
    # A path that starts with several slashes must not turn into "//host/".
    assert _fields(get(b"//sub"))["location"] == "/sub/"


def test_directory_without_index_is_forbidden(get: _Get) -> None:
    plan = get(b"/noindex/")
    assert plan.status == 403
    assert b"x.css" not in plan.body
    assert get(b"/").status == 403  # the root itself has no index


def test_root_index(tree: Path, plans: list[StaticPlan]) -> None:
    (tree / "root" / "index.html").write_bytes(b"home\n")
    get = _Get(StaticRoot(tree / "root"), plans)
    assert _body(get(b"/")) == b"home\n"


# ---- prefixes -------------------------------------------------------------------------


def test_prefix_is_stripped(tree: Path, plans: list[StaticPlan]) -> None:
    route = Route(
        "assets", RouteKind.STATIC, match=Match(path_prefix="/static/"), root=tree / "root"
    )
    get = _Get(StaticRoot.from_route(route), plans)
    assert _body(get(b"/static/a.txt")) == b"hello, world\n"
    assert _body(get(b"/static/sub/")) == b"<p>index</p>\n"
    assert get(b"/other/a.txt").status == 404
    assert get(b"/static/../outside/secret.txt").status == 403


def test_prefix_without_slash_cannot_climb(tree: Path, plans: list[StaticPlan]) -> None:
    # The classic alias mistake: "/static../x" with prefix "/static" leaves "../x".
    route = Route(
        "assets", RouteKind.STATIC, match=Match(path_prefix="/static"), root=tree / "root"
    )
    get = _Get(StaticRoot.from_route(route), plans)
    assert get(b"/static../outside/secret.txt").status == 403
    assert _body(get(b"/static/a.txt")) == b"hello, world\n"
    plan = get(b"/static")
    assert plan.status == 301
    assert _fields(plan)["location"] == "/static/"


def test_prefix_kept_when_not_stripped(tree: Path, plans: list[StaticPlan]) -> None:
    route = Route(
        "assets",
        RouteKind.STATIC,
        match=Match(path_prefix="/static/"),
        root=tree / "root",
        strip_prefix=False,
    )
    get = _Get(StaticRoot.from_route(route), plans)
    assert _body(get(b"/static/b.txt")) == b"not stripped\n"
    assert get(b"/static/a.txt").status == 404


# ---- names the router already mapped ---------------------------------------------------


def _file(
    root: StaticRoot,
    plans: list[StaticPlan],
    relative: str,
    path: bytes = b"/static/x",
    method: bytes = b"GET",
) -> StaticPlan:
    plan = plan_static_file(root, method, relative, [], NOW, path=path)
    plans.append(plan)
    return plan


def test_relative_name_is_served_without_decoding_again(
    root: StaticRoot, plans: list[StaticPlan], tree: Path
) -> None:
    assert _body(_file(root, plans, "a.txt")) == b"hello, world\n"
    assert _body(_file(root, plans, "%41.txt")) == b"percent\n"
    assert _body(_file(root, plans, "sub/")) == b"<p>index</p>\n"
    # Undecodable bytes arrive as surrogates (os.fsdecode) and go back as the same bytes.
    (tree / "root" / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin\n")
    assert _body(_file(root, plans, "caf\udce9.txt")) == b"latin\n"
    assert _file(root, plans, "a.txt/").status == 404
    assert _file(root, plans, "missing").status == 404
    assert _file(root, plans, "a.txt", method=b"POST").status == 405


@pytest.mark.parametrize(
    "relative",
    [
        "../outside/secret.txt",
        "sub/../../outside/secret.txt",
        "./a.txt",
        "..",
        "link_out",
        "abs_out",
        "dirlink_out/secret.txt",
        "..\\outside",
        "a.txt\x00",
        "/../outside/secret.txt",
    ],
)
def test_relative_name_is_checked_again(
    root: StaticRoot, plans: list[StaticPlan], relative: str
) -> None:
    plan = _file(root, plans, relative)
    assert plan.status == 403
    assert SECRET not in plan.body


def test_relative_directory_redirects_with_the_request_path(
    root: StaticRoot, plans: list[StaticPlan]
) -> None:
    plan = _file(root, plans, "sub", path=b"/static/sub?x=1")
    assert plan.status == 301
    assert _fields(plan)["location"] == "/static/sub/?x=1"
    # The root itself comes as "" with or without the slash; the request path tells.
    plan = _file(root, plans, "", path=b"/static")
    assert plan.status == 301
    assert _fields(plan)["location"] == "/static/"
    assert _file(root, plans, "", path=b"/static/").status == 403  # no index, no listing


# ---- swaps between the check and the open ---------------------------------------------


def test_last_component_swapped_for_a_symlink_is_refused(
    tree: Path, root: StaticRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if "swapped" was a plain file when realpath looked, and a link when opened.
    path = os.fsencode(tree / "root" / "swapped")
    os.symlink(tree / "outside" / "secret.txt", path)
    with monkeypatch.context() as patch:
        patch.setattr(os.path, "realpath", lambda p: p)
        assert _open_inside(root, path) == 403


def test_directory_swapped_for_a_symlink_is_refused(
    tree: Path, root: StaticRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check under test reads /proc/self/fd; under TIERS_REQUIRE_ALL its absence fails.
    require(os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
    # O_NOFOLLOW guards only the last component; the descriptor's own path
    # gives the swapped directory away.
    os.symlink(tree / "outside", tree / "root" / "swapdir")
    path = os.fsencode(tree / "root" / "swapdir" / "secret.txt")
    with monkeypatch.context() as patch:
        patch.setattr(os.path, "realpath", lambda p: p)
        assert _open_inside(root, path) == 403


def test_open_inside_returns_the_opened_file(tree: Path, root: StaticRoot) -> None:
    opened = _open_inside(root, os.fsencode(tree / "root" / "link_in"))
    assert isinstance(opened, tuple)
    fd, st, real = opened
    try:
        assert real == root.inside + b"sub/index.html"
        assert st.st_ino == os.stat(real).st_ino
        assert os.read(fd, 100) == b"<p>index</p>\n"
    finally:
        os.close(fd)


# ---- the 200 answer ---------------------------------------------------------------------


def test_full_answer_fields(get: _Get, tree: Path) -> None:
    plan = get(b"/a.txt")
    st = os.stat(tree / "root" / "a.txt")
    fields = _fields(plan)
    assert plan.status == 200
    assert fields["content-type"] == "text/plain; charset=utf-8"
    assert fields["content-length"] == "13"
    assert fields["last-modified"] == LAST_MODIFIED
    assert fields["date"] == "Fri, 15 Jan 2027 08:00:00 GMT"
    assert fields["etag"] == f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
    assert fields["accept-ranges"] == "bytes"
    assert "connection" not in fields
    assert plan.file is not None and (plan.offset, plan.count) == (0, 13)
    assert plan.size == 13


def test_etag_changes_with_the_file(get: _Get, tree: Path) -> None:
    before = _fields(get(b"/a.txt"))["etag"]
    path = tree / "root" / "a.txt"
    path.write_bytes(b"hello, world\n")
    os.utime(path, ns=(MTIME * 10**9 + 1, MTIME * 10**9 + 1))
    assert _fields(get(b"/a.txt"))["etag"] != before


def test_head_describes_without_a_body(get: _Get) -> None:
    plan = get(b"/a.txt", method=b"HEAD")
    assert plan.status == 200
    assert _fields(plan)["content-length"] == "13"
    assert plan.file is None and plan.body == b"" and plan.size == 0


def test_empty_file(get: _Get) -> None:
    plan = get(b"/empty.txt")
    assert plan.status == 200
    assert _fields(plan)["content-length"] == "0"
    assert plan.file is None and plan.size == 0


def test_last_modified_is_never_in_the_future(get: _Get, tree: Path) -> None:
    path = tree / "root" / "a.txt"
    os.utime(path, (NOW + 3600, NOW + 3600))
    fields = _fields(get(b"/a.txt"))
    assert fields["last-modified"] == fields["date"]


def test_head_shapes_connection() -> None:
    plan = StaticPlan(404, b"Content-Length: 0\r\n")
    assert plan.head(True) == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    assert plan.head(False).endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert plan.head(True, b"1.0").endswith(b"Connection: keep-alive\r\n\r\n")
    assert plan.head(False, b"1.0").endswith(b"Connection: close\r\n\r\n")


# ---- content types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"index.html", b"text/html; charset=utf-8"),
        (b"INDEX.HTM", b"text/html; charset=utf-8"),
        (b"site.css", b"text/css; charset=utf-8"),
        (b"app.js", b"text/javascript; charset=utf-8"),
        (b"mod.mjs", b"text/javascript; charset=utf-8"),
        (b"notes.txt", b"text/plain; charset=utf-8"),
        (b"data.json", b"application/json"),
        (b"app.js.map", b"application/json"),
        (b"site.webmanifest", b"application/manifest+json"),
        (b"logo.svg", b"image/svg+xml"),
        (b"a.PNG", b"image/png"),
        (b"b.jpeg", b"image/jpeg"),
        (b"c.webp", b"image/webp"),
        (b"favicon.ico", b"image/x-icon"),
        (b"font.woff2", b"font/woff2"),
        (b"prog.wasm", b"application/wasm"),
        (b"doc.pdf", b"application/pdf"),
        (b"/dir.d/README", b"application/octet-stream"),
        (b"/x/.profile", b"application/octet-stream"),
        (b"archive.unknownext", b"application/octet-stream"),
        (b"/root/trailing.", b"application/octet-stream"),
    ],
)
def test_content_type(name: bytes, expected: bytes) -> None:
    assert content_type(name) == expected


def test_content_type_in_answers(get: _Get) -> None:
    assert _fields(get(b"/data.bin"))["content-type"] == "application/octet-stream"
    assert _fields(get(b"/noindex/x.css"))["content-type"] == "text/css; charset=utf-8"


# ---- dates ------------------------------------------------------------------------------


def test_http_date_formats() -> None:
    assert http_date(MTIME) == LAST_MODIFIED.encode()
    assert http_date(784111777) == b"Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize(
    "value",
    [
        b"Sun, 06 Nov 1994 08:49:37 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
    ],
)
def test_parse_http_date_forms(value: bytes) -> None:
    assert parse_http_date(value) == 784111777


@pytest.mark.parametrize("value", [b"", b"yesterday", b"Sun, 99 Nov 1994 08:49:37 GMT", b"\xff"])
def test_parse_http_date_invalid(value: bytes) -> None:
    assert parse_http_date(value) is None


# ---- conditional requests ---------------------------------------------------------------


def _etag(get: _Get, path: bytes = b"/a.txt") -> bytes:
    return _fields(get(path))["etag"].encode()


def _assert_not_modified(plan: StaticPlan, etag: bytes) -> None:
    assert plan.status == 304
    fields = _fields(plan)
    assert fields["etag"] == etag.decode()
    assert fields["last-modified"] == LAST_MODIFIED
    assert "content-length" not in fields
    assert plan.file is None and plan.body == b"" and plan.size == 0


@pytest.mark.parametrize(
    "header",
    [
        "{etag}",
        "W/{etag}",
        '"other", {etag}',
        '"other",W/{etag} , "more"',
        "*",
        " * ",
    ],
)
def test_if_none_match_hits(get: _Get, header: str) -> None:
    etag = _etag(get)
    value = header.format(etag=etag.decode()).encode()
    _assert_not_modified(get(b"/a.txt", [(b"If-None-Match", value)]), etag)


def test_if_none_match_repeated_fields_form_one_list(get: _Get) -> None:
    etag = _etag(get)
    headers = [(b"if-none-match", b'"x"'), (b"IF-NONE-MATCH", etag)]
    _assert_not_modified(get(b"/a.txt", headers), etag)


@pytest.mark.parametrize("value", [b'"other"', b'W/"other"', b"", b'"a", "b"'])
def test_if_none_match_misses(get: _Get, value: bytes) -> None:
    assert get(b"/a.txt", [(b"If-None-Match", value)]).status == 200


def test_if_none_match_on_head(get: _Get) -> None:
    etag = _etag(get)
    _assert_not_modified(get(b"/a.txt", [(b"If-None-Match", etag)], method=b"HEAD"), etag)


@pytest.mark.parametrize(
    "value",
    [
        LAST_MODIFIED,
        "Tue, 14 Nov 2023 22:13:21 GMT",
        "Wed, 15 Nov 2023 00:00:00 GMT",
        "Tuesday, 14-Nov-23 22:13:20 GMT",
        "Tue Nov 14 22:13:20 2023",
    ],
)
def test_if_modified_since_not_modified(get: _Get, value: str) -> None:
    etag = _etag(get)
    _assert_not_modified(get(b"/a.txt", [(b"If-Modified-Since", value.encode())]), etag)


@pytest.mark.parametrize(
    "value",
    [b"Tue, 14 Nov 2023 22:13:19 GMT", b"Mon, 01 Jan 2001 00:00:00 GMT", b"garbage", b""],
)
def test_if_modified_since_modified_or_invalid(get: _Get, value: bytes) -> None:
    assert get(b"/a.txt", [(b"If-Modified-Since", value)]).status == 200


def test_repeated_if_modified_since_is_ignored(get: _Get) -> None:
    value = LAST_MODIFIED.encode()
    plan = get(b"/a.txt", [(b"If-Modified-Since", value), (b"If-Modified-Since", value)])
    assert plan.status == 200


def test_if_none_match_takes_precedence_over_if_modified_since(get: _Get) -> None:
    etag = _etag(get)
    fresh = LAST_MODIFIED.encode()
    stale = b"Mon, 01 Jan 2001 00:00:00 GMT"
    # A changed tag wins over a date that says "not modified" ...
    missed = get(b"/a.txt", [(b"If-None-Match", b'"old"'), (b"If-Modified-Since", fresh)])
    assert missed.status == 200
    # ... and a matching tag wins over a date that says "modified".
    hit = get(b"/a.txt", [(b"If-Modified-Since", stale), (b"If-None-Match", etag)])
    _assert_not_modified(hit, etag)


def test_if_match(get: _Get) -> None:
    etag = _etag(get)
    assert get(b"/a.txt", [(b"If-Match", etag)]).status == 200
    assert get(b"/a.txt", [(b"If-Match", b"*")]).status == 200
    failed = get(b"/a.txt", [(b"If-Match", b'"other"')])
    assert failed.status == 412
    assert failed.file is None
    # If-Match compares strongly: a weak tag never matches.
    assert get(b"/a.txt", [(b"If-Match", b"W/" + etag)]).status == 412


def test_if_unmodified_since(get: _Get) -> None:
    assert get(b"/a.txt", [(b"If-Unmodified-Since", LAST_MODIFIED.encode())]).status == 200
    earlier = [(b"If-Unmodified-Since", b"Mon, 01 Jan 2001 00:00:00 GMT")]
    assert get(b"/a.txt", earlier).status == 412
    assert get(b"/a.txt", [(b"If-Unmodified-Since", b"nonsense")]).status == 200
    # If-Match, when present, is the only one of the two that counts.
    etag = _etag(get)
    assert get(b"/a.txt", [(b"If-Match", etag), *earlier]).status == 200


# ---- ranges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        (b"bytes=0-0", 100, range(0, 1)),
        (b"bytes=10-19", 100, range(10, 20)),
        (b"bytes=90-", 100, range(90, 100)),
        (b"bytes=-5", 100, range(95, 100)),
        (b"bytes=-500", 100, range(0, 100)),
        (b"bytes=50-1000", 100, range(50, 100)),
        (b"bytes=99-99", 100, range(99, 100)),
        (b"Bytes=0-1", 100, range(0, 2)),
        (b" bytes=0-1 ", 100, range(0, 2)),
        (b"bytes=-0", 100, range(0)),
        (b"bytes=100-", 100, range(0)),
        (b"bytes=200-300", 100, range(0)),
        (b"bytes=0-", 0, range(0)),
        (b"bytes=-1", 0, range(0)),
        (b"bytes=5-2", 100, None),
        (b"bytes=abc", 100, None),
        (b"bytes=", 100, None),
        (b"bytes=-", 100, None),
        (b"bytes 0-1", 100, None),
        (b"items=0-1", 100, None),
        (b"0-1", 100, None),
        (b"bytes=0-1,5-6", 100, None),
        (b"bytes=0-1, 5-6", 100, None),
        (b"bytes=+1-2", 100, None),
        (b"bytes=0-99999999999999999999999", 100, None),
        (b"", 100, None),
    ],
)
def test_parse_range(value: bytes, size: int, expected: range | None) -> None:
    assert parse_range(value, size) == expected


@pytest.mark.parametrize(
    ("value", "first", "last"),
    [(b"bytes=0-0", 0, 0), (b"bytes=10-19", 10, 19), (b"bytes=-3", 97, 99), (b"bytes=95-", 95, 99)],
)
def test_range_answer(get: _Get, value: bytes, first: int, last: int) -> None:
    plan = get(b"/data.bin", [(b"Range", value)])
    assert plan.status == 206
    fields = _fields(plan)
    assert fields["content-range"] == f"bytes {first}-{last}/100"
    assert fields["content-length"] == str(last - first + 1)
    assert _body(plan) == DATA[first : last + 1]
    assert plan.size == last - first + 1


def test_range_end_beyond_size_is_clipped(get: _Get) -> None:
    plan = get(b"/data.bin", [(b"Range", b"bytes=50-1000")])
    assert _fields(plan)["content-range"] == "bytes 50-99/100"
    assert _body(plan) == DATA[50:]


@pytest.mark.parametrize("value", [b"bytes=-0", b"bytes=100-", b"bytes=1000-2000"])
def test_unsatisfiable_range_is_416(get: _Get, value: bytes) -> None:
    plan = get(b"/data.bin", [(b"Range", value)])
    assert plan.status == 416
    assert _fields(plan)["content-range"] == "bytes */100"
    assert plan.file is None


def test_any_range_of_an_empty_file_is_416(get: _Get) -> None:
    plan = get(b"/empty.txt", [(b"Range", b"bytes=0-")])
    assert plan.status == 416
    assert _fields(plan)["content-range"] == "bytes */0"


@pytest.mark.parametrize(
    "value", [b"bytes=abc", b"bytes=5-2", b"items=0-1", b"bytes=0-1,5-6", b"bytes="]
)
def test_malformed_or_multiple_ranges_get_the_whole_file(get: _Get, value: bytes) -> None:
    plan = get(b"/data.bin", [(b"Range", value)])
    assert plan.status == 200
    assert "content-range" not in _fields(plan)
    assert _body(plan) == DATA


def test_repeated_range_fields_are_ignored(get: _Get) -> None:
    plan = get(b"/data.bin", [(b"Range", b"bytes=0-1"), (b"Range", b"bytes=2-3")])
    assert plan.status == 200


def test_range_is_ignored_on_head(get: _Get) -> None:
    plan = get(b"/data.bin", [(b"Range", b"bytes=0-1")], method=b"HEAD")
    assert plan.status == 200
    assert _fields(plan)["content-length"] == "100"


def test_conditional_precedes_range(get: _Get) -> None:
    etag = _etag(get, b"/data.bin")
    plan = get(b"/data.bin", [(b"Range", b"bytes=0-1"), (b"If-None-Match", etag)])
    assert plan.status == 304


def test_if_range(get: _Get) -> None:
    etag = _etag(get, b"/data.bin")
    ranged = [(b"Range", b"bytes=0-9")]
    assert get(b"/data.bin", [*ranged, (b"If-Range", etag)]).status == 206
    assert get(b"/data.bin", [*ranged, (b"If-Range", LAST_MODIFIED.encode())]).status == 206
    for stale in (
        b'"other"',
        b"W/" + etag,  # If-Range compares strongly
        b"Wed, 15 Nov 2023 00:00:00 GMT",  # a date must match exactly, even a later one
        b"garbage",
    ):
        plan = get(b"/data.bin", [*ranged, (b"If-Range", stale)])
        assert plan.status == 200, stale
        assert _body(plan) == DATA
    # An If-Range that does not match also drops an unsatisfiable range.
    assert get(b"/data.bin", [(b"Range", b"bytes=-0"), (b"If-Range", b'"x"')]).status == 200
