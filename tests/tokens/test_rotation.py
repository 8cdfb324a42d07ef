"""Device-token keys rotate without a restart: an issuer's JWKS served on loopback, and key
files re-read on SIGHUP, over real SMTP sessions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.jwks import FakeJwksServer
from gateway.testing.upstream import FakeUpstream


def use_jwks(config: Path, url: str, refresh_seconds: float = 1) -> None:
    """Trust the issuer through its JWKS URL instead of the key file write_config made."""
    text = config.read_text()
    assert 'keys = ["issuer.jwks.json"]' in text
    config.write_text(
        text.replace(
            'keys = ["issuer.jwks.json"]',
            f'jwks_url = "{url}"\njwks_refresh_seconds = {refresh_seconds}',
        )
    )


async def eventually(check: Callable[[], object], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110  # polling a server we do not own
            await asyncio.sleep(0.05)


async def metric(admin_port: int, name: str, labels: str) -> float:
    return await asyncio.to_thread(_metric, admin_port, name, labels)


def _metric(admin_port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name}{{") and labels in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_rotated_jwks_key_works_at_once_and_a_withdrawn_one_stops(tmp_path: Path) -> None:
    old = TestIssuer.generate("2026-11")
    new = TestIssuer.generate("2026-12")
    with FakeJwksServer.running() as jwks:
        jwks.publish(old)
        async with FakeUpstream.running() as upstream:
            config = write_config(tmp_path, issuer=old, upstream_port=upstream.port)
            use_jwks(config, jwks.url, refresh_seconds=1)
            async with running_gateway(config) as gateway:
                assert jwks.requests == 1  # fetched at start
                old_phone = FakeDevice(old, device_id="phone-old")
                new_phone = FakeDevice(new, device_id="phone-new")
                old_token = old_phone.token()
                assert (await old_phone.send(gateway.port, token=old_token)).accepted

                # The MDM publishes its next key and signs with it straight away: the
                # unknown kid sends the gateway to the JWKS before it verifies.
                jwks.publish(old, new)
                fetched = jwks.requests
                assert (await new_phone.send(gateway.port)).accepted
                assert jwks.requests == fetched + 1

                # The old key is withdrawn. Within the refresh interval its tokens stop
                # working, the one verified (and cached) a moment ago included.
                jwks.publish(new)
                await eventually(
                    lambda: (
                        gateway.server.services.keyring.keys_of(old.issuer).keys() == {"2026-12"}
                    )
                )
                refused = await old_phone.send(gateway.port, token=old_token)
                assert refused.auth is not None
                assert refused.auth[0] == 535
                assert (await new_phone.send(gateway.port)).accepted

                # The issuer's web server fails: the last good set stays in force.
                jwks.status = 500
                failed_before = jwks.requests
                await eventually(lambda: jwks.requests >= failed_before + 2)
                assert (await new_phone.send(gateway.port)).accepted
                assert gateway.admin_port is not None
                labels = f'issuer="{old.issuer}",result="failed"'
                assert await metric(gateway.admin_port, "gateway_jwks_fetches_total", labels) >= 2
                assert await metric(gateway.admin_port, "gateway_jwks_keys", old.issuer) == 1
    assert len(upstream.messages) == 4


async def test_random_kids_cannot_make_the_gateway_hammer_the_issuer(tmp_path: Path) -> None:
    """An unknown kid costs one fetch per issuer per 10 s at most, however many arrive."""
    issuer = TestIssuer.generate("real")
    with FakeJwksServer.running() as jwks:
        jwks.publish(issuer)
        async with FakeUpstream.running() as upstream:
            # Failed AUTHs are slowed down per session (0.5 s each by default): that would
            # stretch the 20 attempts past the 10 s window this test is about.
            config = write_config(
                tmp_path, issuer=issuer, upstream_port=upstream.port,
                limits={"auth_failure_delay_seconds": 0.01},
            )  # fmt: skip
            use_jwks(config, jwks.url, refresh_seconds=3600)
            async with running_gateway(config) as gateway:
                phone = FakeDevice(issuer)
                started = time.monotonic()
                for n in range(20):
                    forged = issuer.sign(issuer.claims(), header={"kid": f"made-up-{n}"})
                    result = await phone.send(gateway.port, token=forged)
                    assert result.auth is not None
                    assert result.auth[0] == 535
                assert time.monotonic() - started < 10  # within one rate-limit window
                assert jwks.requests == 2  # the start, and one unknown-kid fetch


async def test_key_material_never_chooses_the_algorithm(tmp_path: Path) -> None:
    """An HMAC secret in the published JWKS (kty oct, alg HS256) is skipped: a token
    signed with it as HS256 is refused, and the issuer's real key keeps working."""
    import base64
    import hashlib
    import hmac

    issuer = TestIssuer.generate("real")
    secret = b"a shared secret the attacker knows"
    oct_key = {
        "kty": "oct",
        "kid": "hmac",
        "alg": "HS256",
        "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode(),
    }
    with FakeJwksServer.running() as jwks:
        jwks.publish(issuer, extra=[oct_key])
        async with FakeUpstream.running() as upstream:
            config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)
            use_jwks(config, jwks.url)
            async with running_gateway(config) as gateway:
                assert gateway.server.services.keyring.keys_of(issuer.issuer).keys() == {"real"}

                def b64(data: bytes) -> bytes:
                    return base64.urlsafe_b64encode(data).rstrip(b"=")

                header = b64(json.dumps({"alg": "HS256", "kid": "hmac", "typ": "JWT"}).encode())
                payload = b64(json.dumps(issuer.claims()).encode())
                signature = b64(hmac.new(secret, header + b"." + payload, hashlib.sha256).digest())
                forged = (header + b"." + payload + b"." + signature).decode()
                phone = FakeDevice(issuer)
                refused = await phone.send(gateway.port, token=forged)
                assert refused.auth is not None
                assert refused.auth[0] == 535
                assert (await phone.send(gateway.port)).accepted


def test_a_jwks_url_must_be_https_or_loopback(tmp_path: Path) -> None:
    from gateway.config.settings import load_settings
    from gateway.errors import SettingsError

    issuer = TestIssuer.generate("k")
    config = write_config(tmp_path, issuer=issuer, upstream_port=25)
    use_jwks(config, "http://mdm.example.test/jwks.json")
    with pytest.raises(SettingsError) as refused:
        load_settings(config)
    assert "jwks_url" in str(refused.value)
    assert "http is allowed to loopback addresses only; use https" in str(refused.value)


@pytest.mark.slow
async def test_sighup_rereads_key_files_in_a_running_gateway_serve(tmp_path: Path) -> None:
    """`gateway serve` as a process: the key file is replaced (the old key withdrawn, the
    new one added) and SIGHUP makes it so, without a restart."""
    old = TestIssuer.generate("2026-11")
    new = TestIssuer.generate("2026-12")
    async with FakeUpstream.running() as upstream:
        config = write_config(tmp_path, issuer=old, upstream_port=upstream.port)
        text = config.read_text().replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"', 1)
        config.write_text(text)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert process.stdout is not None
        lines: list[dict[str, object]] = []

        async def next_event(name: str) -> dict[str, object]:
            assert process.stdout is not None
            async with asyncio.timeout(15):
                while True:
                    line = await process.stdout.readline()
                    if not line:
                        raise AssertionError(f"gateway ended before logging {name}: {lines}")
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    lines.append(event)
                    if event.get("event") == name:
                        return event

        try:
            listening = await next_event("listening")
            port = int(str(listening["submission"]).rsplit(":", 1)[1])
            old_phone = FakeDevice(old, device_id="phone-old")
            new_phone = FakeDevice(new, device_id="phone-new")
            old_token = old_phone.token()
            assert (await old_phone.send(port, token=old_token)).accepted
            assert (await new_phone.send(port)).auth == (
                535,
                "5.7.8 Device token refused (unknown_kid)",
            )

            new.write_jwks(tmp_path / "issuer.jwks.json")  # the old key withdrawn, the new one in
            os.kill(process.pid, signal.SIGHUP)
            reloaded = await next_event("key_files_reloaded")
            assert reloaded["changed"] == [old.issuer]
            assert (await new_phone.send(port)).accepted
            refused = await old_phone.send(port, token=old_token)  # cached a moment ago
            assert refused.auth is not None
            assert refused.auth[0] == 535
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
                    await process.wait()
    assert len(upstream.messages) == 2


def test_explain_fetches_the_issuers_jwks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway explain` run on a JWKS-only configuration verifies as the server would."""
    from gateway.cli import main

    issuer = TestIssuer.generate("published")
    with FakeJwksServer.running() as jwks:
        jwks.publish(issuer)
        config = write_config(tmp_path, issuer=issuer, upstream_port=25)
        use_jwks(config, jwks.url)
        (tmp_path / "token.jwt").write_text(issuer.token())
        code = main(
            ["explain", "--config", str(config), "--token", str(tmp_path / "token.jwt"), "--json"]
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 0
        assert report["token"]["valid"] is True
        assert jwks.requests == 1


def test_an_issuer_needs_key_files_or_a_jwks_url(tmp_path: Path) -> None:
    from gateway.config.settings import load_settings
    from gateway.errors import SettingsError

    issuer = TestIssuer.generate("k")
    config = write_config(tmp_path, issuer=issuer, upstream_port=25)
    config.write_text(config.read_text().replace('keys = ["issuer.jwks.json"]\n', ""))
    with pytest.raises(SettingsError) as refused:
        load_settings(config)
    assert "keys: give key files (keys) or a jwks_url" in str(refused.value)
