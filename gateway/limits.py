"""Abuse limits: connections, messages per user, the delay after a failed AUTH.

Pure bookkeeping: callers pass the monotonic time in, so the limits are trivial to test
and immune to wall-clock jumps. Mobile carriers put many phones behind one address
(CGNAT), which is why the per-address defaults are generous (docs/operations.md).
"""

from __future__ import annotations

import ipaddress

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


class ConnectionLimits:
    """Concurrent connections in total and per client address."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self._by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Reply | None:
        """Count the connection in and return None, or return the refusal (nothing counted)."""
        if self.open >= self.total:
            return replies.TOO_MANY_CONNECTIONS
        ip = address_key(ip)
        current = self._by_ip.get(ip, 0)
        if current >= self.per_ip:
            return replies.TOO_MANY_FROM_ADDRESS
        self.open += 1
        self._by_ip[ip] = current + 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        ip = address_key(ip)
        left = self._by_ip.get(ip, 1) - 1
        if left > 0:
            self._by_ip[ip] = left
        else:
            self._by_ip.pop(ip, None)


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
