"""Header rewriting and framing decisions between client and backend."""

from __future__ import annotations

from tiers.proxy.forward import (
    client_response_head,
    error_response,
    header_value,
    plan_response,
    upstream_request_head,
)
from tiers.proxy.requestparser import RequestHead, RequestParser
from tiers.proxy.responseparser import ResponseHead, ResponseParser


def _request(raw: bytes) -> RequestHead:
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, RequestHead)
    return head


def _response(raw: bytes, head_request: bool = False) -> ResponseHead:
    head = ResponseParser(head_request).feed(raw)[0]
    assert isinstance(head, ResponseHead)
    return head


def _fields(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    assert lines[-2:] == ["", ""]
    return [tuple(line.split(": ", 1)) for line in lines[1:-2]]  # type: ignore[misc]


def _names(head: bytes) -> list[str]:
    return [name.lower() for name, _ in _fields(head)]


def test_request_hop_by_hop_headers_are_dropped() -> None:
    head = _request(
        b"GET /p HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nUpgrade: websocket\r\nX-Kept: k\r\n\r\n"
    )
    out = upstream_request_head(head, b"10.1.2.3", b"backend:1")
    assert out.startswith(b"GET /p HTTP/1.1\r\nHost: a.test\r\n")
    names = _names(out)
    for dropped in ("connection", "x-secret", "keep-alive", "proxy-connection", "te", "trailer"):
        assert dropped not in names
    assert "upgrade" not in names
    assert ("X-Kept", "k") in _fields(out)


def test_x_forwarded_for_is_appended_and_proto_set() -> None:
    head = _request(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\n"
        b"X-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: https\r\n\r\n"
    )
    fields = _fields(upstream_request_head(head, b"10.0.0.9", b"b:1"))
    assert [v for n, v in fields if n == "X-Forwarded-For"] == ["1.1.1.1, 2.2.2.2, 10.0.0.9"]
    # The client does not get to claim https.
    assert [v for n, v in fields if n == "X-Forwarded-Proto"] == ["http"]


def test_x_forwarded_for_is_created() -> None:
    fields = _fields(
        upstream_request_head(_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), b"::1", b"b:1")
    )
    assert ("X-Forwarded-For", "::1") in fields


def test_body_framing_to_backend() -> None:
    chunked = _request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    fields = _fields(upstream_request_head(chunked, b"1", b"b"))
    assert ("Transfer-Encoding", "chunked") in fields
    assert "content-length" not in [n.lower() for n, _ in fields]
    sized = _request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert ("Content-Length", "0") in _fields(upstream_request_head(sized, b"1", b"b"))
    bodiless = _request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    names = _names(upstream_request_head(bodiless, b"1", b"b"))
    assert "content-length" not in names and "transfer-encoding" not in names


def test_expect_is_not_forwarded_and_http10_gets_a_host() -> None:
    head = _request(
        b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    )
    assert "expect" not in _names(upstream_request_head(head, b"1", b"b"))
    old = _request(b"GET / HTTP/1.0\r\n\r\n")
    out = upstream_request_head(old, b"1", b"127.0.0.1:8401")
    assert out.startswith(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8401\r\n")


def test_response_hop_by_hop_headers_are_dropped() -> None:
    request = _request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    response = _response(
        b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: x\r\nTrailer: X-T\r\nUpgrade: y\r\nSet-Cookie: a=b\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    plan = plan_response(request, response, request_body_done=True, stopping=False)
    out = client_response_head(response, plan, request)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    names = _names(out)
    for dropped in (
        "connection",
        "x-internal",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
    ):
        assert dropped not in names
    assert ("Set-Cookie", "a=b") in _fields(out)
    assert ("Content-Length", "2") in _fields(out)


def test_unknown_length_body_is_rechunked_for_http11_clients() -> None:
    request = _request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    response = _response(b"HTTP/1.1 200 OK\r\n\r\n")  # close-delimited
    plan = plan_response(request, response, request_body_done=True, stopping=False)
    assert plan.chunked and plan.keep_alive
    assert ("Transfer-Encoding", "chunked") in _fields(
        client_response_head(response, plan, request)
    )


def test_unknown_length_body_closes_an_http10_client() -> None:
    request = _request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response = _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    plan = plan_response(request, response, request_body_done=True, stopping=False)
    assert not plan.chunked and not plan.keep_alive
    fields = _fields(client_response_head(response, plan, request))
    assert ("Connection", "close") in fields
    assert "transfer-encoding" not in [n.lower() for n, _ in fields]


def test_http10_keep_alive_is_confirmed() -> None:
    request = _request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    plan = plan_response(request, response, request_body_done=True, stopping=False)
    assert plan.keep_alive
    assert ("Connection", "keep-alive") in _fields(client_response_head(response, plan, request))


def test_keep_alive_is_refused_when_body_unread_stopping_or_client_closes() -> None:
    request = _request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n")
    response = _response(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert not plan_response(request, response, request_body_done=False, stopping=False).keep_alive
    assert not plan_response(request, response, request_body_done=True, stopping=True).keep_alive
    assert plan_response(request, response, request_body_done=True, stopping=False).keep_alive
    closing = _request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not plan_response(closing, response, request_body_done=True, stopping=False).keep_alive


def test_head_response_keeps_content_length_and_has_no_body() -> None:
    request = _request(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    response = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", head_request=True)
    plan = plan_response(request, response, request_body_done=True, stopping=False)
    assert not plan.has_body and not plan.chunked
    assert ("Content-Length", "1234") in _fields(client_response_head(response, plan, request))


def test_error_response() -> None:
    out = error_response(503, "no backend is available", keep_alive=False)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert body == b"no backend is available\n"
    assert b"Content-Length: 24" in head and b"Connection: close" in head
    kept = error_response(502, "bad gateway", keep_alive=True, head_only=True)
    assert b"Connection" not in kept and kept.endswith(b"\r\n\r\n")


def test_header_value_is_the_first_of_that_name_in_any_case() -> None:
    head = _request(
        b"GET / HTTP/1.1\r\nHost: a\r\nReferrer: typo\r\nX-Refer: n\r\n"
        b"REFERER: http://first/\r\nReferer: http://second/\r\n\r\n"
    )
    assert header_value(head, b"referer") == b"http://first/"
    assert header_value(head, b"x-refer") == b"n"
    assert header_value(head, b"cookie") is None


def test_plan_for_each_kind_of_body_and_connection_state() -> None:
    request = _request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    responses = {
        "sized": _response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
        "chunked": _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        "empty": _response(b"HTTP/1.1 204 No Content\r\n\r\n"),
    }
    for name, response in responses.items():
        for done in (False, True):
            for stopping in (False, True):
                plan = plan_response(request, response, request_body_done=done, stopping=stopping)
                assert plan.chunked is (name == "chunked")
                assert plan.has_body is (name != "empty")
                assert plan.keep_alive is (done and not stopping)


def test_heads_made_by_hand_without_lowered_names_are_rewritten_alike() -> None:
    request = _request(b"GET /p HTTP/1.1\r\nHost: a.test\r\nConnection: X-Hop\r\n"
                       b"X-Hop: 1\r\nX-Kept: 2\r\n\r\n")
    assert list(request.names) == [b"host", b"connection", b"x-hop", b"x-kept"]
    bare = request.changed(names=())
    assert upstream_request_head(request, b"10.0.0.1", b"b:1") == upstream_request_head(
        bare, b"10.0.0.1", b"b:1")
    response = _response(b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n"
                         b"Content-Length: 0\r\n\r\n")
    assert list(response.names) == [b"connection", b"x-hop", b"x-kept", b"content-length"]
    plan = plan_response(request, response, request_body_done=True, stopping=False)
    bare_response = ResponseHead(response.status, response.reason, response.version,
                                 response.headers, response.framing, response.content_length,
                                 response.keep_alive, response.connection)
    made = client_response_head(bare_response, plan, request)
    assert made == client_response_head(response, plan, request)
    assert "x-hop" not in _names(made) and "x-kept" in _names(made)


def test_an_extra_field_of_the_proxy_ends_the_response_head() -> None:
    request = _request(b"GET /p HTTP/1.1\r\nHost: a.test\r\n\r\n")
    response = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    plan = plan_response(request, response, request_body_done=True, stopping=False)
    head = client_response_head(response, plan, request, b"X-Cache: MISS")
    assert _fields(head)[-1] == ("X-Cache", "MISS")


def test_the_referer_is_kept_for_the_access_log() -> None:
    head = _request(b"GET /p HTTP/1.1\r\nHost: a.test\r\nReferer: http://x.test/\r\n"
                    b"Referer: http://y.test/\r\n\r\n")
    assert head.referer == b"http://x.test/" == header_value(head, b"referer")
