"""The failure policy's transitions, driven by an explicit clock."""

from __future__ import annotations

import pytest

from tiers.cache.policy import (
    Admission,
    FailurePolicy,
    FailureSettings,
    NodeHealth,
    Transition,
)

SETTINGS = FailureSettings(failure_limit=2, dead_timeout=3.0, probe_timeout=1.0)


def policy(count: int = 2) -> FailurePolicy:
    return FailurePolicy(count, SETTINGS)


def test_up_nodes_are_used_and_successes_reset_the_streak() -> None:
    p = policy()
    assert p.admit(0, 0.0) is Admission.USE
    assert p.failed(0, 0.0) is None
    assert p.succeeded(0, 0.1) is None
    assert p.failed(0, 0.2) is None  # the streak started again: 1 of 2
    assert p.health(0) is NodeHealth.UP
    assert p.status(0, 0.2).failures == 1


def test_failure_limit_ejects_for_the_dead_timeout() -> None:
    p = policy()
    p.failed(0, 1.0)
    assert p.failed(0, 1.5) is Transition.EJECTED
    assert p.health(0) is NodeHealth.EJECTED
    assert p.admit(0, 1.6) is Admission.SKIP
    assert p.admit(0, 4.49) is Admission.SKIP
    assert not p.available(0, 4.49)
    assert p.status(0, 2.5).retry_in == pytest.approx(2.0)
    assert p.status(0, 2.5).ejections == 1
    # The other node is untouched.
    assert p.admit(1, 2.0) is Admission.USE


def test_one_probe_after_the_timeout_and_success_rejoins() -> None:
    p = policy()
    p.failed(0, 0.0)
    p.failed(0, 0.0)
    assert p.available(0, 3.0)
    assert p.admit(0, 3.0) is Admission.PROBE
    assert p.health(0) is NodeHealth.PROBING
    # Everyone else keeps away while the probe is out.
    assert p.admit(0, 3.1) is Admission.SKIP
    assert p.succeeded(0, 3.2) is Transition.REJOINED
    assert p.health(0) is NodeHealth.UP
    assert p.admit(0, 3.3) is Admission.USE
    assert p.status(0, 3.3).failures == 0


def test_failed_probe_ejects_again_without_counting_a_new_ejection() -> None:
    p = policy()
    p.failed(0, 0.0)
    p.failed(0, 0.0)
    assert p.admit(0, 3.0) is Admission.PROBE
    assert p.failed(0, 3.1) is None
    assert p.health(0) is NodeHealth.EJECTED
    assert p.admit(0, 6.0) is Admission.SKIP  # a fresh dead timeout from 3.1
    assert p.admit(0, 6.1) is Admission.PROBE
    assert p.status(0, 6.1).ejections == 1


def test_a_lost_probe_is_given_up_after_the_probe_timeout() -> None:
    p = policy()
    p.failed(0, 0.0)
    p.failed(0, 0.0)
    assert p.admit(0, 3.0) is Admission.PROBE
    assert p.admit(0, 3.9) is Admission.SKIP
    assert p.admit(0, 4.0) is Admission.PROBE


def test_late_reports_for_an_ejected_node_change_nothing() -> None:
    p = policy()
    p.failed(0, 0.0)
    p.failed(0, 0.0)
    # Requests sent before the ejection come back afterwards.
    assert p.succeeded(0, 0.5) is None
    assert p.failed(0, 0.6) is None
    assert p.health(0) is NodeHealth.EJECTED
    assert p.admit(0, 2.9) is Admission.SKIP
    assert p.admit(0, 3.0) is Admission.PROBE


def test_ejected_again_after_rejoining_counts_twice() -> None:
    p = FailurePolicy(1, FailureSettings(failure_limit=1, dead_timeout=1.0))
    assert p.failed(0, 0.0) is Transition.EJECTED
    assert p.admit(0, 1.0) is Admission.PROBE
    assert p.succeeded(0, 1.0) is Transition.REJOINED
    assert p.failed(0, 2.0) is Transition.EJECTED
    assert p.status(0, 2.0).ejections == 2


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="failure_limit"):
        FailureSettings(failure_limit=0)
    with pytest.raises(ValueError, match="dead_timeout"):
        FailureSettings(dead_timeout=0)
