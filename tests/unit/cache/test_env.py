from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import tiers.cache
from tiers.cache import env
from tiers.cache.cluster import CacheCluster
from tiers.cache.env import (
    NODES_ENV,
    close_cluster,
    cluster_from,
    cluster_from_env,
    parse_nodes,
    settings_from_env,
)
from tiers.cache.fake import FakeNodes
from tiers.cache.policy import FailureSettings
from tiers.cache.ring import NodeSpec
from tiers.errors import ConfigError


@pytest.fixture(autouse=True)
def no_process_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (NODES_ENV, env.TIMEOUT_ENV, env.CONNECT_TIMEOUT_ENV, env.FAILURE_LIMIT_ENV,
                 env.DEAD_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    close_cluster()
    yield
    close_cluster()


def test_the_package_exports_the_app_api() -> None:
    assert tiers.cache.cluster_from_env is cluster_from_env
    assert tiers.cache.CacheCluster is CacheCluster


def test_nodes_are_parsed_in_order() -> None:
    assert parse_nodes("127.0.0.1:11311, cache2:11312,[::1]:7") == (
        NodeSpec("127.0.0.1", 11311), NodeSpec("cache2", 11312), NodeSpec("::1", 7))
    assert parse_nodes("cache") == (NodeSpec("cache", 11211),)


@pytest.mark.parametrize("text", ["", "   "])
def test_blank_means_no_nodes(text: str) -> None:
    assert parse_nodes(text) == ()


@pytest.mark.parametrize(("text", "reason"), [
    ("a:1,,b:2", "entry 2 is empty"),
    ("a:1,", "entry 2 is empty"),
    ("a:port", "'a:port'"),
    ("a:70000", "out of range"),
    ("[::1", "unclosed"),
    ("a:1,a:1", "a:1 is listed twice"),
])
def test_a_bad_entry_is_a_config_error_naming_the_variable(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_nodes(text)
    assert caught.value.key == NODES_ENV
    assert reason in str(caught.value)
    assert str(caught.value).startswith(f"environment: {NODES_ENV}: ")


def test_settings_have_the_policy_defaults_unless_set() -> None:
    settings = settings_from_env({NODES_ENV: "a:1,b:2"})
    assert settings is not None
    assert settings.nodes == (NodeSpec("a", 1), NodeSpec("b", 2))
    assert settings.failure == FailureSettings()
    tuned = settings_from_env({NODES_ENV: "a:1", env.TIMEOUT_ENV: "0.1",
                               env.CONNECT_TIMEOUT_ENV: "0.05", env.FAILURE_LIMIT_ENV: "3",
                               env.DEAD_TIMEOUT_ENV: "10"})
    assert tuned is not None
    assert tuned.failure == FailureSettings(failure_limit=3, dead_timeout=10.0,
                                            connect_timeout=0.05, timeout=0.1)


@pytest.mark.parametrize(("name", "value"), [
    (env.TIMEOUT_ENV, "soon"),
    (env.TIMEOUT_ENV, "0"),
    (env.DEAD_TIMEOUT_ENV, "-1"),
    (env.CONNECT_TIMEOUT_ENV, "inf"),
    (env.FAILURE_LIMIT_ENV, "1.5"),
])
def test_a_bad_setting_is_a_config_error_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env({NODES_ENV: "a:1", name: value})
    assert caught.value.key == name


@pytest.mark.parametrize("environ", [{}, {NODES_ENV: ""}, {NODES_ENV: " "}])
def test_no_nodes_means_no_cluster(environ: dict[str, str]) -> None:
    assert settings_from_env(environ) is None
    assert cluster_from(environ) is None


def test_a_cluster_from_a_mapping_uses_its_nodes() -> None:
    nodes = FakeNodes()
    cluster = cluster_from({NODES_ENV: "a:1,b:2"}, factory=nodes)
    assert cluster is not None
    with cluster:
        assert cluster.nodes == (NodeSpec("a", 1), NodeSpec("b", 2))
        assert cluster.set("k", "v")
        assert cluster.get("k") == "v"
        assert len(nodes.holders("k")) == 1
    assert nodes.opened == 1  # nothing connects before it is used


def test_the_process_cluster_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster_from_env() is None
    monkeypatch.setenv(NODES_ENV, "127.0.0.1:1,127.0.0.1:2")
    first = cluster_from_env()
    assert first is not None
    assert cluster_from_env() is first
    assert [n.address for n in first.nodes] == ["127.0.0.1:1", "127.0.0.1:2"]


def test_a_forked_process_builds_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NODES_ENV, "127.0.0.1:1")
    parent = cluster_from_env()
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # as in a forked worker
    child = cluster_from_env()
    assert child is not None and child is not parent
    assert cluster_from_env() is child


def test_close_forgets_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NODES_ENV, "127.0.0.1:1")
    first = cluster_from_env()
    close_cluster()
    monkeypatch.setenv(NODES_ENV, "127.0.0.1:2")
    second = cluster_from_env()
    assert second is not None and second is not first
    assert [n.address for n in second.nodes] == ["127.0.0.1:2"]


def test_a_bad_variable_raises_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NODES_ENV, "127.0.0.1:x")
    for _ in range(2):
        with pytest.raises(ConfigError, match=NODES_ENV):
            cluster_from_env()
