"""``tiers status``, ``tiers cache status`` and ``tiers logs``: read what the supervisor
records and what the services say of themselves, change nothing.

Cache nodes are asked for memcached's ``stats`` (each within a second): the
node's own items, hits, misses, evictions and memory, whichever engine runs
it. A node that does not answer shows the error instead.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import click
import psycopg

from tiers.cache.client import Client
from tiers.cache.errors import CacheError
from tiers.cli.context import Context, handles_errors
from tiers.cli.logtail import Follower, last_lines, prefixer
from tiers.config import Topology
from tiers.db import embedded
from tiers.supervisor.plan import Phase
from tiers.supervisor.statedir import StateDir

_COLUMNS = ("NAME", "ROLE", "PID", "ADDRESS", "STATE", "RESTARTS", "DETAIL")


def collect_status(state: StateDir, topology: Topology) -> dict[str, Any]:
    """The stack as recorded by its supervisor, plus live replication state."""
    running = state.is_locked()
    recorded = state.read_status() or {}
    services: list[dict[str, Any]] = recorded.get("services", [])
    if not running:
        for entry in services:
            entry.update(state="stopped", pid=None)
    else:
        _add_replication(services, topology, state)
        _add_cache_stats(services)
    return {
        "state_dir": str(state.path),
        "running": running,
        "supervisor_pid": recorded.get("supervisor_pid") if running else None,
        "phase": recorded.get("phase", Phase.STOPPED.value) if running else Phase.STOPPED.value,
        "services": [{k: v for k, v in e.items() if k != "pid_created"} for e in services],
    }


# What `tiers status` shows of a node's own `stats`, all integers in memcached.
CACHE_STATS = ("curr_items", "get_hits", "get_misses", "evictions", "bytes", "limit_maxbytes")
_STATS_TIMEOUT = 1.0


def cache_node_stats(address: str) -> dict[str, Any]:
    """The node's own counters (``CACHE_STATS``), or ``{"error": reason}`` if it cannot say."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    try:
        with Client(host, int(port), connect_timeout=_STATS_TIMEOUT,
                    timeout=_STATS_TIMEOUT) as client:
            reported = client.stats()
    except (CacheError, ValueError) as exc:
        return {"error": str(exc)}
    found: dict[str, Any] = {}
    for name in CACHE_STATS:
        try:
            found[name] = int(reported[name])
        except (KeyError, ValueError):
            found[name] = None
    return found


def _add_cache_stats(services: list[dict[str, Any]]) -> None:
    for entry in services:
        if entry.get("role") == "cache" and entry.get("state") not in ("stopped", "failed"):
            entry["cache"] = cache_node_stats(entry["address"])


def _cache_detail(stats: dict[str, Any]) -> str:
    if "error" in stats:
        return f"stats: {stats['error']}"

    def shown(name: str) -> str:
        value = stats.get(name)
        return "?" if value is None else str(value)

    memory = f"{_megabytes(stats.get('bytes'))} of {_megabytes(stats.get('limit_maxbytes'))} MB"
    return (f"items {shown('curr_items')}, hits {shown('get_hits')}, "
            f"misses {shown('get_misses')}, evictions {shown('evictions')}, {memory}")


def _megabytes(value: int | None) -> str:
    return "?" if value is None else f"{value / 1048576:.1f}"


def _add_replication(services: list[dict[str, Any]], topology: Topology,
                     state: StateDir) -> None:
    """Each database node's live role, and its WAL stream as its live primary reports it."""
    entries = {e["name"]: e for e in services if e.get("role") in ("primary", "replica")}
    if not entries:
        return
    from tiers.cli.db import node_report
    from tiers.supervisor.stack import Stack

    for nodes in Stack(topology, state.path).databases:
        report = node_report(nodes)
        for node in report:
            entry = entries.get(node["name"])
            if entry is not None:
                # Roles move with failover; the supervisor records what each node was made.
                entry["role"] = node["recorded_role"] if node["role"] == "down" else node["role"]
                entry["fenced"] = node["fenced"]
        primary = next((n for n in report if n["role"] == "primary"), None)
        replicas = [entries[n["name"]] for n in report
                    if n["name"] in entries and entries[n["name"]]["role"] == "replica"]
        _add_streams(replicas, None if primary is None else nodes.ports[primary["name"]])


def _add_streams(replicas: list[dict[str, Any]], primary_port: int | None) -> None:
    """What the primary on ``primary_port`` says of each replica (pg_stat_replication)."""
    if not replicas:
        return
    if primary_port is None:
        for entry in replicas:
            entry["replication"] = {"state": "unknown", "error": "no primary is answering"}
        return
    streams: dict[str, dict[str, Any]] = {}
    try:
        with psycopg.connect(embedded.conninfo(primary_port, "postgres"),
                             connect_timeout=2, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name, state, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
                "FROM pg_stat_replication").fetchall()
        for name, stream_state, lag in rows:
            streams[name] = {"state": stream_state, "replay_lag_bytes": lag}
    except psycopg.Error as exc:
        for entry in replicas:
            entry["replication"] = {"state": "unknown", "error": str(exc).strip()}
        return
    for entry in replicas:
        entry["replication"] = streams.get(entry["name"], {"state": "not connected"})


def print_status(state: StateDir, topology: Topology, *, as_json: bool) -> None:
    status = collect_status(state, topology)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    if not status["running"]:
        click.echo(f"no stack is running in {status['state_dir']}")
        if not status["services"]:
            return
    else:
        click.echo(f"stack in {status['state_dir']}: {status['phase']} "
                   f"(supervisor pid {status['supervisor_pid']})")
    rows = [_COLUMNS]
    for entry in status["services"]:
        detail = entry.get("last_error") or ""
        stream = entry.get("replication")
        if stream:
            lag = stream.get("replay_lag_bytes")
            detail = f"replication {stream['state']}" + (f", lag {lag} B" if lag is not None
                                                          else "")
        if entry.get("fenced"):
            detail = "fenced" + (f"; {detail}" if detail else "")
        if entry.get("cache") and not detail:
            detail = _cache_detail(entry["cache"])
        rows.append((entry["name"], entry["role"], str(entry.get("pid") or "-"),
                     entry["address"], entry["state"], str(entry["restarts"]), detail))
    _print_rows(rows)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@handles_errors
def status(ctx: Context, as_json: bool) -> None:
    """Each service: name, role, pid, address, state, restarts, and details (replication
    of database replicas, the node's own stats for cache nodes)."""
    print_status(ctx.state, ctx.topology(), as_json=as_json)


@click.group()
def cache() -> None:
    """The cache tier's nodes."""


@cache.command(name="status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@handles_errors
def cache_status(ctx: Context, as_json: bool) -> None:
    """Each cache node: pid, address, state and what the node reports of itself."""
    status = collect_status(ctx.state, ctx.topology())
    nodes = [entry for entry in status["services"] if entry.get("role") == "cache"]
    if as_json:
        click.echo(json.dumps(nodes, indent=2))
        return
    if not status["running"]:
        click.echo(f"no stack is running in {status['state_dir']}")
        return
    columns = ("NAME", "PID", "ADDRESS", "STATE", *(n.upper() for n in CACHE_STATS))
    rows = [columns]
    for entry in nodes:
        stats = entry.get("cache") or {}
        values = [("-" if stats.get(n) is None else str(stats[n])) for n in CACHE_STATS]
        rows.append((entry["name"], str(entry.get("pid") or "-"), entry["address"],
                     entry["state"], *values))
    _print_rows(rows)
    for entry in nodes:
        error = (entry.get("cache") or {}).get("error")
        if error:
            click.echo(f"{entry['name']}: {error}")


def _print_rows(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())


@click.command()
@click.argument("service", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--tail", "count", default=100, show_default=True,
              help="Lines to show from the end of each log (-1 for all).")
@click.pass_obj
@handles_errors
def logs(ctx: Context, service: str | None, follow: bool, count: int) -> None:
    """Show the logs of one service, or of all of them prefixed by name."""
    state = ctx.state
    available = sorted(p.stem for p in state.logs.glob("*.log")) if state.logs.exists() else []
    if service is not None and service not in available:
        known = ", ".join(available) or "none yet"
        raise click.UsageError(f"no logs for service {service!r} (known: {known})")
    names = [service] if service else available
    write = prefixer(names, sys.stdout)
    for name in names:
        for line in last_lines(state.log_path(name), count):
            write(name, line)
    if follow:
        follower = Follower({n: state.log_path(n) for n in names}, write)
        try:
            while True:
                follower.poll()
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass


COMMANDS = (status, cache, logs)
