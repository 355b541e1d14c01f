# The C module built from _ltsv.c (see setup.py).

def format_line(
    when: bytes, host: bytes, forwardedfor: bytes | None, method: bytes, uri: bytes,
    protocol: bytes, status: int, size: int, reqsize: int, referer: bytes | None,
    reqtime: float, apptime: float | None, upstream: bytes | None, cache: bytes | None,
    route: bytes | None, reqid: bytes | None, ua: bytes | None, /,
) -> bytes: ...

def request_id(prefix: bytes, count: int, /) -> bytes: ...
