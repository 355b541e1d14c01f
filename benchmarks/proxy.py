"""The reverse proxy against nginx and HAProxy, side by side on this machine.

    .venv/bin/python benchmarks/proxy.py [--duration 10] [--connections 50]
        [--rounds 3] [--threads 2] [--warmup 1] [--skip-cache] [--no-compiled]

One backend (an nginx of its own, answering a fixed ~600-byte page from
memory) stands behind three front ends with equivalent settings: tiers'
proxy, nginx and HAProxy, each one worker process or thread, keep-alive to
the client and to the backend, X-Forwarded-For added, an access log line per
request written to a file. wrk loads each in turn, the order rotating every
round; the table gives medians over the rounds and the ratios tiers/peer.

tiers runs in two builds of the same sources, each from a copy in the
temporary directory: ``tiers``, the request path compiled by mypyc as
``pip install tiers`` and ``pip install .`` build it by default (about a
minute to build; needs mypy, which the bench extra installs;
``--no-compiled`` skips it), and ``tiers pure``, the Python sources (with the
C helpers) that an editable checkout or ``TIERS_COMPILE=0`` runs.

Two reference rows come with the first part: the backend loaded directly,
and ``_relay.py``, a uvloop byte relay with no HTTP work at all (no
parsing, routing or log): what the event loop and the kernel cost per
request here, under any Python proxy.

A second part loads a cacheable page (``Cache-Control: public, max-age=60``)
through nginx's proxy_cache, HAProxy's cache and tiers' page cache (on by
default); each must prove it answers from its cache first, otherwise that row
is skipped and the reason printed.

Exit status: 0 after a full run, 1 when a process fails or a check does not
hold, 2 when nginx, haproxy or wrk is missing or an argument is bad, 128+N
after signal N (Ctrl-C: 130). Every process started is stopped and the
temporary directory removed in every case.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import _harness as h
from _proxy_builds import compiled_copy, pure_copy, pythonpath_env

PACKAGES = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}

# The page every request gets: about 600 bytes, no quote, dollar or backslash
# so that it sits verbatim in nginx's return directive.
BODY = (
    "<!doctype html><html><head><meta charset=utf-8><title>tiers benchmark page</title>"
    "</head><body><h1>Bookmarks</h1><ul>"
    + "".join(
        f"<li><a href=/entry/{i}>entry {i}: a link someone saved for later</a></li>"
        for i in range(6)
    )
    + "</ul><p>A fixed page of about six hundred bytes, answered from memory.</p>"
    "</body></html>\n"
)
PLAIN_PATH = "/"
# Bytes relayed on uvloop with no HTTP work at all (_relay.py): the floor
# under any Python proxy here, so a proxy's own work per request shows.
RELAY = "uvloop relay (floor)"
CACHEABLE_PATH = "/cacheable"
HEALTH_PATH = "/_tiers/health"  # tiers' default; HAProxy checks the same path

# One LTSV line per request with the fields tiers writes, in every front end.
_NGINX_LTSV = (
    r"time:$time_iso8601\thost:$remote_addr\tforwardedfor:$http_x_forwarded_for"
    r"\tmethod:$request_method\turi:$request_uri\tprotocol:$server_protocol"
    r"\tstatus:$status\tsize:$body_bytes_sent\treqtime:$request_time"
    r"\tapptime:$upstream_response_time\tupstream:$upstream_addr\tua:$http_user_agent"
)
_HAPROXY_LTSV = (
    r"time:%tr\thost:%ci\tforwardedfor:%[capture.req.hdr(1)]\tmethod:%HM\turi:%HU"
    r"\tprotocol:%HV\tstatus:%ST\tsize:%B\treqtime:%Ta\tapptime:%Tr\tupstream:%si:%sp"
    r"\tua:%[capture.req.hdr(0)]"
)


# ---- configurations ---------------------------------------------------------


def _nginx_common(tmp: str, name: str) -> tuple[str, str]:
    # Running as root, nginx would hand its workers to "nobody", who cannot
    # write the temporary directory; keep them as the invoking user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    scratch = os.path.join(tmp, f"{name}-scratch")
    return (
        f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
""",
        scratch,
    )


def backend_conf(tmp: str, port: int) -> str:
    """The backend: a fixed page from memory, one nginx worker, no log."""
    head, scratch = _nginx_common(tmp, "backend")
    return f"""{head}
http {{
    client_body_temp_path {scratch}/client;
    proxy_temp_path {scratch}/proxy;
    fastcgi_temp_path {scratch}/fastcgi;
    uwsgi_temp_path {scratch}/uwsgi;
    scgi_temp_path {scratch}/scgi;
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    default_type text/html;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 '{BODY}'; }}
        location = {CACHEABLE_PATH} {{
            add_header Cache-Control "public, max-age=60";
            add_header X-Served-At $msec;
            return 200 '{BODY}';
        }}
    }}
}}
"""


def nginx_conf(tmp: str, port: int, cache_port: int, backend_port: int) -> str:
    """nginx as the proxy: one worker, pooled upstream keep-alive, buffered LTSV log."""
    head, scratch = _nginx_common(tmp, "nginx")
    proxy = """
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;"""
    return f"""{head}
http {{
    client_body_temp_path {scratch}/client;
    proxy_temp_path {scratch}/proxy;
    fastcgi_temp_path {scratch}/fastcgi;
    uwsgi_temp_path {scratch}/uwsgi;
    scgi_temp_path {scratch}/scgi;
    log_format ltsv '{_NGINX_LTSV}';
    access_log {tmp}/nginx-access.log ltsv buffer=64k flush=1s;
    keepalive_requests 10000000;
    keepalive_timeout 15s;
    proxy_cache_path {tmp}/nginx-cache levels=1:2 keys_zone=pages:1m max_size=16m
                     inactive=60s use_temp_path=off;
    upstream app {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{{proxy}
        }}
    }}
    server {{
        listen 127.0.0.1:{cache_port} backlog=4096;
        location / {{{proxy}
            proxy_cache pages;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"""


def haproxy_conf(port: int, cache_port: int, backend_port: int) -> str:
    """HAProxy as the proxy: one thread, connection reuse, LTSV log line to stdout."""
    frontend_common = """
    capture request header User-Agent len 128
    capture request header X-Forwarded-For len 64
    http-request set-header X-Forwarded-Proto http
    default_backend app"""
    return f"""global
    nbthread 1
    maxconn 4096
    log stdout format raw local0

defaults
    mode http
    log global
    log-format "{_HAPROXY_LTSV}"
    option http-keep-alive
    option dontlognull
    option forwardfor
    http-reuse always
    timeout connect 1s
    timeout client 15s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 15s

cache pages
    total-max-size 16
    max-age 60

frontend main
    bind 127.0.0.1:{port}{frontend_common}

frontend cached
    bind 127.0.0.1:{cache_port}{frontend_common}
    http-request cache-use pages
    http-response cache-store pages

backend app
    option httpchk GET {HEALTH_PATH}
    server app1 127.0.0.1:{backend_port} check inter 250ms fall 2 rise 2
"""


# ---- tiers ------------------------------------------------------------------


def tiers_help(python: str) -> str:
    """``python -m tiers.proxy --help``; exit 2 if tiers is not installed for ``python``."""
    try:
        out = subprocess.run(
            [python, "-m", "tiers.proxy", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: cannot run {python} -m tiers.proxy --help: {exc}", file=sys.stderr)
        sys.exit(h.EXIT_MISSING)
    if out.returncode != 0:
        print(
            f"error: {python} -m tiers.proxy --help failed; install the project first "
            f"(python3 -m venv .venv && .venv/bin/pip install -e .):\n{out.stderr}",
            file=sys.stderr,
        )
        sys.exit(h.EXIT_MISSING)
    return out.stdout


# ---- measuring --------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    path: str
    pid: int
    results: list[h.WrkResult] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


def check_page(target: Target) -> dict[str, str]:
    """The target answers 200 with the benchmark page; BenchmarkError otherwise."""
    status, headers, body = h.http_get(target.port, target.path)
    if status != 200 or body != BODY.encode():
        raise h.BenchmarkError(
            f"{target.name}: {target.url} answered {status} with {len(body)} bytes, "
            f"not 200 with the {len(BODY)}-byte page"
        )
    return headers


def check_cached(target: Target) -> None:
    """Two requests apart in time get the same X-Served-At: the second came from a cache."""
    first = check_page(target).get("x-served-at")
    time.sleep(0.05)
    second = check_page(target).get("x-served-at")
    if first is None or first != second:
        raise h.BenchmarkError(
            f"{target.name}: {target.url} is not served from a cache "
            f"(X-Served-At {first} then {second})"
        )


def run_rounds(
    children: h.Children, targets: Sequence[Target], args: argparse.Namespace, title: str
) -> None:
    """``args.rounds`` rounds over ``targets``, the order rotating, a warm-up before each run."""
    names = [t.name for t in targets]
    by_name = {t.name: t for t in targets}
    for r in range(args.rounds):
        for name in h.rotated(names, r):
            t = by_name[name]
            if args.warmup > 0:
                h.run_wrk(
                    children,
                    t.url,
                    duration=args.warmup,
                    connections=args.connections,
                    threads=args.threads,
                )
            res = h.run_wrk(
                children,
                t.url,
                duration=args.duration,
                connections=args.connections,
                threads=args.threads,
                measure_pid=t.pid,
            )
            t.results.append(res)
            cpu = res.cpu_us_per_request
            sys_share = res.cpu_sys_share
            print(
                f"  {title} round {r + 1}/{args.rounds}  {name:<22} {res.rps:>10.0f} req/s"
                f"  p50 {res.p50_ms:7.3f} ms  p99 {res.p99_ms:7.3f} ms"
                f"  cpu {cpu if cpu is not None else float('nan'):6.1f} us/req"
                f" ({sys_share if sys_share is not None else float('nan'):4.0%} sys)"
                + (
                    f"  ERRORS non-2xx {res.non_2xx} socket {res.socket_errors}"
                    if res.non_2xx or res.socket_errors
                    else ""
                ),
                file=sys.stderr,
                flush=True,
            )


def _med(t: Target, attr: str) -> float:
    values = [getattr(r, attr) for r in t.results if getattr(r, attr) is not None]
    return h.median(values) if values else float("nan")


def print_table(title: str, targets: Sequence[Target]) -> None:
    print(title)
    print(
        f"  {'target':<30}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'CPU us/req':>12}{'sys':>6}{'errors':>8}   req/s per round"
    )
    for t in targets:
        errors = sum(r.non_2xx + r.socket_errors for r in t.results)
        rounds = " ".join(f"{r.rps:.0f}" for r in t.results)
        print(
            f"  {t.name:<30}{_med(t, 'rps'):>10.0f}{_med(t, 'p50_ms'):>10.3f}"
            f"{_med(t, 'p99_ms'):>10.3f}{_med(t, 'cpu_us_per_request'):>12.1f}"
            f"{_med(t, 'cpu_sys_share'):>6.0%}{errors:>8}   {rounds}"
        )


def print_ratios(ours: Target, peers: Sequence[Target]) -> None:
    print(f"  {'ratio':<44}{'req/s':>10}{'p99':>10}{'CPU/req':>12}   req/s ratio per round")
    for peer in peers:
        label = f"{ours.name} / {peer.name}"
        # Within a round the two ran minutes apart at most: these ratios show
        # how far the machine's drift between rounds moves the medians' ratio.
        per_round = " ".join(f"{a.rps / b.rps:.2f}"
                             for a, b in zip(ours.results, peer.results, strict=True))
        print(
            f"  {label:<44}{_med(ours, 'rps') / _med(peer, 'rps'):>10.2f}"
            f"{_med(ours, 'p99_ms') / _med(peer, 'p99_ms'):>10.2f}"
            f"{_med(ours, 'cpu_us_per_request') / _med(peer, 'cpu_us_per_request'):>12.2f}"
            f"   {per_round}"
        )


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


# ---- the run ----------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/proxy.py",
        description="tiers' reverse proxy against nginx and HAProxy, in alternating rounds.",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--connections", type=int, default=50, help="wrk connections")
    p.add_argument("--rounds", type=int, default=3, help="rounds (each target once per round)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each run")
    p.add_argument("--skip-cache", action="store_true", help="skip the cached-page part")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip the compiled build (the installed default); "
                        "measure only the Python sources")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 600:
        p.error("--duration must be in (0, 600] seconds")
    if not 0 <= args.warmup <= 60:
        p.error("--warmup must be in [0, 60] seconds")
    if args.threads < 1 or args.connections < args.threads:
        p.error("need --threads >= 1 and --connections >= --threads")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


@dataclass
class Build:
    """One build of tiers: its name, the ``src/`` copy it runs from, and which it is."""

    name: str
    src: str
    compiled: bool

    @property
    def env(self) -> dict[str, str]:
        return pythonpath_env(self.src)


def prepare_builds(args: argparse.Namespace, tmp: str, python: str) -> list[Build]:
    """The installed build (compiled), then the Python sources (an editable checkout)."""
    builds = []
    if args.no_compiled:
        print("tiers (compiled): skipped (--no-compiled)")
    else:
        print("building the compiled proxy (mypyc, about a minute)...", file=sys.stderr,
              flush=True)
        src, why_not = compiled_copy(tmp, python)
        if src is None:
            print(f"tiers (compiled): skipped: {why_not}")
        else:
            builds.append(Build("tiers", src, compiled=True))
    src, why_not = pure_copy(tmp, python)
    if src is None:
        raise h.BenchmarkError(why_not)
    builds.append(Build("tiers pure", src, compiled=False))
    return builds


def start_tiers(children: h.Children, python: str, build: Build, *, name: str, port: int,
                backend_port: int, access_log: str) -> h.Child:
    """A tiers proxy of ``build``, listening; BenchmarkError if it runs the other build."""
    child = children.start(
        name,
        [python, "-m", "tiers.proxy", "--listen", f"127.0.0.1:{port}",
         "--backend", f"127.0.0.1:{backend_port}", "--access-log", access_log],
        env=build.env,
    )
    children.wait_listening(child, port)
    deadline = time.monotonic() + 5
    while True:
        log = children.log_tail(child, 50)
        if "request path: " in log:
            break
        if time.monotonic() > deadline:
            raise h.BenchmarkError(f"{name}: no 'request path' line in its log:\n{log}")
        time.sleep(0.05)
    if ("request path: compiled" in log) != build.compiled:
        raise h.BenchmarkError(f"{name} does not run the {build.name} build:\n{log}")
    if "C helpers: head scanner, log line" not in log:
        raise h.BenchmarkError(f"{name} runs without its C helpers:\n{log}")
    return child


def own_cpu(python: str, build: Build) -> str:
    """``_proxy_cpu.py``'s line for ``build``: its own Python code per request, no I/O."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_proxy_cpu.py")
    out = subprocess.run([python, script], env=build.env, capture_output=True, text=True,
                         check=False)
    lines = (out.stdout.strip() or out.stderr.strip()).splitlines()
    return lines[-1] if lines else "no output"


def run(args: argparse.Namespace, tmp: str, children: h.Children) -> None:
    python = sys.executable
    tiers_help(python)  # fails early and clearly when tiers is not installed
    (
        backend_port,
        nginx_port,
        nginx_cache_port,
        haproxy_port,
        haproxy_cache_port,
        relay_port,
        *tiers_ports,
    ) = h.free_ports(10)
    builds = prepare_builds(args, tmp, python)

    # The backend, and a check that it is far faster than any front end needs.
    conf = os.path.join(tmp, "backend.conf")
    with open(conf, "w") as f:
        f.write(backend_conf(tmp, backend_port))
    os.makedirs(os.path.join(tmp, "backend-scratch"))
    backend = children.start(
        "backend", ["nginx", "-p", tmp, "-c", conf, "-e", f"{tmp}/backend-error.log"]
    )
    children.wait_listening(backend, backend_port)

    tiers_logs = {}
    tiers_targets = []
    for i, build in enumerate(builds):
        tiers_logs[build.name] = os.path.join(tmp, f"{build.name.replace(' ', '-')}-access.log")
        child = start_tiers(children, python, build, name=build.name.replace(" ", "-"),
                            port=tiers_ports[2 * i], backend_port=backend_port,
                            access_log=tiers_logs[build.name])
        tiers_targets.append((Target(build.name, tiers_ports[2 * i], PLAIN_PATH,
                                     child.proc.pid), child))
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_conf(tmp, nginx_port, nginx_cache_port, backend_port))
    os.makedirs(os.path.join(tmp, "nginx-scratch"))
    nginx = children.start(
        "nginx", ["nginx", "-p", tmp, "-c", conf, "-e", f"{tmp}/nginx-error.log"]
    )
    conf = os.path.join(tmp, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(haproxy_conf(haproxy_port, haproxy_cache_port, backend_port))
    haproxy_log = os.path.join(tmp, "haproxy-access.log")
    haproxy = children.start("haproxy", ["haproxy", "-db", "-f", conf], stdout_path=haproxy_log)
    for child, port in ((nginx, nginx_port), (haproxy, haproxy_port)):
        children.wait_listening(child, port)

    relay = children.start(
        "relay",
        [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_relay.py"),
         str(relay_port), str(backend_port)],
    )
    children.wait_listening(relay, relay_port)

    peers = [
        Target("nginx", nginx_port, PLAIN_PATH, nginx.proc.pid),
        Target("haproxy", haproxy_port, PLAIN_PATH, haproxy.proc.pid),
    ]
    targets = [
        *(t for t, _ in tiers_targets),
        *peers,
        Target("backend (direct)", backend_port, PLAIN_PATH, backend.proc.pid),
        Target(RELAY, relay_port, PLAIN_PATH, relay.proc.pid),
    ]
    for t in targets:
        check_page(t)

    print(h.machine_summary())
    print(
        f"tiers {importlib.metadata.version('tiers')} on Python {platform.python_version()}, "
        f"uvloop {importlib.metadata.version('uvloop')}, "
        f"httptools {importlib.metadata.version('httptools')}; "
        f"{_version(['nginx', '-v'])}; {_version(['haproxy', '-v'])}; {_version(['wrk', '-v'])}"
    )
    print(
        f"load: wrk --latency -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
        f"{args.warmup:g} s warm-up before each run, {args.rounds} rounds, order rotating; "
        f"page {len(BODY)} bytes"
    )
    print(file=sys.stdout, flush=True)

    run_rounds(children, targets, args, "proxy")
    print()
    print_table(
        f"Proxy in front of one backend: median of {args.rounds} rounds "
        "(1 worker each, keep-alive both sides, access log on)",
        targets,
    )
    for t, _ in tiers_targets:
        print_ratios(t, peers)
    print(
        "  access log lines: "
        + ", ".join(
            f"{name} {_count_lines(path)}"
            for name, path in (
                *tiers_logs.items(),
                ("nginx", os.path.join(tmp, "nginx-access.log")),
                ("haproxy", haproxy_log),
            )
        )
    )
    print(flush=True)

    if args.skip_cache:
        print("Cached page: skipped (--skip-cache)")
    else:
        # The cached runs do not need the uncached front ends' idle processes.
        for _, child in tiers_targets:
            children.stop(child)
        run_cached(args, tmp, children, python, builds=builds, tiers_ports=tiers_ports,
                   backend_port=backend_port, peers=[
                       Target("nginx proxy_cache", nginx_cache_port, CACHEABLE_PATH,
                              nginx.proc.pid),
                       Target("haproxy cache", haproxy_cache_port, CACHEABLE_PATH,
                              haproxy.proc.pid),
                   ])
    for build in builds:
        print(f"{build.name}: {own_cpu(python, build)} (benchmarks/_proxy_cpu.py)")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run_cached(args: argparse.Namespace, tmp: str, children: h.Children, python: str, *,
               builds: Sequence[Build], tiers_ports: Sequence[int], backend_port: int,
               peers: Sequence[Target]) -> None:
    """The cached page through each front end's cache (tiers' page cache is on by default)."""
    ours = []
    for i, build in enumerate(builds):
        name = f"{build.name} page cache"
        port = tiers_ports[2 * i + 1]
        child = start_tiers(children, python, build, name=name.replace(" ", "-"), port=port,
                            backend_port=backend_port,
                            access_log=os.path.join(tmp, f"{name.replace(' ', '-')}.log"))
        ours.append(Target(name, port, CACHEABLE_PATH, child.proc.pid))
    # Measuring an uncached front end here would be a false row: each must
    # prove it answers from its cache.
    for t in [*ours, *peers]:
        check_cached(t)
    run_rounds(children, [*ours, *peers], args, "cache")
    print()
    print_table(
        f"Cached page ({CACHEABLE_PATH}, Cache-Control: public, max-age=60): "
        f"median of {args.rounds} rounds",
        [*ours, *peers],
    )
    for t in ours:
        print_ratios(t, peers)
    print(flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    h.require_commands(PACKAGES)
    h.exit_on_signals()
    tmp = tempfile.mkdtemp(prefix="tiers-bench-proxy-")
    try:
        with h.Children(tmp) as children:
            run(args, tmp, children)
        return 0
    except h.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
