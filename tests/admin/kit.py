"""A running gateway with the admin API, two admin tokens and real held mail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.admin.tokens import Role, add_token
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import RunningGateway, running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban

CSRF = "X-Gateway-CSRF"


@dataclass
class Admin:
    """An admin API client: a token, its CSRF value, real HTTP."""

    http: aiohttp.ClientSession
    base: str
    token: str
    csrf: str = ""

    def headers(self, csrf: bool = True) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if csrf and self.csrf:
            headers[CSRF] = self.csrf
        return headers

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        async with self.http.get(self.base + path, params=params, headers=self.headers()) as r:
            return r.status, await r.json()

    async def post(
        self, path: str, *, csrf: bool = True, data: str | None = None, **params: Any
    ) -> tuple[int, Any]:
        async with self.http.post(
            self.base + path, params=params, data=data, headers=self.headers(csrf)
        ) as r:
            return r.status, await r.json()


@dataclass
class Console:
    gateway: RunningGateway
    upstream: FakeUpstream
    operator: Admin
    viewer: Admin
    http: aiohttp.ClientSession
    base: str
    issuer: TestIssuer


@asynccontextmanager
async def console(
    tmp_path: Path, issuer: TestIssuer, *, tokens: bool = True, notices: bool = False
) -> AsyncIterator[Console]:
    """The TikTok ban holding mail; tokens ``ops`` (operator) and ``audrey`` (viewer);
    ``notices``: notice mails on (off by default, so tests count only their own mail)."""
    tokens_file = tmp_path / "admin-tokens"
    operator_token = add_token(tokens_file, "ops", Role.OPERATOR)
    viewer_token = add_token(tokens_file, "audrey", Role.VIEWER)
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": tiktok_ban("hold")},
            admin={"tokens_file": str(tokens_file)} if tokens else {},
            notices=notices,
        )
        async with (
            running_gateway(config, release_tick=60) as gateway,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
        ):
            base = f"http://127.0.0.1:{gateway.admin_port}/api/v1"
            operator = Admin(http, base, operator_token)
            viewer = Admin(http, base, viewer_token)
            if tokens:
                for admin in (operator, viewer):
                    status, session = await admin.get("/session")
                    assert status == 200, session
                    admin.csrf = session["csrf"]
            yield Console(gateway, upstream, operator, viewer, http, base, issuer)


def carol(issuer: TestIssuer) -> FakeDevice:
    return FakeDevice(issuer, user="carol@example.test", device_id="carol-phone", apps={TIKTOK})


async def hold(device: FakeDevice, port: int, subject: str) -> None:
    result = await device.send(port, message=make_message(subject=subject, sender=device.user))
    assert result.data == (250, "2.6.0 held: Remove TikTok."), result
