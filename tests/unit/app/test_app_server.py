from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tiers.app.__main__ import parse_args
from tiers.app.server import NamedLogger, ServerOptions, gunicorn_settings, post_fork

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

ARGS = [
    "--name", "app1",
    "--bind", "127.0.0.1:8401",
    "--app", "bookmarks.app:app",
    "--pythonpath", "examples",
    "--pythonpath", "/srv/other",
    "--workers", "3",
    "--threads", "4",
    "--max-requests", "500",
    "--max-requests-jitter", "50",
    "--graceful-timeout", "7.5",
]  # fmt: skip


def test_parse_args_full_command_line() -> None:
    options = parse_args(ARGS)
    assert options == ServerOptions(
        name="app1",
        host="127.0.0.1",
        port=8401,
        app="bookmarks.app:app",
        pythonpath=(Path("examples"), Path("/srv/other")),
        workers=3,
        threads=4,
        max_requests=500,
        max_requests_jitter=50,
        graceful_timeout=7.5,
    )
    assert options.bind == "127.0.0.1:8401"


def test_parse_args_ipv6_bind() -> None:
    options = parse_args(["--name", "a", "--bind", "[::1]:9000", "--app", "m:app"])
    assert (options.host, options.port, options.bind) == ("::1", 9000, "[::1]:9000")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--bind", "8401"),
        ("--bind", "127.0.0.1:http"),
        ("--bind", "127.0.0.1:70000"),
        ("--name", "bad name"),
        ("--name", "-x"),
        ("--workers", "0"),
        ("--threads", "two"),
        ("--max-requests", "-1"),
        ("--graceful-timeout", "-1"),
        ("--graceful-timeout", "soon"),
    ],
)
def test_parse_args_rejects_bad_values(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {"--name": "app1", "--bind": "127.0.0.1:1", "--app": "m:app"}
    argv[flag] = value
    flat = [item for pair in argv.items() for item in pair]
    with pytest.raises(SystemExit) as info:
        parse_args(flat)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_gunicorn_settings() -> None:
    settings = gunicorn_settings(parse_args(ARGS))
    assert settings["bind"] == ["127.0.0.1:8401"]
    assert settings["worker_class"] == "gthread"
    assert (settings["workers"], settings["threads"]) == (3, 4)
    assert (settings["max_requests"], settings["max_requests_jitter"]) == (500, 50)
    # gunicorn wants whole seconds; a fraction rounds up, never down.
    assert settings["graceful_timeout"] == 8
    assert settings["keepalive"] >= 2
    assert settings["proc_name"] == "app1"
    assert settings["errorlog"] == "-"
    assert settings["post_fork"] is post_fork
    assert settings["logger_class"] is NamedLogger


def test_settings_are_accepted_by_gunicorn() -> None:
    from gunicorn.config import Config  # type: ignore[import-untyped]

    cfg = Config()
    for key, value in gunicorn_settings(parse_args(ARGS)).items():
        if key in cfg.settings:
            cfg.set(key, value)
    assert cfg.worker_class_str == "gthread"
    assert cfg.graceful_timeout == 8
    assert cfg.address == [("127.0.0.1", 8401)]


def test_named_logger_puts_the_name_on_each_line() -> None:
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("proc_name", "app7")
    cfg.set("errorlog", "-")
    log = NamedLogger(cfg)
    handler = next(h for h in log.error_log.handlers if getattr(h, "_gunicorn", False))
    assert handler.formatter is not None
    record = logging.LogRecord("gunicorn.error", logging.INFO, "x", 1, "hello", None, None)
    line = handler.formatter.format(record)
    assert f"[app7] [{os.getpid()}] [INFO] hello" in line


def _run_in_child(body: object) -> int:
    """Run ``body()`` in a forked child and return its exit status; this process stays as it was."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            code = body()  # type: ignore[operator]
        except SystemExit as exc:
            code = 80 + int(exc.code or 0)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@linux_only
def test_post_fork_keeps_a_worker_whose_master_lives() -> None:
    def body() -> int:
        worker = SimpleNamespace(ppid=os.getppid())
        post_fork(SimpleNamespace(log=logging.getLogger("t")), worker)
        # SIGTERM is back to its default action until the worker sets its own.
        return 0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 1

    assert _run_in_child(body) == 0


@linux_only
def test_post_fork_exits_if_the_master_is_already_gone() -> None:
    def body() -> int:
        worker = SimpleNamespace(ppid=os.getppid() + 100000)
        post_fork(SimpleNamespace(log=logging.getLogger("t")), worker)
        return 1

    assert _run_in_child(body) == 80


def _state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[0]


@linux_only
def test_parent_death_signal_kills_the_child_when_its_parent_dies() -> None:
    from tiers.app.server import set_parent_death_signal

    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - runs in the forked processes
        os.close(pid_r)
        ready_r, ready_w = os.pipe()
        grandchild = os.fork()
        if grandchild == 0:
            os.close(ready_r)
            set_parent_death_signal(signal.SIGTERM)
            os.write(ready_w, b"x")
            time.sleep(30)
            os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)  # the grandchild has asked for the signal
        os.write(pid_w, grandchild.to_bytes(4, "big"))
        os._exit(0)
    os.close(pid_w)
    data = os.read(pid_r, 4)
    os.close(pid_r)
    os.waitpid(middle, 0)
    grandchild = int.from_bytes(data, "big")
    try:
        deadline = time.monotonic() + 5
        while _state(grandchild) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(grandchild) in (None, "Z")
    finally:
        if _state(grandchild) not in (None, "Z"):
            os.kill(grandchild, signal.SIGKILL)
