"""Abuse limits: connections (with a budget for unauthenticated ones), messages per user,
the delay after a failed AUTH.

Pure bookkeeping: callers pass the monotonic time in, so the limits are trivial to test
and immune to wall-clock jumps. Mobile carriers put many phones behind one address
(CGNAT), which is why the per-address defaults are generous (docs/operations.md).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway import replies
from gateway.replies import Reply

_PRUNE_AT = 10_000  # tracked keys before idle ones are first swept


def _next_sweep(size_after_sweep: int) -> int:
    """Sweep again only once the table has doubled: when most keys are live (thousands of
    active users, or an attack from thousands of addresses), sweeping on every call
    would make each call O(n)."""
    return max(_PRUNE_AT, 2 * size_after_sweep)


def address_key(ip: str) -> str:
    """What the per-address limits count: an IPv4 address, or an IPv6 /64. One subscriber
    gets a whole /64, so counting single IPv6 addresses would let a client rotate past
    every limit. IPv4-mapped IPv6 addresses count as their IPv4 address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Admission(Generic[K]):
    """The answer to a new connection: refused (nothing counted), or admitted, possibly at
    the cost of ``shed``, an idle unauthenticated session the caller must close."""

    refusal: Reply | None = None
    shed: K | None = None


class ConnectionLimits(Generic[K]):
    """Concurrent connections in total, per client address, and before AUTH.

    A connection that has not authenticated is cheap to open and holds a slot for up to
    the idle timeout, so idle sockets from a handful of addresses could fill every slot
    and lock out devices with valid tokens. Unauthenticated sessions therefore have their
    own budget (``unauthenticated``, within ``total``), and when a newcomer finds the total,
    that budget or its address's share full, the unauthenticated session idle the longest
    (in the same address for the per-address limit) is shed to make room. Authenticated
    sessions are never shed: only they can be told from an attacker's sockets. The
    pre-AUTH idle timeout shortens while the unauthenticated budget is half used.

    Keys are the caller's (one per session); times are monotonic seconds passed in.
    """

    def __init__(
        self,
        total: int,
        per_ip: int,
        unauthenticated: int | None = None,
        pre_auth_timeout_under_load: float | None = None,
    ) -> None:
        self.total = total
        self.per_ip = per_ip
        self.unauthenticated = min(total, unauthenticated or total)
        self.pre_auth_timeout_under_load = pre_auth_timeout_under_load
        self.open = 0
        self._by_ip: dict[str, int] = {}
        self._ip_of: dict[K, str] = {}
        # Unauthenticated sessions by last activity, the longest idle first: in all, and
        # per address.
        self._idle: OrderedDict[K, float] = OrderedDict()
        self._idle_by_ip: dict[str, OrderedDict[K, float]] = {}

    def admit(self, key: K, ip: str, now: float) -> Admission[K]:
        """Count the session in (unauthenticated, active at ``now``), or say why not."""
        ip = address_key(ip)
        shed: K | None = None
        if self._by_ip.get(ip, 0) >= self.per_ip:
            shed = _first(self._idle_by_ip.get(ip))
            if shed is None:
                return Admission(refusal=replies.TOO_MANY_FROM_ADDRESS)
            self.release(shed)
        elif self.open >= self.total or len(self._idle) >= self.unauthenticated:
            shed = _first(self._idle)
            if shed is None:
                return Admission(refusal=replies.TOO_MANY_CONNECTIONS)
            self.release(shed)
        self.open += 1
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1
        self._ip_of[key] = ip
        self._idle[key] = now
        self._idle_by_ip.setdefault(ip, OrderedDict())[key] = now
        return Admission(shed=shed)

    def active(self, key: K, now: float) -> None:
        """An unauthenticated session sent a command: it is no longer the longest idle."""
        if key not in self._idle:
            return
        self._idle[key] = now
        self._idle.move_to_end(key)
        by_ip = self._idle_by_ip[self._ip_of[key]]
        by_ip[key] = now
        by_ip.move_to_end(key)

    def authenticated(self, key: K) -> None:
        """The session proved who it is: never shed from now on."""
        if self._idle.pop(key, None) is not None:
            self._forget_idle(key)

    def pre_auth_timeout(self) -> float | None:
        """The idle timeout for unauthenticated sessions while the unauthenticated budget
        is at least half used; None otherwise (the usual idle timeout applies)."""
        if self.pre_auth_timeout_under_load is None:
            return None
        if 2 * len(self._idle) >= self.unauthenticated:
            return self.pre_auth_timeout_under_load
        return None

    @property
    def unauthenticated_open(self) -> int:
        return len(self._idle)

    def release(self, key: K) -> None:
        """The session ended (or was shed); a key already released is ignored."""
        ip = self._ip_of.pop(key, None)
        if ip is None:
            return
        self.open -= 1
        left = self._by_ip.get(ip, 1) - 1
        if left > 0:
            self._by_ip[ip] = left
        else:
            self._by_ip.pop(ip, None)
        if self._idle.pop(key, None) is not None:
            self._forget_idle(key, ip)

    def _forget_idle(self, key: K, ip: str | None = None) -> None:
        if ip is None:
            ip = self._ip_of[key]
        by_ip = self._idle_by_ip.get(ip)
        if by_ip is not None:
            by_ip.pop(key, None)
            if not by_ip:
                del self._idle_by_ip[ip]


def _first(ordered: OrderedDict[K, float] | None) -> K | None:
    if not ordered:
        return None
    return next(iter(ordered))


class MessageRate:
    """Messages per user per minute, as a token bucket: a burst of ``per_minute``, then a
    steady ``per_minute`` a minute. O(1) time and memory per user."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.refill_per_second = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, at)
        self._sweep_at = _PRUNE_AT

    def allow(self, user: str, now: float) -> bool:
        tokens, at = self._buckets.get(user, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.refill_per_second)
        if tokens < 1.0:
            self._buckets[user] = (tokens, now)
            return False
        self._buckets[user] = (tokens - 1.0, now)
        if len(self._buckets) > self._sweep_at:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        """Drop full buckets: a full bucket is the same as none."""
        full_after = self.capacity / self.refill_per_second
        self._buckets = {
            user: state for user, state in self._buckets.items() if now - state[1] < full_after
        }
        self._sweep_at = _next_sweep(len(self._buckets))


def auth_failure_delay(failures: int, first: float, longest: float) -> float:
    """Seconds to wait before answering a session's ``failures``-th failed AUTH: ``first``,
    doubling with each further failure, never more than ``longest``. The delay slows the
    failing session only; other sessions from the same address (carrier NAT) are not
    touched, and a valid token is never refused."""
    if failures <= 0:
        return 0.0
    return min(longest, first * 2.0 ** min(failures - 1, 32))


class DataBudget:
    """Message bytes in memory across all sessions (``[limits] data_bytes_in_flight``).

    Each transaction takes a :class:`Reservation`, grows it as DATA arrives and gives it
    back when the transaction ends, whatever happens. A message that does not fit is
    refused with 452 4.3.1 rather than risking the whole process (and every session in
    it) to the kernel's OOM killer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def available(self) -> int:
        return self.limit - self.used

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One transaction's share of the :class:`DataBudget`. Grown in steps, so that the
    budget is not touched for every line of a message."""

    STEP = 64 * 1024

    def __init__(self, budget: DataBudget) -> None:
        self._budget = budget
        self.held = 0

    def cover(self, total: int) -> bool:
        """Hold at least ``total`` bytes; False (and nothing more taken) if the budget
        cannot cover them."""
        if total <= self.held:
            return True
        budget = self._budget
        want = total - self.held
        if want > budget.available():
            return False
        take = min(max(want, self.STEP), budget.available())
        budget.used += take
        self.held += take
        return True

    def release(self) -> None:
        """Give everything back; safe to call more than once."""
        self._budget.used -= self.held
        self.held = 0
