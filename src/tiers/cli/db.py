"""``tiers db``: the database nodes' roles and lag, a psql shell, a planned switchover."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from tiers.cli.context import EXIT_FAILURE, Context, handles_errors
from tiers.db import embedded
from tiers.db.health import NodeObservation
from tiers.db.promote import is_fenced
from tiers.errors import StateError
from tiers.supervisor.control import send_request
from tiers.supervisor.database import DatabaseNodes
from tiers.supervisor.stack import Stack

_COLUMNS = ("NODE", "ROLE", "ADDRESS", "POSITION", "LAG", "DETAIL")


def _stack(ctx: Context) -> Stack:
    return Stack(ctx.topology(), ctx.state.path)


def node_report(nodes: DatabaseNodes, timeout: float = 1.0) -> list[dict[str, Any]]:
    """One live probe of every node: role, position, lag behind the primary."""
    engine = nodes.engine
    seen = {name: engine.probe(engine.local_dsn(port), timeout, name=name)
            for name, port in nodes.ports.items()}
    primaries = [o for o in seen.values() if o.reachable and o.in_recovery is False]
    head = primaries[0].position if len(primaries) == 1 else None
    recorded = nodes.primary()
    report = []
    for name, obs in seen.items():
        report.append({
            "name": name,
            "cluster": nodes.db.name,
            "role": _role(obs),
            "recorded_role": "primary" if name == recorded else "replica",
            "address": f"{nodes.db.host}:{nodes.ports[name]}",
            "position": None if obs.position is None else engine.format_token(obs.position),
            "lag_bytes": (engine.lag_bytes(head, obs.position)
                          if head is not None and obs.position is not None and obs.in_recovery
                          else None),
            "replay_lag_seconds": obs.replay_lag_seconds,
            "fenced": _fenced(nodes, name),
            "error": obs.error,
        })
    return report


def _role(obs: NodeObservation) -> str:
    if not obs.reachable:
        return "down"
    return "replica" if obs.in_recovery else "primary"


def _fenced(nodes: DatabaseNodes, name: str) -> bool:
    # Reads the data root through the state dir's path; creates nothing.
    layout = embedded.Layout(root=nodes.data_dir, bin_dir=nodes.data_dir)
    try:
        return is_fenced(layout, name)
    except OSError:
        return False


@click.group()
def db() -> None:
    """The database nodes: roles, positions and lag; a shell; a switchover."""


@db.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@handles_errors
def db_status(ctx: Context, as_json: bool) -> None:
    """Each node's live role, WAL position and how far it is behind the primary."""
    report = [node for nodes in _stack(ctx).databases for node in node_report(nodes)]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    rows = [_COLUMNS]
    for node in report:
        lag = "-" if node["lag_bytes"] is None else f"{node['lag_bytes']} B"
        if node["replay_lag_seconds"]:
            lag += f", {node['replay_lag_seconds']:.1f} s"
        detail = ", ".join(part for part in (
            "fenced" if node["fenced"] else "",
            f"recorded as {node['recorded_role']}" if node["recorded_role"] != node["role"]
            else "",
            node["error"] or "",
        ) if part)
        rows.append((node["name"], node["role"], node["address"], node["position"] or "-", lag,
                     detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@db.command("shell", context_settings={"ignore_unknown_options": True})
@click.argument("node", required=False)
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
@handles_errors
def db_shell(ctx: Context, node: str | None, psql_args: tuple[str, ...]) -> None:
    """psql on NODE (default: the primary); arguments after NODE go to psql.

    Example: tiers db shell db-replica1 -c 'SELECT pg_is_in_recovery()'
    """
    stack = _stack(ctx)
    if node is not None and node.startswith("-"):
        psql_args, node = (node, *psql_args), None
    nodes = stack.database if node is None else stack.cluster_of(node)
    name = node or nodes.primary()
    psql = embedded.pg_install_dir() / "bin" / "psql"
    argv = [str(psql), nodes.dsn(name), *psql_args]
    os.execv(argv[0], argv)


@db.command("switchover")
@click.option("--to", "target", metavar="NODE",
              help="The replica to promote (default: the most advanced one).")
@click.option("--timeout", default=120.0, show_default=True,
              help="Seconds to wait for the supervisor to finish.")
@click.pass_obj
@handles_errors
def db_switchover(ctx: Context, target: str | None, timeout: float) -> None:
    """Promote a replica and make the primary its replica, losing no committed write.

    The old primary stops accepting writes first (a clean shutdown sends its
    last WAL), the new one is promoted once it has replayed all of it, then the
    old primary is rewound and follows it. Writes fail for that moment
    (typically well under a second); routers find the new primary by themselves.
    """
    if target is not None:
        _stack(ctx).cluster_of(target)  # an unknown name fails here, before any request
    state = ctx.state
    pid = state.supervisor_pid() if state.is_locked() else None
    if pid is None:
        raise StateError(f"no stack is running in {state.path}; 'tiers up' first")
    ok, message = send_request(state.path, pid, "switchover", timeout, to=target)
    if not ok:
        click.echo(f"tiers: switchover failed: {message}", err=True)
        raise SystemExit(EXIT_FAILURE)
    click.echo(f"tiers: {message}")


COMMANDS = (db,)
