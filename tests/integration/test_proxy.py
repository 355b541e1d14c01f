"""The proxy as a real process in front of real HTTP servers (see tests/integration/proxykit.py)."""

from __future__ import annotations

import contextlib
import http.client
import importlib.machinery
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import tiers.proxy.fastpath
from tests.conftest import require
from tests.integration.proxykit import (
    _json,
    _read_until_closed,
    _wait,
)
from tiers.proxy import c_helpers
from tiers.proxy.accesslog import parse_line

# ---- tests ---------------------------------------------------------------------


def test_round_robin_and_keep_alive_reuse(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    p = proxy([a, b])
    conn = p.connection()
    names = []
    for i in range(20):
        conn.request("GET", f"/item/{i}")
        response = conn.getresponse()
        assert response.status == 200
        names.append(_json(response.read())["backend"])
    conn.close()
    assert names.count("A") == 10 and names.count("B") == 10
    for backend in (a, b):
        seen = backend.requests("GET")
        assert len(seen) == 10
        # Ten sequential requests ride on one pooled connection.
        assert len({s.connection for s in seen}) == 1


def test_the_start_log_names_the_build_that_runs(backends: Any, proxy: Any) -> None:
    # The proxy process runs the install these tests import: compiled modules
    # (setup.py) or the Python sources, and then says why when a compiled
    # build is there (TIERS_PURE_PYTHON=1, or sources changed since).
    compiled = tiers.proxy.fastpath.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    (a,) = backends(1)
    p = proxy([a])
    said, helpers = p.wait_for(r"request path: (.*); C helpers: (.*)", timeout=5).groups()
    if compiled:
        assert re.fullmatch(r"compiled \((\d+) modules\)", said), said
    else:
        assert said == tiers.proxy.request_path()
        assert re.fullmatch(r"pure Python( \(.+\))?", said), said
    # The C helpers are part of both builds wherever a compiler was at hand.
    assert helpers == (", ".join(c_helpers()) or "none (built without a C compiler)")
    require(helpers == "head scanner, log line", "the C helpers are not built")
    status, _, _ = p.get("/after-start")
    assert status == 200


def test_forwarding_headers(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    status, body, _ = p.get(
        "/h",
        **{
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hop",
            "Keep-Alive": "timeout=9",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "X-Kept": "end-to-end",
        },
    )
    assert status == 200
    headers = {k.lower(): v for k, v in _json(body)["headers"].items()}
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-kept"] == "end-to-end"
    for hop in ("connection", "x-secret", "keep-alive", "proxy-connection", "te"):
        assert hop not in headers, hop

    status, body, response = p.get("/hop")
    assert status == 200 and body == b"hop"
    names = {name.lower() for name, _ in response.getheaders()}
    assert "x-visible" in names
    for hop in ("x-internal", "keep-alive", "proxy-connection", "trailer", "upgrade"):
        assert hop not in names, hop


def test_response_framings_and_bodies(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    conn = p.connection()
    conn.request("GET", "/chunked")
    response = conn.getresponse()
    assert response.read() == b"first,second,third"
    conn.request("GET", "/until-close")
    response = conn.getresponse()
    # Re-chunked for the client, so this connection stays usable.
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.read() == b"read until the connection closes"
    conn.request("HEAD", "/anything")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    assert int(response.getheader("Content-Length") or 0) > 0
    body = bytes(range(256)) * 4096  # 1 MiB each way, streamed
    conn.request("POST", "/upload", body=body)
    reply = _json(conn.getresponse().read())
    assert reply["body_length"] == len(body) and reply["body_sum"] == sum(body) % 65521
    conn.request("PUT", "/chunked-up", body=iter([body[:1000], body[1000:]]))
    reply = _json(conn.getresponse().read())
    assert reply["body_length"] == len(body)
    assert a.requests("PUT")[0].headers.get("Transfer-Encoding") == "chunked"
    conn.close()


def test_slow_peers_slow_the_other_side_instead_of_filling_memory(
    backends: Any, proxy: Any
) -> None:
    (a,) = backends(1)
    # A 64 MiB upload is the point here. The backend is busy with it, so its
    # health checks may be slow on a loaded machine: give them time.
    p = proxy([a], "--max-body-size", "0", "--health-timeout", "3")
    size = 64 << 20
    chunk = b"u" * (1 << 20)
    # The backend waits 1.5 s before reading a 64 MiB upload.
    with socket.create_connection(("127.0.0.1", p.port), timeout=60) as sock:
        sock.sendall(b"POST /stall?s=1.5 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        sent = [0]

        def upload() -> None:
            with contextlib.suppress(OSError):
                while sent[0] < size:
                    sent[0] += sock.send(chunk)

        uploader = threading.Thread(target=upload)
        uploader.start()
        time.sleep(1.0)
        # Only socket buffers and the proxy's bounded buffer hold the bytes.
        assert sent[0] < size // 2
        uploader.join(60)  # generous: the machine may be busy
        assert sent[0] == size
        reply = b""
        while b"}" not in reply:
            piece = sock.recv(65536)
            assert piece
            reply += piece
    assert b"HTTP/1.1 200 " in reply
    assert _json(reply.partition(b"\r\n\r\n")[2])["body_length"] == size

    # A client that does not read holds back a 64 MiB download at the backend.
    with socket.create_connection(("127.0.0.1", p.port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big?mb=64 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(1.0)
        with a._lock:
            assert a.progress < size // 2
        received = len(_read_until_length(sock, size, 60).partition(b"\r\n\r\n")[2])
    assert received == size


def _split_responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Successive Content-Length framed responses as (head, body) pairs."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        found = re.search(rb"Content-Length: (\d+)", head)
        assert found is not None, head
        length = int(found.group(1))
        responses.append((head, rest[:length]))
        data = rest[length:]
    return responses


def _read_until_length(sock: socket.socket, body_size: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        head, sep, _ = bytes(data[:4096]).partition(b"\r\n\r\n")
        if sep and len(data) - len(head) - 4 >= body_size:
            return bytes(data)
        piece = sock.recv(1 << 20)
        if not piece:
            return bytes(data)
        data += piece


def test_pipelined_and_http10_requests(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    data = p.raw(
        b"GET /p1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /p2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /p3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    responses = _split_responses(data)
    assert [head.split(b" ")[1] for head, _ in responses] == [b"200"] * 3
    assert [_json(body)["path"] for _, body in responses] == ["/p1", "/p2", "/p3"]
    data = p.raw(b"GET /old HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert _json(body)["headers"]["Host"] == a.address


def test_expect_continue_is_answered_by_the_proxy(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"data")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert a.requests("PUT")[0].body == b"data"


def test_killed_backend_loses_no_get_and_comes_back(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    p = proxy([a, b])
    conn = p.connection()
    statuses = []
    for i in range(60):
        if i == 20:
            killed_at = len(p.lines)
            a.stop()
        conn.request("GET", f"/n/{i}")
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    assert statuses == [200] * 60
    p.wait_for(rf"backend {a.address} is down", timeout=2, start=killed_at)
    served_by_b = len(b.requests("GET"))
    assert served_by_b >= 40

    returned_at = len(p.lines)
    a.start()
    begin = time.monotonic()
    p.wait_for(rf"backend {a.address} is up", timeout=3, start=returned_at)
    assert time.monotonic() - begin < 2.5
    before = len(a.requests("GET"))
    for i in range(10):
        conn.request("GET", f"/back/{i}")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    conn.close()
    assert len(a.requests("GET")) - before == 5


def test_dead_backend_is_detected_by_health_checks_alone(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    # The default check timings, which promise detection within about a second.
    p = proxy([a, b], "--health-interval", "0.25", "--health-timeout", "0.5")
    mark = len(p.lines)
    begin = time.monotonic()
    a.stop()
    p.wait_for(rf"backend {a.address} is down", timeout=3, start=mark)
    assert time.monotonic() - begin < 1.5
    # An app that answers but reports itself unhealthy is taken out as well.
    mark = len(p.lines)
    b.healthy = False
    p.wait_for(rf"backend {b.address} is down", timeout=3, start=mark)
    status, body, response = p.get("/x")
    assert status == 503 and b"no backend" in body
    assert response.getheader("Content-Type", "").startswith("text/plain")


def test_all_down_answers_503_quickly(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    p = proxy([a, b], "--connect-timeout", "2")
    mark = len(p.lines)
    a.stop()
    b.stop()
    p.wait_for(rf"backend {a.address} is down", timeout=3, start=mark)
    p.wait_for(rf"backend {b.address} is down", timeout=3, start=mark)
    for _ in range(5):
        begin = time.monotonic()
        status, body, _ = p.get("/x")
        assert status == 503
        assert body == b"no backend is available\n"
        assert time.monotonic() - begin < 1.0


def test_post_is_never_sent_twice(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    a.cut_paths.add("/flaky")
    # Passive health would take A out after its cuts; this test is about retries.
    p = proxy([a, b], "--passive-fall", "0")
    post_statuses = []
    for i in range(6):
        conn = p.connection()
        conn.request("POST", "/flaky", body=f"payment {i}".encode())
        response = conn.getresponse()
        response.read()
        post_statuses.append(response.status)
        conn.close()
    posts = a.requests("POST", "/flaky") + b.requests("POST", "/flaky")
    # Every POST reached exactly one app, once, whatever its fate.
    assert sorted(s.body for s in posts) == sorted(f"payment {i}".encode() for i in range(6))
    assert post_statuses.count(502) == len(a.requests("POST", "/flaky")) >= 1
    assert post_statuses.count(200) == len(b.requests("POST", "/flaky"))

    # The same failure on a GET is retried on the other backend.
    for _ in range(4):
        status, body, _ = p.get("/flaky")
        assert status == 200 and _json(body)["backend"] == "B"
    assert len(a.requests("GET", "/flaky")) >= 1


def test_post_cut_on_every_backend_is_a_502_not_a_retry(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    a.cut_paths.add("/boom")
    b.cut_paths.add("/boom")
    p = proxy([a, b])
    conn = p.connection()
    conn.request("POST", "/boom", body=b"once")
    response = conn.getresponse()
    assert response.status == 502
    assert len(a.requests("POST") + b.requests("POST")) == 1
    status, _, _ = p.get("/boom")
    assert status == 502
    # A GET is tried on each backend once, then given up.
    assert len(a.requests("GET") + b.requests("GET")) == 2


def test_stale_pooled_connection_does_not_fail_a_get(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    a.stale = True
    p = proxy([a])
    for i in range(5):
        status, body, _ = p.get(f"/s/{i}")
        assert status == 200, body
    # Each reuse of a pooled connection was refused and the GET sent again.
    assert len(a.requests("GET")) == 9


def test_failure_after_the_response_started_closes_the_client(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    data = p.raw(b"GET /truncate HTTP/1.1\r\nHost: t\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100" in head
    assert body == b"0123456789"  # then the connection closed


def test_malformed_requests_get_400_and_close(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    for raw, status in [
        (smuggle, 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
    ]:
        data = p.raw(raw)
        assert data.startswith(b"HTTP/1.1 %d " % status), data[:100]
        assert b"Connection: close" in data.partition(b"\r\n\r\n")[0]
        assert data.count(b"HTTP/1.1") == 1
    assert a.requests() == []


def test_slow_request_head_gets_408(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a], "--header-timeout", "0.5", "--client-idle-timeout", "0.8")
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        begin = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        data = _read_until_closed(sock, 5)
        elapsed = time.monotonic() - begin
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 3
    # An idle keep-alive connection is closed without a word.
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        begin = time.monotonic()
        data = _read_until_closed(sock, 5)
        elapsed = time.monotonic() - begin
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head
    assert _json(body)["path"] == "/"
    assert 0.7 < elapsed < 3


def test_backend_read_timeout_gives_504(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a], "--read-timeout", "0.3")
    begin = time.monotonic()
    status, body, _ = p.get("/slow?s=1.5")
    assert status == 504 and body == b"gateway timeout\n"
    assert time.monotonic() - begin < 1.4
    # The 504 was not retried.
    assert len(a.requests("GET", "/slow?s=1.5")) == 1


def test_access_log_lines(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    conn = p.connection()
    conn.request(
        "GET", "/logged?q=1", headers={"User-Agent": "tab\there", "X-Forwarded-For": "10.9.8.7"}
    )
    conn.getresponse().read()
    conn.request("POST", "/logged", body=b"12345")
    conn.getresponse().read()
    conn.close()
    p.raw(b"GET / HTTP/1.1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        sock.sendall(b"GET /slow?s=1.0 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
    assert p.stop() == 0
    lines = p.access_log.read_bytes().splitlines()
    records = [parse_line(line) for line in lines]
    labels = ["time", "host", "forwardedfor", "method", "uri", "protocol", "status", "size",
              "reqsize", "referer", "reqtime", "apptime", "upstream", "cache", "route", "reqid",
              "ua"]  # fmt: skip
    assert all(list(r) == labels for r in records)
    get, post, bad, left = records
    assert get["method"] == b"GET" and get["uri"] == b"/logged?q=1"
    assert get["status"] == b"200" and get["protocol"] == b"HTTP/1.1"
    assert get["ua"] == b"tab\there" and b"\\t" in lines[0]
    assert get["forwardedfor"] == b"10.9.8.7" and get["host"] == b"127.0.0.1"
    assert get["upstream"] == a.address.encode()
    assert int(get["size"]) > 0 and float(get["reqtime"]) >= float(get["apptime"]) >= 0
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", get["time"])
    assert post["method"] == b"POST" and post["status"] == b"200"
    assert post["reqsize"] == b"5" and get["reqsize"] == b"0"
    assert get["route"] == b"default" and get["reqid"] != post["reqid"] != b"-"
    assert bad["status"] == b"400" and bad["upstream"] == b"-" and bad["apptime"] == b"-"
    # The client left before the slow answer: nginx's 499, and no waiting for the backend.
    assert left["status"] == b"499" and left["uri"] == b"/slow?s=1.0"
    assert float(left["reqtime"]) < 0.9


def test_sigterm_finishes_the_request_in_flight(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    idle = p.connection()
    idle.request("GET", "/warm")
    idle.getresponse().read()
    result: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            result["answer"] = p.get("/slow?s=1.0")[:2]
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    client = threading.Thread(target=slow_request)
    client.start()
    assert _wait(lambda: a.requests("GET", "/slow?s=1.0") != [], 5)
    begin = time.monotonic()
    p.process.send_signal(signal.SIGTERM)
    p.wait_for("stopping", timeout=5)
    # No longer accepting.
    assert _wait(lambda: _refused(p.port), 2)
    assert p.process.wait(15) == 0
    client.join(5)
    assert "error" not in result, result
    assert result["answer"][0] == 200
    assert time.monotonic() - begin < 5
    # The idle keep-alive connection was closed, not left hanging.
    with pytest.raises((http.client.HTTPException, OSError)):
        idle.request("GET", "/after")
        idle.getresponse().read()
    idle.close()


def test_sigint_on_an_idle_proxy_exits_0(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    assert p.stop(signal.SIGINT) == 0
    assert any("stopped" in line for line in p.lines)


def test_bad_arguments_and_busy_port_fail_clearly(backends: Any, tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "tiers.proxy", "--backend", "nonsense"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2
    assert b"HOST:PORT" in bad.stderr
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "tiers.proxy", "--listen", f"127.0.0.1:{port}",
             "--backend", "127.0.0.1:9"],
            capture_output=True,
            timeout=30,
            check=False,
        )  # fmt: skip
    assert busy.returncode == 1
    assert b"cannot listen on" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout(
        backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a], "--send-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big?mb=64 HTTP/1.1\r\nHost: t\r\n\r\n")
        # Read nothing: the proxy's buffers fill, then it must give up on us.
        def logged() -> list[dict[str, bytes]]:
            data = p.access_log.read_bytes() if p.access_log.exists() else b""
            return [r for r in map(parse_line, data.splitlines()) if r["uri"] == b"/big?mb=64"]

        assert _wait(lambda: bool(logged()), 10)
        (record,) = logged()
        assert float(record["reqtime"]) < 5  # dropped, not waiting for us forever
        assert 0 < int(record["size"]) < 64 << 20  # what went out before the drop
    status, _, _ = p.get("/still-serving")
    assert status == 200


def test_three_servers_one_killed_under_get_and_post_load(backends: Any, proxy: Any) -> None:
    a, b, c = backends(3)
    # The default health timings, which promise a dead server out within about a second.
    p = proxy([a, b, c], "--health-interval", "0.25", "--health-timeout", "0.5")
    failures: list[tuple[int, int]] = []
    post_statuses: dict[str, int] = {}
    killed_at = 0.0
    for i in range(150):
        if i == 40:
            mark = len(p.lines)
            killed_at = time.monotonic()
            b.stop()
        conn = p.connection()
        try:
            if i % 3 == 0:
                body = f"order {i}"
                conn.request("POST", "/orders", body=body.encode())
                response = conn.getresponse()
                response.read()
                post_statuses[body] = response.status
            else:
                conn.request("GET", f"/page/{i}")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures.append((i, response.status))
        finally:
            conn.close()
    assert failures == []
    p.wait_for(rf"backend {b.address} is down", timeout=3, start=mark)
    assert time.monotonic() - killed_at < 10  # sanity: the loop itself was quick
    # Every POST reached an app at most once; those that got 200 exactly once.
    seen = [s.body.decode() for backend in (a, b, c) for s in backend.requests("POST")]
    assert len(seen) == len(set(seen))
    assert all(seen.count(body) == 1 for body, status in post_statuses.items() if status == 200)
