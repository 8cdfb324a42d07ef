"""The limit bookkeeping, with time passed in (no sleeping, no clock)."""

from __future__ import annotations

import pytest

from gateway import replies
from gateway.limits import ConnectionLimits, MessageRate, auth_failure_delay


def test_connection_limits_per_address_and_in_total() -> None:
    limits = ConnectionLimits(total=3, per_ip=2)
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") is replies.TOO_MANY_FROM_ADDRESS
    assert limits.admit("10.0.0.2") is None
    assert limits.admit("10.0.0.3") is replies.TOO_MANY_CONNECTIONS  # total reached first
    limits.release("10.0.0.1")
    assert limits.open == 2
    assert limits.admit("10.0.0.1") is None
    for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        limits.release(ip)
    assert limits.open == 0
    assert limits._by_ip == {}  # nothing kept for addresses with no connection


def test_message_rate_allows_a_burst_then_refills_steadily() -> None:
    rate = MessageRate(per_minute=3)
    assert [rate.allow("u", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow("other", 0.0)  # per user
    assert not rate.allow("u", 19.0)  # one token refills every 20 s
    assert rate.allow("u", 20.5)
    assert not rate.allow("u", 21.0)
    assert [rate.allow("u", 200.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_failed_auth_delay_doubles_per_failure_up_to_the_cap() -> None:
    assert auth_failure_delay(0, 0.5, 4.0) == 0.0
    assert [auth_failure_delay(n, 0.5, 4.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    assert auth_failure_delay(10_000, 0.5, 4.0) == 4.0  # no overflow for a huge count
    assert auth_failure_delay(3, 0.0, 4.0) == 0.0


def test_per_address_limits_count_ipv6_by_64_and_mapped_ipv4_as_ipv4() -> None:
    limits = ConnectionLimits(total=100, per_ip=2)
    assert limits.admit("2001:db8:1:2::1") is None
    assert limits.admit("2001:db8:1:2:ffff::9") is None  # same /64: same subscriber
    assert limits.admit("2001:db8:1:2::77") is replies.TOO_MANY_FROM_ADDRESS
    assert limits.admit("2001:db8:1:3::1") is None  # the next /64 is someone else
    assert limits.admit("::ffff:192.0.2.1") is None
    assert limits.admit("192.0.2.1") is None
    assert limits.admit("192.0.2.1") is replies.TOO_MANY_FROM_ADDRESS


def test_sweeps_of_idle_entries_stay_cheap_when_most_entries_are_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway import limits

    monkeypatch.setattr(limits, "_PRUNE_AT", 10)
    rate = MessageRate(per_minute=1)
    sweeps = 0
    original = rate._prune

    def counting(now: float) -> None:
        nonlocal sweeps
        sweeps += 1
        original(now)

    monkeypatch.setattr(rate, "_prune", counting)
    for n in range(200):  # every bucket is live: a sweep can drop nothing
        assert rate.allow(f"user{n}", 0.0)
    assert len(rate._buckets) == 200
    assert sweeps <= 5  # after each sweep, the next waits until the table has doubled
    assert not rate.allow("user0", 1.0)  # sweeping never lifts a limit
