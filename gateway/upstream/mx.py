"""MX routing for direct delivery (upstream mode "mx"), with dnspython's async resolver.

RFC 5321 s 5.1: MX records in preference order (equal preferences shuffled); no MX means
the domain itself is the host (implicit MX); RFC 7505: a single "." MX means the domain
accepts no mail (null MX), a permanent failure. Answers are cached for their TTL.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.config.settings import Endpoint
from gateway.replies import Reply
from gateway.upstream.relay import Target

NULL_MX = Reply(556, "5.1.10", "Recipient domain does not accept mail (null MX, RFC 7505)")
NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Recipient domain does not exist")
DNS_TEMPFAIL = Reply(
    451, "4.4.3", "DNS lookup of the recipient domain failed; please try again later"
)
MAX_CACHE_ENTRIES = 10_000


def configured_resolver(
    nameservers: Sequence[Endpoint], lifetime: float
) -> dns.asyncresolver.Resolver | None:
    """A resolver asking exactly these servers; None means the system's (resolv.conf)."""
    if not nameservers:
        return None
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers]
    resolver.lifetime = lifetime
    return resolver


class MxRouter:
    """Resolves a recipient domain to the upstream targets to try, in order."""

    def __init__(
        self,
        port: int = 25,
        resolver: dns.asyncresolver.Resolver | None = None,
        tls: str = "opportunistic",  # STARTTLS whenever the MX offers it (RFC 7435)
        verify: bool = False,  # MX certificates rarely match their names: unauthenticated
    ) -> None:
        self._port = port
        self._resolver = resolver or dns.asyncresolver.Resolver()
        self._tls = tls
        self._verify = verify
        self._cache: dict[str, tuple[float, Sequence[Target] | Reply]] = {}

    async def __call__(self, domain: str) -> Sequence[Target] | Reply:
        domain = domain.lower().rstrip(".")
        cached = self._cache.get(domain)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        result, ttl = await self._lookup(domain)
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
        if ttl > 0:
            self._cache[domain] = (now + ttl, result)
        return result

    async def _lookup(self, domain: str) -> tuple[Sequence[Target] | Reply, float]:
        try:
            answer = await self._resolver.resolve(domain, dns.rdatatype.MX)
        except dns.resolver.NXDOMAIN:
            return NO_SUCH_DOMAIN, 60
        except dns.resolver.NoAnswer:
            return [self._target(domain)], 300  # implicit MX: the domain's own address
        except (dns.exception.DNSException, OSError):
            return DNS_TEMPFAIL, 0
        records = list(answer)
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else 60.0
        if len(records) == 1 and str(records[0].exchange) == ".":
            return NULL_MX, ttl
        by_preference: dict[int, list[str]] = {}
        for record in records:
            host = str(record.exchange).rstrip(".")
            if host:
                by_preference.setdefault(record.preference, []).append(host)
        targets: list[Target] = []
        for preference in sorted(by_preference):
            hosts = by_preference[preference]
            random.shuffle(hosts)  # spread load across equal preferences (RFC 5321 s 5.1)
            targets.extend(self._target(h) for h in hosts)
        return targets, ttl

    def _target(self, host: str) -> Target:
        return Target(host, self._port, self._tls, self._verify)
