# The C module built from _heads.c (see setup.py).

def scan_request(
    data: bytes, start: int, max_head: int, max_line: int, max_fields: int, /
) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], list[bytes], int,
           bytes | None, bytes | None, bytes | None, bytes | None, bytes | None,
           bytes | None] | int: ...

def scan_response(
    data: bytes, max_fields: int, /
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]], list[bytes], int, int,
           bytes | None] | None: ...

def join_head(
    first: list[bytes], names: list[bytes], headers: list[tuple[bytes, bytes]],
    drop: frozenset[bytes], last: list[bytes], /,
) -> bytes: ...
