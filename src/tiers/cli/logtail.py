"""Follow several log files at once and print their lines prefixed by service name."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

_COLOURS = ("36", "33", "32", "35", "34", "31")


def prefixer(names: Sequence[str], stream: TextIO) -> Callable[[str, str], None]:
    """A writer of ``name | line``, names padded to one width and coloured on a terminal."""
    width = max((len(n) for n in names), default=0)
    colour = stream.isatty()
    codes = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(names)}

    def write(name: str, line: str) -> None:
        label = f"{name:<{width}} |"
        if colour:
            label = f"\033[{codes.get(name, '0')}m{label}\033[0m"
        stream.write(f"{label} {line}\n")
        stream.flush()

    return write


def last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of a file (all of them when count is negative)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines if count < 0 else lines[-count:] if count else []


class Follower:
    """Polls files for appended lines (files may appear later or be recreated)."""

    def __init__(self, files: dict[str, Path], write: Callable[[str, str], None],
                 from_start: bool = False) -> None:
        self.files = files
        self.write = write
        self._offsets = {name: 0 if from_start else _size(path) for name, path in files.items()}
        self._partial = {name: b"" for name in files}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        for name, path in self.files.items():
            size = _size(path)
            if size < self._offsets[name]:  # truncated or replaced: start over
                self._offsets[name], self._partial[name] = 0, b""
            if size == self._offsets[name]:
                continue
            with open(path, "rb") as handle:
                handle.seek(self._offsets[name])
                chunk = handle.read(size - self._offsets[name])
            self._offsets[name] += len(chunk)
            *complete, rest = (self._partial[name] + chunk).split(b"\n")
            self._partial[name] = rest
            for line in complete:
                self.write(name, line.decode("utf-8", "replace"))

    def run(self, interval: float = 0.2) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(interval)
        self.poll()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, daemon=True, name="log-follower")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def stderr_prefixer(names: Sequence[str]) -> Callable[[str, str], None]:
    return prefixer(names, sys.stderr)
