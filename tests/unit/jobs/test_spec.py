"""A job is checked completely before anything is sent: arguments, names, options."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tiers.jobs.errors import JobArgumentError
from tiers.jobs.spec import MAX_ARGS_BYTES, NewJob, encode_args, encode_result


def test_json_arguments_are_encoded_compactly() -> None:
    args = {"user": "ユーザー", "n": 1, "ratio": 0.5, "ok": True, "none": None,
            "items": [1, [2, {"three": 3}]], "pair": (1, 2)}
    text = encode_args(args)
    assert json.loads(text) == {**args, "pair": [1, 2]}
    assert " " not in text.replace("ユーザー", "")


@pytest.mark.parametrize(("args", "message"), [
    ({"when": datetime(2026, 1, 1)}, "args['when']: a datetime.datetime is not JSON "
                                     "(pass value.isoformat())"),
    ({"tags": {"a", "b"}}, "args['tags']: a builtins.set is not JSON (pass a sorted list)"),
    ({"blob": b"x"}, "args['blob']: a builtins.bytes is not JSON (pass text, e.g. base64)"),
    ({"price": Decimal("1.5")}, "args['price']: a decimal.Decimal is not JSON"),
    ({"f": float("nan")}, "args['f']: nan is not a JSON number"),
    ({"f": [1, float("inf")]}, "args['f'][1]: inf is not a JSON number"),
    ({"m": {1: "one"}}, "args['m']: key 1 is a int; JSON keys are strings"),
    ({"s": "a\x00b"}, "args['s']: text with a NUL character"),
    ({"s": "\ud800"}, "args['s']: text with a lone surrogate"),
    ({"x": object()}, "args['x']: a builtins.object is not JSON"),
])
def test_unserialisable_arguments_are_named_with_their_path(args: dict[str, object],
                                                           message: str) -> None:
    with pytest.raises(JobArgumentError) as caught:
        encode_args(args)
    assert message in str(caught.value)


def test_arguments_must_be_a_mapping_not_too_deep_nor_too_large() -> None:
    with pytest.raises(JobArgumentError, match=r"must be a mapping .* got list"):
        encode_args([1, 2])  # type: ignore[arg-type]
    deep: object = 1
    for _ in range(150):
        deep = [deep]
    with pytest.raises(JobArgumentError, match="nested more than 100 levels deep"):
        encode_args({"deep": deep})
    with pytest.raises(JobArgumentError, match=f"more than {MAX_ARGS_BYTES}"):
        encode_args({"big": "x" * MAX_ARGS_BYTES})


def test_a_result_that_is_not_json_is_an_error_and_none_stays_none() -> None:
    assert encode_result(None) is None
    assert encode_result({"rows": 3}) == '{"rows":3}'
    with pytest.raises(JobArgumentError, match="result"):
        encode_result({1, 2})


@pytest.mark.parametrize(("job", "message"), [
    (NewJob(task=""), "a task name is 1 to 200"),
    (NewJob(task="has space"), "a task name"),
    (NewJob(task="t", queue=""), "a queue name is 1 to 63"),
    (NewJob(task="t", queue="a" * 64), "a queue name"),
    (NewJob(task="t", priority=2**31), "priority must be an integer"),
    (NewJob(task="t", priority=True), "priority must be an integer"),
    (NewJob(task="t", max_attempts=0), "max_attempts must be an integer from 1 to 1000"),
    (NewJob(task="t", unique_key=""), "unique_key must be a string of 1 to 500"),
    (NewJob(task="t", run_at=datetime(2026, 1, 1)), "run_at must be timezone-aware"),
    (NewJob(task="t", run_at=datetime.now(UTC), delay=1), "give run_at or delay, not both"),
    (NewJob(task="t", delay=-1), "delay must be a finite number of seconds >= 0"),
    (NewJob(task="t", delay=float("inf")), "delay must be"),
])
def test_bad_options_are_refused(job: NewJob, message: str) -> None:
    with pytest.raises(JobArgumentError, match=message):
        job.checked()


def test_a_checked_job_carries_its_statement_parameters() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    params = NewJob(task="a.b", args={"x": 1}, queue="q", priority=-3, run_at=when,
                    unique_key="k", max_attempts=2).checked().params()
    assert params == {"queue": "q", "task": "a.b", "args": '{"x":1}', "priority": -3,
                      "run_at": when, "delay": 0.0, "max_attempts": 2, "unique_key": "k"}
    assert NewJob(task="t", delay=2).checked().params()["delay"] == 2.0
