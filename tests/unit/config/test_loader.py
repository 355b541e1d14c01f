"""Loading tiers.toml: defaults, overrides, and a clear error for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiers.config import load_topology
from tiers.config.loader import DEMO_PYTHONPATH, parse_topology
from tiers.errors import ConfigError


def test_no_file_means_defaults(tmp_path: Path) -> None:
    topology = load_topology(cwd=tmp_path)
    assert topology.source == "<defaults>"
    assert topology.app.count == 2
    assert topology.app.ports == (8401, 8402)
    assert topology.db.replicas == 1
    assert topology.db.ports == (15432, 15433)
    assert topology.app.pythonpath == (DEMO_PYTHONPATH,)
    assert 5432 not in topology.db.ports


def test_tiers_toml_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "tiers.toml").write_text('[app]\ncount = 3\nport = 9100\n')
    topology = load_topology(cwd=tmp_path)
    assert topology.source == str(tmp_path / "tiers.toml")
    assert topology.app.ports == (9100, 9101, 9102)


def test_explicit_port_lists_and_durations() -> None:
    topology = parse_topology(
        '[proxy]\nlisten = "127.0.0.1:7000"\nhealth_interval = 1\n'
        '[app]\ncount = 2\nports = [7001, 7005]\n'
        '[db]\nreplicas = 2\nports = [7010, 7011, 7012]\ndata_dir = "/srv/pg"\n')
    assert str(topology.proxy.listen) == "127.0.0.1:7000"
    assert topology.proxy.health_interval == 1.0
    assert topology.app.ports == (7001, 7005)
    assert topology.db.replica_ports == (7011, 7012)
    assert topology.db.data_dir == Path("/srv/pg")


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "sql").mkdir()
    path = tmp_path / "stack.toml"
    path.write_text('[app]\napp = "mine:app"\npythonpath = ["code"]\nmigrations = "sql"\n')
    topology = load_topology(path)
    assert topology.app.pythonpath == ((tmp_path / "code").resolve(),)
    assert topology.app.migrations == (tmp_path / "sql").resolve()


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[app]\ncuont = 2\n", "app.cuont", "unknown key"),
        ("[apps]\ncount = 2\n", "apps", "unknown section"),
        ('[app]\ncount = "two"\n', "app.count", "expected an integer, got str"),
        ("[app]\ncount = true\n", "app.count", "got a boolean"),
        ("[app]\ncount = 0\n", "app.count", "between 1 and 64"),
        ("[db]\nreplicas = -1\n", "db.replicas", "between 0 and 16"),
        ("[app]\ncount = 2\nports = [9000]\n", "app.ports", "exactly 2 ports"),
        ("[app]\nport = 70000\n", "app.port", "outside 1-65535"),
        ('[proxy]\nlisten = "localhost"\n', "proxy.listen", "expected 'host:port'"),
        ("[proxy]\nhealth_interval = 0\n", "proxy.health_interval", "at least"),
        ('[proxy]\nhealth_path = "health"\n', "proxy.health_path", "must start with '/'"),
        ('[app]\napp = "mod:"\n', "app.app", "module:attribute"),
        ('[db]\ndatabase = "x; drop"\n', "db.database", "plain identifier"),
        ("[supervisor]\nbackoff_initial = 5\nbackoff_max = 1\n", "supervisor.backoff_max",
         "at least backoff_initial"),
        ('[proxy]\nlisten = "127.0.0.1:8401"\n', "app.ports", "already used by proxy.listen"),
        ("[db]\nport = 8400\n", "db.ports", "already used"),
        ("[app]\nport = 9000\n[db]\nports = [9001, 9500]\n", "db.ports", "already used by app"),
    ],
)
def test_mistakes_name_file_key_and_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_topology(text, source="/etc/tiers.toml")
    error = caught.value
    assert error.source == "/etc/tiers.toml"
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"/etc/tiers.toml: {key}: ")


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "tiers.toml"
    bad.write_text("[app\ncount = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_topology(bad)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_topology(tmp_path / "missing.toml")


def test_missing_pythonpath_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text('[app]\napp = "x:app"\npythonpath = ["nowhere"]\n')
    with pytest.raises(ConfigError) as caught:
        load_topology(path)
    assert caught.value.key == "app.pythonpath"


def test_topology_is_frozen() -> None:
    topology = parse_topology("")
    with pytest.raises(AttributeError):
        topology.app.count = 5  # type: ignore[misc]
