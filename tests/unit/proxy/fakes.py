"""A transport for the proxy's protocols that does no I/O: it records what they write."""

from __future__ import annotations


class FakeTransport:
    """Records writes and a close as ``(name, data)`` in ``log``, which tests may share.

    ``fail`` makes the next writes raise, as a broken transport's do.
    """

    def __init__(self, name: str = "t", log: list[tuple[str, bytes]] | None = None) -> None:
        self.name = name
        self.log: list[tuple[str, bytes]] = [] if log is None else log
        self.closing = False
        self.fail = False

    def written(self) -> list[bytes]:
        """What was written to this transport, one item per write."""
        return [data for name, data in self.log if name == self.name and data != b"<close>"]

    def write(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("transport is broken")
        self.log.append((self.name, data))

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.log.append((self.name, b"<close>"))
        self.closing = True

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def can_write_eof(self) -> bool:
        return False
