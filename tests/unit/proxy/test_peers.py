"""Folding the status of several proxy workers into one, and their metrics."""

from __future__ import annotations

from typing import Any

from tiers.proxy.admin import render_metrics
from tiers.proxy.observe import metrics_of_workers
from tiers.proxy.peers import merge_status


def server(state: str, requests: int, *, active: int = 0, checked: float | None = None,
           ok: bool | None = None, error: str = "") -> dict[str, Any]:
    return {"address": "127.0.0.1:9001", "state": state, "backup": False, "weight": 2,
            "effective_weight": 2.0 if state == "up" else 0.0, "active": active,
            "requests": requests, "connect_errors": 1, "server_errors": 0, "timeouts": 0,
            "broken": 0, "downs": 0 if state == "up" else 1, "last_check_ok": ok,
            "last_check_at": checked, "last_check_error": error}


def worker(pid: int, requests: dict[str, int], servers: list[dict[str, Any]],
           *, connections: int = 1, hits: int = 0) -> dict[str, Any]:
    return {"worker": 0, "pid": pid, "workers": 2, "uptime_seconds": 10.0 + pid,
            "connections": connections, "requests": requests, "bytes_out": 100,
            "pools": [{"name": "app", "balance": "round_robin", "queued": 1,
                       "queue_limit": 8, "queue_full": 0, "queue_timeouts": 2,
                       "servers": servers}],
            "abuse": {"allowed": 5, "denied": 1, "limited": 0, "blocks": 0, "blocked": 0,
                      "tracked": 3, "evicted": 0},
            "cache": {"hits": hits, "misses": 1, "stale": 0, "bytes": 50, "entries": 1}}


def test_counters_are_summed_and_agreeing_states_kept() -> None:
    merged = merge_status([
        worker(1, {"2xx": 3}, [server("up", 3, active=1, checked=5.0, ok=True)], hits=2),
        worker(2, {"2xx": 4, "5xx": 1}, [server("up", 5, checked=6.0, ok=True)]),
    ])
    assert (merged["workers"], merged["answered"]) == (2, 2)
    assert merged["requests"] == {"2xx": 7, "5xx": 1}
    assert (merged["connections"], merged["bytes_out"]) == (2, 200)
    assert merged["uptime_seconds"] == 12.0
    assert merged["cache"] == {"hits": 2, "misses": 2, "stale": 0, "bytes": 100, "entries": 2}
    assert merged["abuse"]["allowed"] == 10 and merged["abuse"]["tracked"] == 6
    (pool,) = merged["pools"]
    assert (pool["queued"], pool["queue_limit"], pool["queue_timeouts"]) == (2, 8, 4)
    (one,) = pool["servers"]
    assert (one["state"], one["states"], one["requests"], one["active"]) == \
        ("up", ["up", "up"], 8, 1)
    assert (one["weight"], one["connect_errors"], one["last_check_at"]) == (2, 2, 6.0)
    assert merged["per_worker"] == [
        {"worker": 0, "answered": True, "pid": 1, "connections": 1, "requests": 3},
        {"worker": 1, "answered": True, "pid": 2, "connections": 1, "requests": 5},
    ]


def test_a_server_down_in_one_worker_only_is_mixed_with_the_latest_check() -> None:
    merged = merge_status([
        worker(1, {}, [server("up", 0, checked=9.0, ok=True)]),
        worker(2, {}, [server("down", 0, checked=9.5, ok=False, error="refused")]),
    ])
    (one,) = merged["pools"][0]["servers"]
    assert (one["state"], one["states"]) == ("mixed", ["up", "down"])
    assert (one["last_check_ok"], one["last_check_error"]) == (False, "refused")
    assert one["effective_weight"] == 1.0


def test_a_worker_that_did_not_answer_is_listed_and_left_out_of_the_sums() -> None:
    merged = merge_status([worker(1, {"2xx": 3}, [server("up", 3)]), None])
    assert (merged["workers"], merged["answered"]) == (2, 1)
    assert merged["requests"] == {"2xx": 3}
    assert merged["per_worker"][1] == {"worker": 1, "answered": False}


def test_nobody_answering_gives_empty_sums() -> None:
    merged = merge_status([None, None])
    assert (merged["answered"], merged["requests"], merged["pools"]) == (0, {}, [])


def test_metrics_carry_a_worker_label_per_sample() -> None:
    text = render_metrics(metrics_of_workers([
        worker(1, {"2xx": 3}, [server("up", 3)]),
        None,
        worker(3, {"2xx": 4}, [server("down", 4)]),
    ])).decode()
    assert 'tiers_proxy_requests_total{code="2xx",worker="0"} 3' in text
    assert 'tiers_proxy_requests_total{code="2xx",worker="2"} 4' in text
    assert 'worker="1"' not in text
    assert 'tiers_proxy_server_up{pool="app",server="127.0.0.1:9001",worker="2"} 0' in text
    # One HELP and TYPE per family, however many workers.
    assert text.count("# TYPE tiers_proxy_requests_total counter") == 1
