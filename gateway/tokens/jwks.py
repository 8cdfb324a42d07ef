"""Fetching issuers' published JWKS, so that MDM signing keys rotate without a restart.

Each issuer with a ``jwks_url`` is fetched at start, every ``jwks_refresh``, and at once
when a token names a kid we have not seen (a new key is usually published shortly before
it signs anything). Unknown-kid fetches are rate-limited per issuer, so a client sending
random kids cannot make the gateway hammer the issuer. A failed fetch keeps the last good
set: an MDM's web server being down must not lock every phone out.

The HTTP client is the standard library's (run in a thread, with a timeout and a size
cap): one GET per issuer every few minutes needs nothing more. The document is parsed by
:func:`gateway.config.keys.keys_from_jwks`, which ignores each key's ``alg``: the
algorithms stay the gateway's fixed allow-list.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from gateway.config.keys import KeyFileError, PublicKey, keys_from_jwks
from gateway.config.settings import Issuer
from gateway.tokens.keyring import KeyRing

log = structlog.get_logger("gateway.jwks")

FETCH_TIMEOUT = 5.0  # seconds for one fetch, connect to last byte
MAX_DOCUMENT_BYTES = 512 * 1024  # a JWKS is a few KB; anything this big is not one
UNKNOWN_KID_INTERVAL = 10.0  # at most one fetch per issuer this often for unknown kids


class JwksFetchError(Exception):
    """A fetch that gave no usable key set; the message says why, for the log."""


def fetch_jwks(url: str, timeout: float = FETCH_TIMEOUT) -> tuple[dict[str, PublicKey], list[str]]:
    """GET ``url`` and parse it as a JWKS: (keys by kid, skipped keys). Blocking."""
    request = urllib.request.Request(  # noqa: S310  # the scheme is checked at configuration
        url, headers={"Accept": "application/jwk-set+json, application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = response.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # the error carries the open response
        raise JwksFetchError(f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise JwksFetchError(f"cannot fetch: {str(reason)[:200]}") from exc
    if len(body) > MAX_DOCUMENT_BYTES:
        raise JwksFetchError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise JwksFetchError("not JSON") from exc
    try:
        keys, skipped = keys_from_jwks(document, url, skip_unsupported=True)
    except KeyFileError as exc:
        raise JwksFetchError(str(exc)) from exc
    if not keys:
        raise JwksFetchError("no usable key (Ed25519 or P-256) in the document")
    return keys, skipped


@dataclass(frozen=True)
class FetchOutcome:
    issuer: str
    ok: bool
    keys: int  # keys in force for the issuer's JWKS after the fetch
    reason: str  # "start", "schedule" or "unknown_kid"
    error: str | None = None


Fetch = Callable[[str], tuple[dict[str, PublicKey], list[str]]]


class JwksRefresher:
    """Keeps each JWKS-publishing issuer's fetched keys in the key ring current."""

    def __init__(
        self,
        keyring: KeyRing,
        issuers: Mapping[str, Issuer],
        *,
        on_fetch: Callable[[FetchOutcome], None] = lambda _: None,
        fetch: Fetch = fetch_jwks,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keyring = keyring
        self.issuers = {name: i for name, i in issuers.items() if i.jwks_url is not None}
        self.on_fetch = on_fetch
        self._fetch = fetch
        self._monotonic = monotonic
        self._locks = {name: asyncio.Lock() for name in self.issuers}
        self._last_unknown_kid: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.issuers)

    async def refresh(self, issuer: str, reason: str) -> bool:
        """Fetch one issuer's JWKS now; True when the key set changed. Concurrent callers
        share one fetch; failures keep the last good set."""
        config = self.issuers.get(issuer)
        if config is None or config.jwks_url is None:
            return False
        lock = self._locks[issuer]
        if lock.locked():  # a fetch is under way: wait for it rather than start another
            async with lock:
                return False
        async with lock:
            try:
                keys, skipped = await asyncio.wait_for(
                    asyncio.to_thread(self._fetch, config.jwks_url), FETCH_TIMEOUT + 1
                )
            except (JwksFetchError, TimeoutError) as exc:
                error = str(exc) or "timed out"
                log.warning("jwks_fetch_failed", issuer=issuer, reason=reason, error=error)
                self.on_fetch(
                    FetchOutcome(issuer, False, self._counts.get(issuer, 0), reason, error)
                )
                return False
            changed = self.keyring.set_fetched(issuer, keys)
            self._counts[issuer] = len(keys)
            if skipped:
                log.info("jwks_keys_skipped", issuer=issuer, skipped=skipped[:20])
            log.info(
                "jwks_fetched",
                issuer=issuer,
                reason=reason,
                kids=sorted(keys)[:50],
                changed=changed,
            )
            self.on_fetch(FetchOutcome(issuer, True, len(keys), reason))
            return changed

    async def unknown_kid(self, issuer: str) -> bool:
        """A token named a kid we do not know: fetch at once, unless this issuer was
        fetched for that reason in the last ``UNKNOWN_KID_INTERVAL`` seconds."""
        now = self._monotonic()
        last = self._last_unknown_kid.get(issuer)
        if last is not None and now - last < UNKNOWN_KID_INTERVAL:
            return False
        self._last_unknown_kid[issuer] = now
        return await self.refresh(issuer, "unknown_kid")

    async def start(self) -> None:
        """The first fetch of every issuer, side by side (a failure is logged: key files
        and the next scheduled fetch still apply)."""
        await asyncio.gather(*(self.refresh(name, "start") for name in self.issuers))

    async def run(self) -> None:
        """Refresh each issuer on its own schedule, until cancelled."""
        due = {
            name: self._monotonic() + i.jwks_refresh.total_seconds()
            for name, i in self.issuers.items()
        }
        while due:
            name = min(due, key=due.__getitem__)
            await asyncio.sleep(max(0.0, due[name] - self._monotonic()))
            await self.refresh(name, "schedule")
            due[name] = self._monotonic() + self.issuers[name].jwks_refresh.total_seconds()
