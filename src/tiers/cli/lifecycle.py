"""``tiers up``, ``tiers down`` and the detached supervisor behind ``up -d``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import click

from tiers.cli.context import EXIT_FAILURE, Context, handles_errors
from tiers.cli.logtail import Follower, last_lines, stderr_prefixer
from tiers.config import Topology
from tiers.errors import ServiceError, StateError
from tiers.supervisor.control import ControlServer
from tiers.supervisor.database import PrimaryWatch
from tiers.supervisor.plan import Phase, Plan, Service
from tiers.supervisor.runner import Runner, say_stderr
from tiers.supervisor.stack import Stack, busy_ports
from tiers.supervisor.statedir import StateDir, process_alive, stop_orphans

# How long `up -d` waits for a whole fresh stack (initdb and base backups included).
DETACHED_START_TIMEOUT = 300.0


def _runner_for(topology: Topology, state: StateDir) -> tuple[Runner, Stack]:
    stack = Stack(topology, state.path, say=say_stderr)
    specs = stack.specs()
    plan = Plan([Service(s.name, s.depends) for s in specs], topology.supervisor)

    def switchover(request: Mapping[str, Any]) -> str:
        target = request.get("to")
        nodes = stack.cluster_of(target) if isinstance(target, str) else stack.database
        return nodes.switchover(target)

    control = ControlServer(state.path, {"switchover": switchover}, say_stderr)
    return Runner(specs, plan, state, control=control.poll), stack


def _run(runner: Runner, stack: Stack) -> Phase:
    """Run the stack until it stops, with the watch on the primary that failover needs."""
    watches = [PrimaryWatch(nodes, runner.is_ready, runner.request_kill)
               for nodes in stack.databases]
    for watch in watches:
        watch.start()
    try:
        return runner.run()
    finally:
        for watch in watches:
            watch.stop()


def _check_can_start(ctx: Context, topology: Topology) -> None:
    if ctx.state.is_locked():
        pid = ctx.state.supervisor_pid()
        raise StateError(f"a stack is already running in {ctx.state.path} (supervisor pid {pid}); "
                         f"use 'tiers status' to see it or 'tiers down' to stop it")
    stop_orphans(ctx.state)
    busy = busy_ports(topology)
    if busy:
        raise ServiceError(f"cannot start: already in use: {', '.join(busy)} "
                           f"(change the ports in {topology.source})")


@click.command()
@click.option("-d", "--detach", is_flag=True, help="Return once all services are ready.")
@click.pass_obj
@handles_errors
def up(ctx: Context, detach: bool) -> None:
    """Start every service in dependency order and wait until each is ready.

    In the foreground, logs stream prefixed by service name and Ctrl-C stops
    the stack in reverse order. With -d a background supervisor keeps it running.
    """
    topology = ctx.topology()
    _check_can_start(ctx, topology)
    if detach:
        _up_detached(ctx, topology)
        return
    state = ctx.state
    state.acquire()
    try:
        runner, stack = _runner_for(topology, state)
        names = list(runner.specs)
        follower = Follower({n: state.log_path(n) for n in names}, stderr_prefixer(names))
        follower.start()
        runner.install_signal_handlers()
        try:
            phase = _run(runner, stack)
        finally:
            follower.stop()
    finally:
        state.release()
    if phase is Phase.FAILED:
        sys.exit(EXIT_FAILURE)


def _up_detached(ctx: Context, topology: Topology) -> None:
    state = ctx.state
    state.create()
    command = [sys.executable, "-m", "tiers", "--state-dir", str(state.path)]
    if ctx.topology_file is not None:
        command += ["--file", str(ctx.topology_file.absolute())]
    command.append("supervise")
    log_path = state.log_path("supervisor")
    with open(log_path, "ab") as log:
        supervisor = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
    click.echo(f"tiers: supervisor started (pid {supervisor.pid}); waiting for services")
    deadline = time.monotonic() + DETACHED_START_TIMEOUT
    while time.monotonic() < deadline:
        code = supervisor.poll()
        status = state.read_status()
        mine = status is not None and status.get("supervisor_pid") == supervisor.pid
        if mine and status is not None and status.get("phase") == Phase.RUNNING.value:
            from tiers.cli.inspect import print_status

            print_status(state, topology, as_json=False)
            return
        if code is not None:
            tail = "\n".join(last_lines(log_path, 15))
            raise ServiceError(f"the stack did not start (supervisor exited with {code}); "
                               f"last lines of {log_path}:\n{tail}")
        time.sleep(0.2)
    os.kill(supervisor.pid, signal.SIGTERM)
    raise ServiceError(f"the stack was not ready within {DETACHED_START_TIMEOUT:.0f}s; "
                       f"stopping it; see {log_path}")


@click.command(hidden=True)
@click.pass_obj
@handles_errors
def supervise(ctx: Context) -> None:
    """The background supervisor of ``up -d`` (not for direct use)."""
    topology = ctx.topology()
    state = ctx.state
    state.acquire()
    try:
        runner, stack = _runner_for(topology, state)
        runner.install_signal_handlers()
        phase = _run(runner, stack)
    finally:
        state.release()
    if phase is Phase.FAILED:
        sys.exit(EXIT_FAILURE)


@click.command()
@click.option("--timeout", default=120.0, show_default=True,
              help="Seconds to wait for a graceful stop before killing what is left.")
@click.pass_obj
@handles_errors
def down(ctx: Context, timeout: float) -> None:
    """Stop the stack of this state directory; return once every process is gone."""
    state = ctx.state
    if not state.is_locked():
        stopped = stop_orphans(state)
        click.echo(f"tiers: no stack is running in {state.path}"
                   + (f" (stopped {stopped} leftover processes)" if stopped else ""))
        return
    pid = state.supervisor_pid()
    if pid is None:
        raise StateError(f"cannot tell which process holds {state.lock_path}")
    click.echo(f"tiers: stopping the stack (supervisor pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while state.is_locked() and time.monotonic() < deadline:
        time.sleep(0.1)
    if state.is_locked():
        click.echo(f"tiers: supervisor did not stop within {timeout:g}s; killing", err=True)
        os.kill(pid, signal.SIGKILL)
        while state.is_locked():
            time.sleep(0.05)
    # The lock goes a moment before the supervisor process itself is gone.
    _wait_exit(pid, 10.0)
    stop_orphans(state)
    click.echo("tiers: stopped")


@click.command()
@click.pass_obj
@handles_errors
def reload(ctx: Context) -> None:
    """Apply the topology file's proxy policy (routes, pools, limits, cache) without a restart.

    The file is checked first; a bad one changes nothing. Changes to app servers,
    the database or listen addresses need `tiers down` and `tiers up`.
    """
    ctx.topology()  # a ConfigError names the file and key, and nothing is signalled
    status = ctx.state.read_status() if ctx.state.is_locked() else None
    proxy = next((s for s in (status or {}).get("services", []) if s.get("name") == "proxy"),
                 None)
    if proxy is None or not proxy.get("pid"):
        raise StateError(f"no running proxy in {ctx.state.path}")
    os.kill(proxy["pid"], signal.SIGHUP)
    click.echo(f"tiers: proxy (pid {proxy['pid']}) is reloading; see 'tiers logs proxy'")


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_alive(pid, None):
        time.sleep(0.02)


COMMANDS = (up, down, supervise, reload)
