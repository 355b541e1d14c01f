"""What every command shares: its context (state dir, topology file) and error handling.

The CLI package is the only place that exits the process: everything below it
raises TiersError subclasses, which become one clear line and an exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from tiers.config import Topology, load_topology
from tiers.errors import ConfigError, TiersError
from tiers.supervisor.statedir import StateDir, resolve_state_dir

EXIT_FAILURE = 1
EXIT_CONFIG = 2

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What every command needs: where the state lives and which topology file to read."""

    def __init__(self, state_dir: str | None, topology_file: str | None) -> None:
        self.state = StateDir(resolve_state_dir(state_dir))
        self.topology_file = Path(topology_file) if topology_file else None

    def topology(self) -> Topology:
        return load_topology(self.topology_file)


def handles_errors(command: F) -> F:
    """Turn TiersError into a message on stderr and a distinct exit code."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"tiers: configuration error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        except TiersError as exc:
            click.echo(f"tiers: {exc}", err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]
