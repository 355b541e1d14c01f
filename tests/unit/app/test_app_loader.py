from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiers.app.loader import AppLoadError, extend_sys_path, load_app
from tiers.errors import TiersError


@pytest.fixture(autouse=True)
def restore_sys_path() -> Iterator[None]:
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = saved_path
    for name in set(sys.modules) - saved_modules:
        del sys.modules[name]


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def test_loads_an_attribute_after_extending_sys_path(tmp_path: Path) -> None:
    write(tmp_path, "tiers_test_app_ok.py", "def app(environ, start_response):\n    return []\n")
    app = load_app("tiers_test_app_ok:app", [tmp_path])
    assert app.__name__ == "app"
    assert sys.path[0] == str(tmp_path.resolve())


def test_dotted_attribute_path(tmp_path: Path) -> None:
    write(
        tmp_path,
        "tiers_test_app_dotted.py",
        "class Holder:\n"
        "    @staticmethod\n"
        "    def wsgi(environ, start_response):\n"
        "        return []\n",
    )
    assert callable(load_app("tiers_test_app_dotted:Holder.wsgi", [tmp_path]))


def test_first_pythonpath_wins(tmp_path: Path) -> None:
    write(tmp_path / "a", "tiers_test_app_which.py", "def app(e, s):\n    return [b'a']\n")
    write(tmp_path / "b", "tiers_test_app_which.py", "def app(e, s):\n    return [b'b']\n")
    app = load_app("tiers_test_app_which:app", [tmp_path / "a", tmp_path / "b"])
    assert app({}, lambda *a: None) == [b"a"]  # type: ignore[arg-type]


def test_extend_sys_path_moves_existing_entries_to_the_front(tmp_path: Path) -> None:
    sys.path.append(str(tmp_path))
    extend_sys_path([tmp_path])
    assert sys.path.count(str(tmp_path)) == 1
    assert sys.path[0] == str(tmp_path)


@pytest.mark.parametrize("spec", ["bookmarks.app", ":app", "bookmarks.app:", ""])
def test_malformed_spec(spec: str) -> None:
    with pytest.raises(AppLoadError, match="expected 'module:attribute'"):
        load_app(spec)


def test_missing_module_names_the_module_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(AppLoadError) as info:
        load_app("tiers_test_no_such_module:app", [tmp_path])
    message = str(info.value)
    assert "tiers_test_no_such_module" in message
    assert str(tmp_path) in message
    assert "ModuleNotFoundError" in message
    assert isinstance(info.value, TiersError)


def test_exception_while_importing_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "tiers_test_app_boom.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(AppLoadError, match="RuntimeError: boom at import") as info:
        load_app("tiers_test_app_boom:app", [tmp_path])
    assert isinstance(info.value.__cause__, RuntimeError)


def test_syntax_error_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "tiers_test_app_syntax.py", "def app(:\n")
    with pytest.raises(AppLoadError, match="SyntaxError"):
        load_app("tiers_test_app_syntax:app", [tmp_path])


def test_missing_attribute(tmp_path: Path) -> None:
    write(tmp_path, "tiers_test_app_noattr.py", "x = 1\n")
    with pytest.raises(AppLoadError, match="has no 'app'"):
        load_app("tiers_test_app_noattr:app", [tmp_path])


def test_not_callable(tmp_path: Path) -> None:
    write(tmp_path, "tiers_test_app_notcallable.py", "app = 42\n")
    with pytest.raises(AppLoadError, match="int object is not a WSGI callable"):
        load_app("tiers_test_app_notcallable:app", [tmp_path])
