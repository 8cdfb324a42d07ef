"""Upstream faults against software nobody here wrote: Postfix's smtp-sink, told to refuse
(-r: 450, -f: 500), to hang up (-q) or to be slow (-w) at each stage. The client's reply
is the upstream's for refusals, and a 451 of our own for a lost or slow upstream; nothing
is ever answered 250 that the upstream did not accept."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from tests.faults.nothing_lost import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("smtp-sink") is None, reason="smtp-sink (Debian postfix) is not installed"
)


@asynccontextmanager
async def smtp_sink(*options: str) -> AsyncIterator[int]:
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = await asyncio.create_subprocess_exec(
        "smtp-sink", *user, *options, f"127.0.0.1:{port}", "64",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield port
    finally:
        process.terminate()
        await process.wait()


@pytest.mark.parametrize(
    ("options", "stage", "code"),
    [
        (("-r", "mail"), "mail", 450),
        (("-f", "mail"), "mail", 500),
        (("-r", "rcpt"), "rcpt", 450),
        (("-f", "rcpt"), "rcpt", 500),
        (("-r", "."), "data", 450),
        (("-f", "."), "data", 500),
        (("-q", "."), "data", 451),  # hangs up after the final dot: lost
        (("-q", "rcpt"), "rcpt", 451),
        (("-w", "3"), "data", 451),  # slower than [upstream] timeout
    ],
)
async def test_smtp_sink_faults(
    tmp_path: Path, options: tuple[str, ...], stage: str, code: int
) -> None:
    issuer = TestIssuer.generate("k1")
    async with smtp_sink(*options) as sink_port:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=sink_port, upstream={"timeout": 1}
        )
        async with running_gateway(config) as gateway:
            result = await FakeDevice(issuer).send(gateway.port)
    reply = {"mail": result.mail, "rcpt": result.rcpt.get("bob@example.test"), "data": result.data}
    assert reply[stage] is not None, result
    assert reply[stage][0] == code, result
    if stage != "data":
        assert result.data is None  # never reached DATA, so nothing could be accepted


@pytest.mark.parametrize("stage", ["mail", "data"])
async def test_upstream_421_is_a_451_for_the_client_whose_session_goes_on(
    tmp_path: Path, stage: str
) -> None:
    from gateway.testing.harness import gateway_with_upstream

    issuer = TestIssuer.generate("k1")
    async with gateway_with_upstream(tmp_path, issuer) as (gw, upstream):
        reply = "421 4.3.2 Upstream shutting down"
        if stage == "mail":
            upstream.faults.mail_reply = reply
        else:
            upstream.faults.data_reply = reply
        result = await FakeDevice(issuer).send(gw.port)
        got = result.mail if stage == "mail" else result.data
        assert got == (451, "4.3.2 upstream: Upstream shutting down")
        assert upstream.messages == []
