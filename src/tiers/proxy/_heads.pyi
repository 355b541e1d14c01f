# The C module built from _heads.c (see setup.py).

def scan_request(
    data: bytes, start: int, stop: int, max_fields: int, /
) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], list[bytes],
           dict[bytes, list[bytes]]] | None: ...

def scan_response(
    data: bytes, max_fields: int, /
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]], list[bytes], int, int] | None: ...

def join_head(
    first: list[bytes], names: list[bytes], headers: list[tuple[bytes, bytes]],
    drop: frozenset[bytes], last: list[bytes], /,
) -> bytes: ...
