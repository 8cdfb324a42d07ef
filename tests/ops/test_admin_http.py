"""The admin port: /livez, /readyz, /metrics after real traffic, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from gateway.ops.admin_http import AdminServer
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " ") or (
            line.startswith(line_start + "{") and line_start.endswith("}")
        ):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting {line_start!r}")


async def test_health_and_metrics_after_real_traffic(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": tiktok_ban("hold")}) as (
        gateway,
        _,
    ):
        assert gateway.admin_port is not None
        assert await http_get(gateway.admin_port, "/livez") == (200, "ok\n")
        status, body = await http_get(gateway.admin_port, "/readyz")
        assert (status, body) == (
            200,
            f"ready {gateway.server.services.policies.current.version}\n",
        )
        assert (await http_get(gateway.admin_port, "/nope"))[0] == 404

        phone = FakeDevice(issuer)
        await phone.send(gateway.port)  # allowed, relayed
        phone.install(TIKTOK)
        await phone.send(gateway.port)  # held
        await phone.send(gateway.port, token="not-a-token")  # refused token
        await asyncio.sleep(0.5)  # one release tick updates the held gauge

        status, text = await http_get(gateway.admin_port, "/metrics")
        version = gateway.server.services.policies.current.version
    assert status == 200
    assert metric(text, "gateway_sessions_total") == 3
    assert metric(text, 'gateway_auth_total{result="ok"}') == 2
    assert metric(text, 'gateway_auth_total{result="failed"}') == 1
    assert metric(text, 'gateway_token_failures_total{reason="malformed"}') == 1
    assert metric(text, 'gateway_decisions_total{action="allow",policy="none"}') == 1
    assert metric(text, 'gateway_decisions_total{action="hold",policy="remove-tiktok"}') == 1
    assert metric(text, 'gateway_relay_total{result="accepted",stage="data"}') == 1
    assert metric(text, "gateway_relay_seconds_count") == 1
    assert metric(text, "gateway_held_messages") == 1
    assert metric(text, "gateway_policy_reload_last_success") == 1
    assert metric(text, f'gateway_policy_version_info{{version="{version}"}}') == 1


async def test_sigterm_drains_a_message_in_flight(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        upstream.faults.delay = 2.0  # the message is still in flight when SIGTERM arrives
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--grace", "10",
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert process.stderr is not None
        try:
            ports: dict[str, int] = {}
            async with asyncio.timeout(15):
                while len(ports) < 2:
                    event = json.loads(await process.stderr.readline())
                    if event["event"] == "listening":
                        ports["smtp"] = int(event["submission"].rsplit(":", 1)[1])
                    elif event["event"] == "admin_listening":
                        ports["admin"] = int(event["admin"].rsplit(":", 1)[1])
            drain = asyncio.create_task(process.stderr.read())
            sending = asyncio.create_task(FakeDevice(issuer).send(ports["smtp"]))
            await asyncio.sleep(1.0)  # DATA sent; the upstream is still thinking
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert await http_get(ports["admin"], "/readyz") == (503, "not ready: draining\n")
            result = await sending
            assert result.data == (250, "2.0.0 Message accepted for delivery")
            assert await asyncio.wait_for(process.wait(), timeout=10) == 0
            drain.cancel()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert len(upstream.messages) == 1


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {
        name.lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, body


async def test_keep_alive_clients_do_not_hold_up_stop() -> None:
    """A scraper keeping its connection open (and one that connected but sent nothing)
    must not delay the gateway's shutdown: stop() closes them and returns promptly."""
    server = AdminServer({"/livez": lambda: (200, "text/plain", b"ok\n")})
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):  # two requests on one connection: it is kept alive
            writer.write(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            status, headers, body = await asyncio.wait_for(_read_response(reader), timeout=5)
            assert (status, body) == (200, b"ok\n")
            assert headers.get("connection", "keep-alive").lower() != "close"
        started = time.monotonic()
        await asyncio.wait_for(server.stop(), timeout=10)
        assert time.monotonic() - started < 2.0
        # Both connections were closed by the server, not left dangling.
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        assert await asyncio.wait_for(idle_reader.read(), timeout=5) == b""
    finally:
        writer.close()
        idle_writer.close()


async def test_only_get_and_head_on_known_paths() -> None:
    server = AdminServer({"/livez": lambda: (200, "text/plain", b"ok\n")})
    port = await server.start("127.0.0.1", 0)
    try:
        for request, expected in (
            (b"HEAD /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200),
            (
                b"POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                405,
            ),
            (b"GET /livez?probe=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), timeout=5)
            writer.close()
            assert int(response.split()[1]) == expected, request
            if request.startswith(b"HEAD"):
                assert response.endswith(b"\r\n\r\n")  # no body
    finally:
        await server.stop()
