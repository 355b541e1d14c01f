"""What every benchmark script needs: commands, ports, child processes, wrk.

- ``require_commands`` stops the script with exit status 2, naming what is
  missing and the ``apt-get`` line that installs it.
- ``Children`` starts each process in its own session and, on ``close``,
  stops every one of them (SIGTERM, then SIGKILL of its whole process group
  after a grace period), newest first. Used as a context manager, it cleans
  up on success, on an error and on Ctrl-C alike; ``exit_on_signals`` turns
  SIGTERM and SIGHUP into the same path.
- ``run_wrk`` runs one bounded wrk load and parses its ``--latency`` report.

Only loopback addresses are ever used, and ports are the kernel's ephemeral ones.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

import psutil

EXIT_MISSING = 2

# Ports the other tiers of the project (and its peers) use on these machines:
# never bind them, even by chance.
_RESERVED_PORTS = frozenset({5432, 3306, 6379, 5672, 1883, 4222, 15432, 15433, *range(8400, 8410)})


class BenchmarkError(Exception):
    """A benchmark cannot go on; the message says why."""


def require_commands(packages: Mapping[str, str]) -> None:
    """Exit with status 2 unless every command (key) is on PATH; values are Debian packages."""
    missing = [command for command in packages if shutil.which(command) is None]
    if not missing:
        return
    names = " ".join(sorted({packages[c] for c in missing}))
    for command in missing:
        print(f"error: command not found: {command}", file=sys.stderr)
    print(f"install it with: apt-get update && apt-get install -y {names}", file=sys.stderr)
    sys.exit(EXIT_MISSING)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _RESERVED_PORTS:
            return port
    raise BenchmarkError("no free ephemeral port on 127.0.0.1")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind the stack like Ctrl-C, so cleanup runs.

    SIGINT gets Python's own handler back even where the parent ignored it.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: str
    stop_signal: int


class Children:
    """Child processes that are all gone once ``close`` returns."""

    def __init__(self, log_dir: str, grace: float = 5.0) -> None:
        self._log_dir = log_dir
        self._grace = grace
        self._children: list[Child] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout_path: str | None = None,
        stop_signal: int = signal.SIGTERM,
        env: Mapping[str, str] | None = None,
        popen_kwargs: Mapping[str, Any] | None = None,
    ) -> Child:
        """Start ``argv`` in a new session; stderr (and stdout unless redirected) to a log.

        ``popen_kwargs`` go to ``subprocess.Popen`` as they are (``cwd``, ``user``,
        ``group``, ...), e.g. to run a server as an unprivileged user.
        """
        log_path = os.path.join(self._log_dir, f"{name}.log")
        log_file: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        out_file: IO[bytes] = open(stdout_path, "ab") if stdout_path else log_file  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=log_file,
                start_new_session=True,
                env=None if env is None else dict(env),
                **dict(popen_kwargs or {}),
            )
        except OSError as exc:
            raise BenchmarkError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        finally:
            log_file.close()
            if out_file is not log_file:
                out_file.close()
        child = Child(name, proc, log_path, stop_signal)
        self._children.append(child)
        return child

    def log_tail(self, child: Child, lines: int = 15) -> str:
        try:
            with open(child.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_listening(self, child: Child, port: int, timeout: float = 15.0) -> None:
        """Return once 127.0.0.1:``port`` accepts; BenchmarkError if the child dies or is late."""
        deadline = time.monotonic() + timeout
        while True:
            if child.proc.poll() is not None:
                raise BenchmarkError(
                    f"{child.name} exited with status {child.proc.returncode} before "
                    f"listening on port {port}:\n{self.log_tail(child)}"
                )
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"{child.name} not listening on port {port} after {timeout:g} s:\n"
                    f"{self.log_tail(child)}"
                )
            time.sleep(0.05)

    def stop(self, child: Child) -> None:
        """Stop one child and its process group; returns when they are gone."""
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(child.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self._grace)
        # The group: an nginx worker may outlive its master for a moment.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=5)
        if child in self._children:
            self._children.remove(child)

    def close(self) -> None:
        """Stop every child, newest first; a second Ctrl-C cannot cut this short."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for child in reversed(list(self._children)):
                try:
                    self.stop(child)
                except Exception as exc:  # keep stopping the others
                    print(f"warning: stopping {child.name}: {exc}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of ``pid`` and all its descendants (0 if gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    user = system = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            user += t.user
            system += t.system
    return user, system


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One GET to 127.0.0.1:``port``: status, headers (lower-case names), body.

    BenchmarkError when no HTTP answer comes (refused, reset, malformed, timeout).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "tiers-benchmark-check"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except (OSError, http.client.HTTPException) as exc:
        raise BenchmarkError(f"GET http://127.0.0.1:{port}{path}: {exc!r}") from exc
    finally:
        conn.close()


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    cpu_us_per_request: float | None = None
    # The kernel's part of that CPU time (0..1): system calls, and on loopback
    # the receiving side's TCP work done in the sender's context.
    cpu_sys_share: float | None = None


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(output: str) -> WrkResult:
    """The numbers of a ``wrk --latency`` report; BenchmarkError if it has none."""
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    latencies = {
        m.group(1): float(m.group(2)) * _UNITS_MS[m.group(3)] for m in _LATENCY.finditer(output)
    }
    if rps is None or total is None or "50" not in latencies or "99" not in latencies:
        raise BenchmarkError(f"cannot read wrk's report:\n{output}")
    non_2xx = _NON_2XX.search(output)
    errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=latencies["50"],
        p99_ms=latencies["99"],
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def run_wrk(
    children: Children,
    url: str,
    *,
    duration: int,
    connections: int,
    threads: int,
    measure_pid: int | None = None,
    timeout: str = "2s",
) -> WrkResult:
    """One wrk run against ``url`` (loopback only), bounded by ``duration`` + a margin.

    With ``measure_pid``, the CPU time that process tree used during the run,
    per request, goes into the result, with the share spent in the kernel.
    """
    if not url.startswith("http://127.0.0.1:"):
        raise BenchmarkError(f"refusing to load anything but 127.0.0.1: {url}")
    argv = [
        "wrk",
        "--latency",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={timeout}",
        url,
    ]
    cpu_before = cpu_seconds(measure_pid) if measure_pid is not None else (0.0, 0.0)
    child = children.start("wrk", argv)
    try:
        child.proc.wait(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"wrk did not finish within {duration + 30:g} s") from None
    finally:
        children.stop(child)
    cpu_after = cpu_seconds(measure_pid) if measure_pid is not None else (0.0, 0.0)
    user_used = cpu_after[0] - cpu_before[0]
    sys_used = cpu_after[1] - cpu_before[1]
    with open(child.log_path, encoding="utf-8", errors="replace") as f:
        output = f.read()
    os.unlink(child.log_path)
    if child.proc.returncode != 0:
        raise BenchmarkError(f"wrk exited with status {child.proc.returncode}:\n{output}")
    result = parse_wrk(output)
    if measure_pid is not None and result.requests:
        used = user_used + sys_used
        result = WrkResult(
            **{
                **result.__dict__,
                "cpu_us_per_request": used / result.requests * 1e6,
                "cpu_sys_share": sys_used / used if used > 0 else 0.0,
            }
        )
    return result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` rotated left by ``by``: round r starts with the r-th item."""
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices`` ("all" or "both": every one)."""

    def parse(text: str) -> list[str]:
        if text in ("all", "both"):
            return list(choices)
        values = [part.strip() for part in text.split(",") if part.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return values

    return parse


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def say(text: str) -> None:
    """A progress line, to stderr (the tables go to stdout)."""
    print(text, file=sys.stderr, flush=True)


def machine_summary() -> str:
    """``machine: N CPUs (model), load average ... at start``."""
    cpu_model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return (f"machine: {os.cpu_count()} CPUs ({cpu_model}), load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
