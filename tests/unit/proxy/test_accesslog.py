"""LTSV access log: escaping, line format, buffering."""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

import pytest

from tests.conftest import require
from tiers.proxy.accesslog import (
    AccessLog,
    RequestIds,
    escape,
    format_line,
    parse_line,
    request_id,
    unescape,
)

try:
    from tiers.proxy._ltsv import format_line as c_format_line
    from tiers.proxy._ltsv import request_id as c_request_id
except ImportError:
    c_format_line = c_request_id = None

LABELS = [
    "time", "host", "forwardedfor", "method", "uri", "protocol", "status", "size", "reqsize",
    "referer", "reqtime", "apptime", "upstream", "cache", "route", "reqid", "ua",
]


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        (b"plain value", b"plain value"),
        (b"a\tb", b"a\\tb"),
        (b"line\nbreak", b"line\\nbreak"),
        (b"cr\rhere", b"cr\\rhere"),
        (b"back\\slash", b"back\\\\slash"),
        (b"\\t is not a tab", b"\\\\t is not a tab"),
        (b"\t\n\r\\", b"\\t\\n\\r\\\\"),
    ],
)
def test_escape_round_trip(raw: bytes, escaped: bytes) -> None:
    assert escape(raw) == escaped
    assert b"\t" not in escape(raw) and b"\n" not in escape(raw)
    assert unescape(escape(raw)) == raw


def _record(log: AccessLog, **overrides: object) -> None:
    fields: dict[str, object] = {
        "host": b"127.0.0.1",
        "forwardedfor": None,
        "method": b"GET",
        "uri": b"/a?b=c",
        "protocol": b"HTTP/1.1",
        "status": 200,
        "size": 42,
        "reqtime": 0.0123,
        "apptime": 0.01,
        "upstream": b"127.0.0.1:8401",
        "ua": b"curl/8",
    }
    fields.update(overrides)
    log.record(**fields)  # type: ignore[arg-type]


def test_line_has_every_label_in_order(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    _record(log)
    _record(log, apptime=None, upstream=None, ua=None, status=503, forwardedfor=b"1.2.3.4")
    log.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    first = parse_line(lines[0])
    assert list(first) == LABELS
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", first["time"])
    assert first["status"] == b"200" and first["size"] == b"42"
    assert first["reqtime"] == b"0.012" and first["apptime"] == b"0.010"
    assert first["upstream"] == b"127.0.0.1:8401" and first["forwardedfor"] == b"-"
    second = parse_line(lines[1])
    assert second["apptime"] == b"-" and second["upstream"] == b"-" and second["ua"] == b"-"
    assert second["forwardedfor"] == b"1.2.3.4"
    for label in ("referer", "cache", "route", "reqid"):
        assert first[label] == b"-"
    assert first["reqsize"] == b"0"


def test_given_the_loop_time_the_wall_clock_is_read_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = [1_800_000_000.25]
    readings: list[float] = []

    def fake_time() -> float:
        readings.append(wall[0])
        return wall[0]

    monkeypatch.setattr(time, "time", fake_time)
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    for tenth in range(5):  # 0.0-0.4 s later: the second that began 0.25 s before
        _record(log, monotonic=100.0 + tenth / 10)
    assert len(readings) == 1
    wall[0] += 0.8  # as the loop's clock moved
    _record(log, monotonic=100.8)  # that second is over: the clock is read again
    _record(log)  # without the loop's time, it is read every time
    assert len(readings) == 3
    log.close()
    stamps = [parse_line(line)["time"] for line in path.read_bytes().splitlines()]
    assert len(set(stamps[:5])) == 1
    assert stamps[5] == stamps[6] != stamps[0]


def test_optional_labels_are_written_escaped(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    _record(log, reqsize=12, referer=b"http://a/\tb", cache=b"HIT", route=b"crawlers",
            reqid=b"abc-1")
    log.close()
    record = parse_line(path.read_bytes())
    assert record["reqsize"] == b"12" and record["referer"] == b"http://a/\tb"
    assert (record["cache"], record["route"], record["reqid"]) == (b"HIT", b"crawlers", b"abc-1")


def test_hostile_values_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    _record(log, ua=b"evil\tstatus:200\nforged:line", uri=b"/x\\y")
    log.close()
    data = path.read_bytes()
    assert data.count(b"\n") == 1
    record = parse_line(data)
    assert list(record) == LABELS
    assert record["ua"] == b"evil\tstatus:200\nforged:line"
    assert record["uri"] == b"/x\\y"


def test_lines_are_buffered_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    _record(log)
    assert path.read_bytes() == b""
    log.flush()
    assert path.read_bytes().count(b"\n") == 1
    log.close()


def test_large_buffer_is_written_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    for _ in range(2000):
        _record(log, uri=b"/" + b"u" * 100)
    assert path.stat().st_size > 0
    log.close()
    assert path.read_bytes().count(b"\n") == 2000


def test_timer_flushes_every_second(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def scenario() -> bytes:
        log = AccessLog(str(path))
        log.start(asyncio.get_running_loop())
        _record(log)
        await asyncio.sleep(1.3)
        written = path.read_bytes()
        log.close()
        return written

    assert asyncio.run(scenario()).count(b"\n") == 1


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"earlier\n")
    log = AccessLog(str(path))
    _record(log)
    log.close()
    assert path.read_bytes().startswith(b"earlier\ntime:")


def test_dash_means_stdout(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    log = AccessLog("-")
    _record(log, uri=b"/to-stdout")
    log.close()
    out = capsysbinary.readouterr().out
    assert parse_line(out)["uri"] == b"/to-stdout"


@pytest.mark.parametrize("byte", [b"\t", b"\n", b"\r", b"\\"])
@pytest.mark.parametrize(
    "field", ["forwardedfor", "method", "uri", "referer", "route", "reqid", "ua"]
)
def test_each_client_value_is_escaped_alone(tmp_path: Path, field: str, byte: bytes) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    value = b"a" + byte + b"b"
    _record(log, **{field: value})
    _record(log, uri=b"/clean")
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 3 and lines[2] == b""
    record = parse_line(lines[0])
    assert list(record) == LABELS
    assert record[field] == value
    assert lines[0].count(escape(value)) == 1
    assert parse_line(lines[1])["uri"] == b"/clean"


def _random_text(rng: random.Random) -> bytes | None:
    if rng.random() < 0.15:
        return None
    alphabet = b"ab/?=&:- \t\n\r\\\x00\xff%"
    return bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def _random_seconds(rng: random.Random) -> float:
    # Near and exact ties of the third decimal (an odd number of sixteenths is
    # exactly halfway: half to even), both sides of 1e15, signs, tiny values.
    return rng.choice([0.0, -0.0, 0.0005, 0.0015, 0.0025, 1e-9, 2.675, 1 / 3, 86400.123456,
                       rng.randrange(1, 10 ** 6, 2) / 16, 999999999999999.9, 1e15, 3e17,
                       -1.5, -rng.random(), rng.random() * 10 ** rng.randrange(-4, 12)])


def test_the_c_line_is_the_python_line() -> None:
    require(c_format_line is not None,
            "the C module tiers.proxy._ltsv is not built (pip install -e . needs a C compiler)")
    assert c_format_line is not None
    rng = random.Random(7)
    for _ in range(5000):
        args = (
            b"2026-12-06T08:00:00+00:00", _random_text(rng) or b"::1", _random_text(rng),
            _random_text(rng) or b"GET", _random_text(rng) or b"/", b"HTTP/1.1",
            rng.choice([200, 404, 503]), rng.randrange(0, 10 ** rng.randrange(1, 12)),
            rng.randrange(0, 2 ** 40), _random_text(rng), _random_seconds(rng),
            None if rng.random() < 0.3 else _random_seconds(rng), _random_text(rng),
            _random_text(rng), _random_text(rng), _random_text(rng), _random_text(rng),
        )
        line = c_format_line(*args)
        assert line == format_line(*args), args
        assert line.count(b"\t") == len(LABELS) - 1 and line.endswith(b"\n")
        assert line.count(b"\n") == 1


def test_the_c_line_refuses_what_is_not_a_field() -> None:
    require(c_format_line is not None, "the C module tiers.proxy._ltsv is not built")
    assert c_format_line is not None
    args: list[object] = [b"t", b"h", None, b"GET", b"/", b"HTTP/1.1", 200, 1, 0, None, 0.5,
                          None, None, None, None, None, None]
    assert c_format_line(*args).startswith(b"time:t\thost:h\tforwardedfor:-\t")
    with pytest.raises(TypeError, match="17 arguments"):
        c_format_line(*args[:-1])
    with pytest.raises(TypeError, match="uri"):
        c_format_line(*args[:4], "/", *args[5:])
    with pytest.raises(TypeError):
        c_format_line(*args[:6], None, *args[7:])
    for seconds in (1e300, -1e300, float("inf"), float("-inf"), float("nan"), -float("nan")):
        with_seconds = [*args[:10], seconds, seconds, *args[12:]]
        assert c_format_line(*with_seconds) == format_line(*with_seconds)  # type: ignore[arg-type]


def test_the_c_request_id_is_the_python_one() -> None:
    require(c_request_id is not None,
            "the C module tiers.proxy._ltsv is not built (pip install -e . needs a C compiler)")
    assert c_request_id is not None
    rng = random.Random(11)
    counts = [0, 1, 9, 10, 15, 16, 255, 256, 2 ** 32, 2 ** 63, 2 ** 64 - 1]
    counts += [rng.randrange(0, 2 ** rng.randrange(1, 65)) for _ in range(2000)]
    for count in counts:
        for prefix in (b"", b"5f0c2a9e11d4"):
            assert c_request_id(prefix, count) == request_id(prefix, count)
            assert request_id(prefix, count) == prefix + b"-" + hex(count)[2:].encode()
    for bad in (-1, 2 ** 64):
        with pytest.raises(OverflowError):
            c_request_id(b"p", bad)
        with pytest.raises(OverflowError):
            request_id(b"p", bad)
    with pytest.raises(TypeError):
        c_request_id("p", 1)  # type: ignore[arg-type]


def test_request_ids_differ_between_processes_and_count_up() -> None:
    first, second = RequestIds(), RequestIds()
    a, b = first.next(), first.next()
    prefix = a.rsplit(b"-", 1)[0]
    assert a == prefix + b"-1" and b == prefix + b"-2"
    assert second.next().rsplit(b"-", 1)[0] != prefix
