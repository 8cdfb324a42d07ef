"""The limit bookkeeping, with time passed in (no sleeping, no clock)."""

from __future__ import annotations

import pytest

from gateway import replies
from gateway.limits import (
    Admission,
    ConnectionLimits,
    DataBudget,
    MessageRate,
    Reservation,
    auth_failure_delay,
)
from gateway.replies import Reply


def test_connection_limits_per_address_and_in_total() -> None:
    limits: ConnectionLimits[str] = ConnectionLimits(total=3, per_ip=2)
    for key, ip in (("a1", "10.0.0.1"), ("a2", "10.0.0.1"), ("b1", "10.0.0.2")):
        assert limits.admit(key, ip, 0.0) == Admission()
        limits.authenticated(key)  # authenticated sessions are never shed
    assert limits.admit("a3", "10.0.0.1", 1.0).refusal is replies.TOO_MANY_FROM_ADDRESS
    assert limits.admit("c1", "10.0.0.3", 1.0).refusal is replies.TOO_MANY_CONNECTIONS
    limits.release("a1")
    assert limits.open == 2
    assert limits.admit("a3", "10.0.0.1", 2.0) == Admission()
    for key in ("a2", "a3", "b1", "a3"):  # releasing twice is harmless
        limits.release(key)
    assert limits.open == 0
    assert limits._by_ip == {}  # nothing kept for addresses with no connection
    assert limits._ip_of == {}
    assert limits._idle == {}
    assert limits._idle_by_ip == {}


def test_a_full_gateway_sheds_the_longest_idle_unauthenticated_session() -> None:
    limits: ConnectionLimits[str] = ConnectionLimits(total=3, per_ip=100)
    limits.admit("idle-1", "10.0.0.1", 0.0)
    limits.admit("idle-2", "10.0.0.2", 1.0)
    limits.admit("device", "10.0.0.3", 2.0)
    limits.active("idle-1", 3.0)  # it sent a command: idle-2 is now the longest idle
    limits.authenticated("device")
    admitted = limits.admit("newcomer", "10.0.0.4", 4.0)
    assert admitted == Admission(shed="idle-2")
    assert limits.open == 3
    limits.release("idle-2")  # its connection_lost comes later: counted once only
    assert limits.open == 3
    assert limits.admit("next", "10.0.0.5", 5.0) == Admission(shed="idle-1")
    assert limits.admit("third", "10.0.0.6", 6.0) == Admission(shed="newcomer")
    limits.authenticated("next")
    limits.authenticated("third")
    # Only authenticated sessions left: nothing may be shed, the newcomer is refused.
    assert limits.admit("late", "10.0.0.7", 7.0).refusal is replies.TOO_MANY_CONNECTIONS


def test_unauthenticated_sessions_have_their_own_budget() -> None:
    limits: ConnectionLimits[str] = ConnectionLimits(
        total=10, per_ip=100, unauthenticated=2, pre_auth_timeout_under_load=5.0
    )
    assert limits.pre_auth_timeout() is None
    limits.admit("u1", "10.0.0.1", 0.0)
    assert limits.pre_auth_timeout() == 5.0  # half the budget in use: under load
    limits.admit("u2", "10.0.0.2", 1.0)
    assert limits.admit("u3", "10.0.0.3", 2.0) == Admission(shed="u1")
    assert limits.unauthenticated_open == 2
    limits.authenticated("u2")
    limits.authenticated("u3")
    assert limits.unauthenticated_open == 0
    assert limits.pre_auth_timeout() is None
    assert ConnectionLimits(total=4, per_ip=4, unauthenticated=500).unauthenticated == 4


def test_a_full_address_sheds_its_own_longest_idle_session() -> None:
    """Behind carrier NAT, idle sockets on one address must not lock out the phones that
    share it; other addresses' sessions are not touched."""
    limits: ConnectionLimits[str] = ConnectionLimits(total=100, per_ip=2)
    limits.admit("other", "10.0.0.9", 0.0)
    limits.admit("nat-1", "10.0.0.1", 1.0)
    limits.admit("nat-2", "10.0.0.1", 2.0)
    assert limits.admit("nat-3", "10.0.0.1", 3.0) == Admission(shed="nat-1")
    limits.authenticated("nat-2")
    limits.authenticated("nat-3")
    assert limits.admit("nat-4", "10.0.0.1", 4.0).refusal is replies.TOO_MANY_FROM_ADDRESS


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
    limits: ConnectionLimits[int] = ConnectionLimits(total=100, per_ip=2)
    keys = iter(range(100))

    def admit(ip: str) -> Reply | None:
        key = next(keys)
        admission = limits.admit(key, ip, 0.0)
        limits.authenticated(key)
        return admission.refusal

    assert admit("2001:db8:1:2::1") is None
    assert admit("2001:db8:1:2:ffff::9") is None  # same /64: same subscriber
    assert admit("2001:db8:1:2::77") is replies.TOO_MANY_FROM_ADDRESS
    assert admit("2001:db8:1:3::1") is None  # the next /64 is someone else
    assert admit("::ffff:192.0.2.1") is None
    assert admit("192.0.2.1") is None
    assert admit("192.0.2.1") is replies.TOO_MANY_FROM_ADDRESS


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


def test_the_data_budget_is_taken_in_steps_and_given_back_whole() -> None:
    budget = DataBudget(limit=200 * 1024)
    first, second = budget.reservation(), budget.reservation()
    assert first.cover(100)
    assert budget.used == Reservation.STEP  # a step at a time, not per line
    assert first.cover(Reservation.STEP)
    assert budget.used == Reservation.STEP
    assert first.cover(150 * 1024)
    assert second.cover(50 * 1024)
    assert budget.used == 200 * 1024
    assert not second.cover(50 * 1024 + 1)  # over the budget: refused, nothing taken
    assert budget.used == 200 * 1024
    first.release()
    first.release()  # twice is harmless
    assert budget.used == 50 * 1024
    assert second.cover(120 * 1024)
    second.release()
    assert budget.used == 0
