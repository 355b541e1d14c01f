"""The command line of ``python -m tiers.proxy``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tiers.config.model import Address, ProxyConfig
from tiers.proxy.__main__ import main, parse_address, settings_from_args


def test_defaults_are_the_config_defaults() -> None:
    settings = settings_from_args(["--backend", "127.0.0.1:8401"])
    config = ProxyConfig()
    for field in dataclasses.fields(ProxyConfig):
        if field.name in ("access_log", "policy"):
            continue
        assert getattr(settings, field.name) == getattr(config, field.name), field.name
    assert settings.access_log is None
    assert settings.backends == (Address("127.0.0.1", 8401),)
    # The --backend form: one pool of those backends, every request goes to it.
    (pool,) = settings.policy.pools
    assert [s.address for s in pool.servers] == [Address("127.0.0.1", 8401)]
    (route,) = settings.policy.routes
    assert route.pool == pool.name
    assert settings.policy.admin.listen is None


def test_topology_form_takes_pools_and_routes_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text('[proxy]\nlisten = "127.0.0.1:7100"\nheader_timeout = 3\n'
                    '[app]\nports = [7101, 7102]\n[app.groups.crawler]\nport = 7103\n'
                    '[[proxy.routes]]\nuser_agent = "bot"\npool = "crawler"\n'
                    '[[proxy.routes]]\npool = "app"\n')
    settings = settings_from_args(["--topology", str(path), "--access-log", "-"])
    assert settings.listen == Address("127.0.0.1", 7100)
    assert settings.header_timeout == 3.0
    assert settings.access_log == "-"
    assert [p.name for p in settings.policy.pools] == ["app", "crawler"]
    assert [r.pool for r in settings.policy.routes] == ["crawler", "app"]
    assert set(settings.backends) == {Address("127.0.0.1", p) for p in (7101, 7102, 7103)}


def test_backend_and_topology_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--backend", "127.0.0.1:1", "--topology", "default"]):
        with pytest.raises(SystemExit) as caught:
            settings_from_args(argv)
        assert caught.value.code == 2
        assert "either --backend" in capsys.readouterr().err


def test_a_bad_topology_exits_2_with_the_reason(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text("[[proxy.routes]]\npool = 'nowhere'\n")
    assert main(["--topology", str(path)]) == 2
    assert "proxy.routes[0].pool: no pool named 'nowhere'" in capsys.readouterr().err


def test_every_flag() -> None:
    settings = settings_from_args(
        [
            "--listen", "0.0.0.0:0",
            "--backend", "127.0.0.1:1",
            "--backend", "[::1]:2",
            "--access-log", "-",
            "--health-path", "/hc",
            "--health-interval", "0.1",
            "--health-timeout", "0.2",
            "--health-fall", "3",
            "--health-rise", "4",
            "--connect-timeout", "0.3",
            "--read-timeout", "5",
            "--client-idle-timeout", "6",
            "--header-timeout", "7",
        ]
    )  # fmt: skip
    assert settings.listen == Address("0.0.0.0", 0)
    assert settings.backends == (Address("127.0.0.1", 1), Address("::1", 2))
    assert settings.access_log == "-"
    assert (settings.health_path, settings.health_fall, settings.health_rise) == ("/hc", 3, 4)
    assert (settings.health_interval, settings.health_timeout) == (0.1, 0.2)
    assert (settings.connect_timeout, settings.read_timeout) == (0.3, 5.0)
    assert (settings.client_idle_timeout, settings.header_timeout) == (6.0, 7.0)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--backend", "nohost"],
        ["--backend", "127.0.0.1:0"],
        ["--backend", "127.0.0.1:70000"],
        ["--backend", "::1:80"],
        ["--backend", "a:1", "--listen", "a:x"],
        ["--backend", "a:1", "--health-interval", "0"],
        ["--backend", "a:1", "--health-timeout", "-1"],
        ["--backend", "a:1", "--read-timeout", "nan"],
        ["--backend", "a:1", "--health-fall", "0"],
        ["--backend", "a:1", "--health-rise", "1.5"],
        ["--backend", "a:1", "--health-path", "health"],
        ["--backend", "a:1", "--unknown"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settings_from_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_parse_address() -> None:
    assert parse_address("localhost:80") == Address("localhost", 80)
    assert parse_address("[fe80::1]:443") == Address("fe80::1", 443)
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == Address("127.0.0.1", 0)
    with pytest.raises(ValueError, match="port"):
        parse_address("127.0.0.1:0")
