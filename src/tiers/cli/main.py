"""The ``tiers`` command: a compose-like front for one stack per state directory."""

from __future__ import annotations

import click

from tiers.cli import db, inspect, jobs, lifecycle
from tiers.cli.context import Context


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", envvar="TIERS_STATE_DIR", metavar="DIR",
              help="Where the stack keeps its state (default: ./.tiers).")
@click.option("-f", "--file", "topology_file", metavar="FILE",
              help="Topology file (default: ./tiers.toml if present, else built-in defaults).")
@click.pass_context
def cli(ctx: click.Context, state_dir: str | None, topology_file: str | None) -> None:
    """Run a three-tier web service: proxy, prefork app servers, replicated PostgreSQL,
    cache nodes and job workers."""
    ctx.obj = Context(state_dir, topology_file)


for _command in (*lifecycle.COMMANDS, *inspect.COMMANDS, *db.COMMANDS, *jobs.COMMANDS):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="tiers")
