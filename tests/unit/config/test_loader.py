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
        ('[db]\nfailover = "yes"\n', "db.failover", "expected a boolean, got str"),
        ("[db]\nfailover_checks = 0\n", "db.failover_checks", "between 1 and 100"),
        ("[db]\ncheck_interval = 0.001\n", "db.check_interval", "at least"),
        ("[db.clusters.Main]\nport = 16000\n", "db.clusters.Main.-", "lower-case ASCII identifier"),
        ("[db.clusters.main]\nport = 16000\n", "db.clusters.main.-", "other than 'main'"),
        ('[db.clusters."é"]\nport = 16000\n', "db.clusters.é.-", "ASCII identifier"),
        ("[db.clusters.social]\nreplicas = 1\n", "db.clusters.social.port", "its own"),
        ("[db.clusters.social]\nport = 15432\n", "db.clusters.social.ports", "already used"),
        ("[db.clusters.social]\nport = 16000\nwho = 1\n", "db.clusters.social.who",
         "unknown key"),
        ('[db.tables]\nb = { cluster = "nope", tables = ["b"] }\n', "db.tables.b.cluster",
         "nope"),
        ('[db.tables]\nb = { cluster = "main", tables = ["b"] }\n'
         'c = { cluster = "main", tables = ["b"] }\n', "db.tables.c.tables", "already in group"),
        ('[db.shards]\nvirtual_shards = 4\n[db.shards.clusters]\nmain = ["0-3"]\n',
         "db.shards.tables", "name the sharded tables"),
        ('[db.shards]\ntables = ["s"]\nvirtual_shards = 4\n[db.shards.clusters]\n'
         'main = ["0-2"]\n', "db.shards.clusters", "shards 3 are assigned to no cluster"),
        ('[db.shards]\ntables = ["s"]\nvirtual_shards = 4\n[db.shards.clusters]\n'
         'other = ["0-3"]\n', "db.shards.clusters.other", "other"),
        ("[app]\nport = 9000\n[db]\nports = [9001, 9500]\n", "db.ports", "already used by app"),
        ("[worker]\nprocess = 2\n", "worker.process", "unknown key"),
        ("[worker]\nprocesses = -1\n", "worker.processes", "between 0 and 256"),
        ("[worker]\nqueues = []\n", "worker.queues", "at least one queue"),
        ('[worker]\nqueues = ["a b"]\n', "worker.queues", "not a queue name"),
        ('[worker]\nqueues = ["a", "a"]\n', "worker.queues", "listed twice"),
        ('[worker]\nimports = ["my tasks"]\n', "worker.imports", "not a module name"),
        ("[worker]\nimports = [1]\n", "worker.imports", "a string or a list of strings"),
        ("[worker]\nlease = 0.5\n", "worker.lease", "at least 1.0 seconds"),
        ('[worker]\nscheduler = "yes"\n', "worker.scheduler", "expected a boolean"),
        ("[worker]\nmax_jobs = -5\n", "worker.max_jobs", "at least 0"),
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


def test_failover_settings() -> None:
    default = parse_topology("", source="x").db
    assert (default.failover, default.check_interval, default.failover_checks) == (True, 0.5, 3)
    db = parse_topology("[db]\nfailover = false\ncheck_interval = 0.2\nfailover_checks = 5\n",
                        source="x").db
    assert (db.failover, db.check_interval, db.failover_checks) == (False, 0.2, 5)


def test_clusters_table_groups_and_shards() -> None:
    db = parse_topology(
        "[db]\nport = 15500\n"
        "[db.clusters.social]\nreplicas = 1\nport = 15510\n"
        '[db.tables]\nbookmarks = { cluster = "social", tables = ["bookmarks", "tags"] }\n'
        '[db.shards]\ntables = ["stars"]\nvirtual_shards = 8\n'
        '[db.shards.clusters]\nmain = ["0-3"]\nsocial = ["4-7"]\n', source="x").db
    assert [c.name for c in db.all_clusters()] == ["main", "social"]
    social = db.clusters[0]
    assert (social.ports, social.replicas, social.database) == ((15510, 15511), 1, "tiers")
    assert db.tables is not None and db.tables.cluster_for_table("tags") == "social"
    assert db.tables.cluster_for_table("users") == "main"
    assert db.shards is not None and db.shards.tables == ("stars",)
    assert [db.shards.map.cluster_of_shard(i) for i in (0, 3, 4, 7)] == [
        "main", "main", "social", "social"]


def test_worker_defaults_follow_the_app() -> None:
    demo = parse_topology("")
    assert demo.worker.imports == ("bookmarks.tasks",)
    assert demo.worker.enabled and demo.worker.processes == 2 and demo.worker.scheduler
    other = parse_topology('[app]\napp = "myapp:app"\npythonpath = ["."]\n', base=Path("/"))
    assert other.worker.imports == () and not other.worker.enabled
    told = parse_topology('[app]\napp = "myapp:app"\npythonpath = ["."]\n[worker]\n'
                          'imports = "myapp.tasks"\nprocesses = 0\nqueues = ["a", "b"]\n'
                          "max_jobs = 0\nkeep_done = 0\n", base=Path("/"))
    assert told.worker.imports == ("myapp.tasks",) and told.worker.queues == ("a", "b")
    assert told.worker.enabled  # the scheduler alone is something to run
    assert (told.worker.max_jobs, told.worker.keep_done) == (0, 0.0)
    idle = parse_topology("[worker]\nprocesses = 0\nscheduler = false\n")
    assert not idle.worker.enabled
