"""Serdes: round trips with their flags, pickle refused unless enabled, bad data refused."""

from __future__ import annotations

import datetime
import pickle
from typing import Any

import pytest

from tiers.cache.errors import SerdeError
from tiers.cache.serde import (
    FLAG_BYTES,
    FLAG_INT,
    FLAG_JSON,
    FLAG_PICKLE,
    FLAG_STR,
    DefaultSerde,
    RawSerde,
    Serde,
)


@pytest.mark.parametrize(
    ("value", "data", "flags"),
    [
        (b"", b"", FLAG_BYTES),
        (b"\x00\xffraw", b"\x00\xffraw", FLAG_BYTES),
        ("", b"", FLAG_STR),
        ("héllo ☃", "héllo ☃".encode(), FLAG_STR),
        (0, b"0", FLAG_INT),
        (42, b"42", FLAG_INT),
        (-7, b"-7", FLAG_INT),
        (2**64 - 1, b"18446744073709551615", FLAG_INT),
        (10**30, b"1" + b"0" * 30, FLAG_INT),
        (True, b"true", FLAG_JSON),
        (None, b"null", FLAG_JSON),
        (1.5, b"1.5", FLAG_JSON),
        ({"a": [1, "x", None]}, b'{"a":[1,"x",null]}', FLAG_JSON),
        ([], b"[]", FLAG_JSON),
        ({"ключ": "é"}, '{"ключ":"é"}'.encode(), FLAG_JSON),
    ],
)
def test_default_serde_round_trips(value: Any, data: bytes, flags: int) -> None:
    serde = DefaultSerde()
    assert serde.dumps(value) == (data, flags)
    back = serde.loads(data, flags)
    assert back == value
    assert type(back) is type(value)


def test_bytes_like_values_come_back_as_bytes() -> None:
    serde = DefaultSerde()
    assert serde.dumps(bytearray(b"ab")) == (b"ab", FLAG_BYTES)
    assert serde.dumps(memoryview(b"cd")) == (b"cd", FLAG_BYTES)


def test_tuples_come_back_as_lists() -> None:
    serde = DefaultSerde()
    data, flags = serde.dumps((1, 2))
    assert serde.loads(data, flags) == [1, 2]


def test_numbers_tolerate_memcached_padding() -> None:
    # memcached pads a decremented number in place: "100" decr 1 reads "99 "
    assert DefaultSerde().loads(b"99 ", FLAG_INT) == 99
    assert DefaultSerde().loads(b" 5", FLAG_INT) == 5


@pytest.mark.parametrize(
    ("data", "flags", "message"),
    [
        (b"\xff\xfe", FLAG_STR, "not UTF-8"),
        (b"12x", FLAG_INT, "not a decimal integer"),
        (b"", FLAG_INT, "not a decimal integer"),
        (b"--1", FLAG_INT, "not a decimal integer"),
        (b"1" * 5000, FLAG_INT, "not a decimal integer"),
        (b"{nope", FLAG_JSON, "JSON is invalid"),
        (b"x", 99, "unknown flags 99"),
    ],
)
def test_bad_stored_data_is_refused(data: bytes, flags: int, message: str) -> None:
    with pytest.raises(SerdeError, match=message):
        DefaultSerde().loads(data, flags)


def test_pickle_is_refused_unless_enabled() -> None:
    when = datetime.date(2024, 1, 2)
    with pytest.raises(SerdeError, match="enable pickle"):
        DefaultSerde().dumps(when)
    data = pickle.dumps(when)
    with pytest.raises(SerdeError, match="refusing to unpickle"):
        DefaultSerde().loads(data, FLAG_PICKLE)


def test_pickle_when_enabled() -> None:
    serde = DefaultSerde(pickle=True)
    assert serde.pickle_enabled
    when = datetime.date(2024, 1, 2)
    data, flags = serde.dumps(when)
    assert flags == FLAG_PICKLE
    assert serde.loads(data, flags) == when
    # JSON types stay JSON, so readers without pickle still understand them
    assert serde.dumps({"a": 1})[1] == FLAG_JSON
    # what JSON cannot carry falls back to pickle
    data, flags = serde.dumps({"when": when})
    assert flags == FLAG_PICKLE
    assert serde.loads(data, flags) == {"when": when}
    with pytest.raises(SerdeError, match="stored pickle is invalid"):
        serde.loads(b"not a pickle", FLAG_PICKLE)


def test_unpicklable_and_unencodable_values() -> None:
    with pytest.raises(SerdeError, match="cannot pickle"):
        DefaultSerde(pickle=True).dumps(lambda: None)
    with pytest.raises(SerdeError, match="as JSON"):
        DefaultSerde().dumps({"x": object()})
    with pytest.raises(SerdeError, match="as JSON"):
        DefaultSerde().dumps(float("nan"))


def test_subclasses_keep_their_base_encoding_without_pickle() -> None:
    class Name(str):
        pass

    class Count(int):
        pass

    serde = DefaultSerde()
    assert serde.dumps(Name("x")) == (b"x", FLAG_STR)
    assert serde.dumps(Count(3)) == (b"3", FLAG_INT)


def test_raw_serde() -> None:
    raw = RawSerde()
    assert raw.dumps(b"x") == (b"x", 0)
    assert raw.loads(b"anything", 1234) == b"anything"
    with pytest.raises(SerdeError):
        raw.dumps("text")


def test_custom_serde_satisfies_the_protocol() -> None:
    class Upper:
        def dumps(self, value: Any) -> tuple[bytes, int]:
            return str(value).upper().encode(), 77

        def loads(self, data: bytes, flags: int) -> Any:
            assert flags == 77
            return data.decode().lower()

    serde: Serde = Upper()
    assert serde.loads(*serde.dumps("abc")) == "abc"
