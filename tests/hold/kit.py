"""Shared by the hold tests: a gateway holding the story's phones' mail, and /readyz."""

from __future__ import annotations

import urllib.error
import urllib.request
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from gateway.testing.harness import RunningGateway, gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import tiktok_ban


def held_mail_gateway(
    tmp_path: Path, issuer: TestIssuer, *, release_tick: float = 60, **config: Any
) -> AbstractAsyncContextManager[tuple[RunningGateway, FakeUpstream]]:
    """A gateway holding the story's phones' mail, relaying to a fake upstream; release
    passes run when a test says so (the periodic tick is a minute away)."""
    return gateway_with_upstream(
        tmp_path, issuer, {"ban.toml": tiktok_ban("hold")}, release_tick=release_tick, **config
    )


def readyz(gateway: RunningGateway) -> tuple[int, str]:
    """GET /readyz (blocking: call it with asyncio.to_thread from a test's event loop)."""
    url = f"http://127.0.0.1:{gateway.admin_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
