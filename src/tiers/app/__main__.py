"""``python -m tiers.app``: run one app server (a gunicorn master) in this process.

    python -m tiers.app --name app1 --bind 127.0.0.1:8401 --app bookmarks.app:app \\
        --pythonpath examples --workers 2 --threads 1 \\
        --max-requests 1000 --max-requests-jitter 100 --graceful-timeout 10

See tiers.app.server for signals and exit statuses.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from tiers.app.loader import AppLoadError, load_app
from tiers.app.server import EXIT_APP_LOAD, ServerOptions, serve

_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


def _name(text: str) -> str:
    if not _NAME_RE.match(text):
        raise argparse.ArgumentTypeError("letters, digits, '_', '.', '-'; at most 63 characters")
    return text


def _address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < 86400:
        raise argparse.ArgumentTypeError("must be between 0 and 86400 seconds")
    return value


def parse_args(argv: Sequence[str] | None = None) -> ServerOptions:
    """Parse the command line into ServerOptions; argparse exits with status 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m tiers.app", description="Run one prefork app server."
    )
    parser.add_argument("--name", required=True, type=_name, help="server name, e.g. app1")
    parser.add_argument("--bind", required=True, type=_address, help="HOST:PORT to listen on")
    parser.add_argument("--app", required=True, help="WSGI app as module:attribute")
    parser.add_argument(
        "--pythonpath",
        action="append",
        default=[],
        type=Path,
        help="directory to put on sys.path before importing the app (repeatable)",
    )
    parser.add_argument("--workers", type=_at_least(1), default=2)
    parser.add_argument("--threads", type=_at_least(1), default=1, help="threads per worker")
    parser.add_argument(
        "--max-requests",
        type=_at_least(0),
        default=1000,
        help="recycle a worker after this many requests; 0 never",
    )
    parser.add_argument("--max-requests-jitter", type=_at_least(0), default=100)
    parser.add_argument("--graceful-timeout", type=_seconds, default=10.0, metavar="SECONDS")
    parser.add_argument("--keepalive", type=_seconds, default=5.0, metavar="SECONDS")
    parser.add_argument(
        "--timeout", type=_seconds, default=30.0, metavar="SECONDS", help="kill a stuck worker"
    )
    args = parser.parse_args(argv)
    host, port = args.bind
    return ServerOptions(
        name=args.name,
        host=host,
        port=port,
        app=args.app,
        pythonpath=tuple(args.pythonpath),
        workers=args.workers,
        threads=args.threads,
        max_requests=args.max_requests,
        max_requests_jitter=args.max_requests_jitter,
        graceful_timeout=args.graceful_timeout,
        keepalive=args.keepalive,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        wsgi_app = load_app(options.app, options.pythonpath)
    except AppLoadError as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, (ImportError, AttributeError)):
            # An exception raised while the module ran: its traceback is the clue.
            traceback.print_exception(cause, file=sys.stderr)
        print(f"tiers.app[{options.name}]: {exc}", file=sys.stderr)
        return EXIT_APP_LOAD
    serve(options, wsgi_app)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
