"""The story against a real Dovecot 2.3 (and nginx) started from the shipped deploy/
files, asking `gateway serve`: real clients (imaplib LOGIN, AUTHENTICATE XOAUTH2 and
OAUTHBEARER, poplib USER/PASS, curl --oauth2-bearer) see what docs/sync.md promises.

Blocking clients run in threads: the gateway answers Dovecot from this event loop."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import poplib
import shutil
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from gateway.testing.dovecot import (
    MASTER_USER,
    DovecotPorts,
    DovecotUnavailable,
    TemporaryDovecot,
    dovecot_binary,
    free_port,
    temporary_dovecot,
)
from gateway.testing.harness import RunningGateway
from gateway.testing.issuer import TestIssuer
from gateway.testing.nginx import NginxUnavailable, nginx_binary, temporary_nginx
from tests.sync.test_dovecot import (
    BACKEND_PASSWORD,
    CLIENT_SECRET,
    NGINX_SECRET,
    USER,
    sync_gateway,
)

pytestmark = pytest.mark.slow
T = TypeVar("T")

QUARANTINE = "quarantine+alice@example.test"
HOLD = """
[[policy]]
id = "remove-holdapp"
match.apps_any = ["com.hold"]
action = "hold"
message = "Remove HoldApp to read your mail."
state = "enforce"
"""


@dataclass
class Stack:
    gateway: RunningGateway
    dovecot: TemporaryDovecot


@asynccontextmanager
async def real_stack(tmp_path: Path, issuer: TestIssuer) -> AsyncIterator[Stack]:
    """`gateway serve` with [sync] on, and a Dovecot from deploy/dovecot/ asking it; the
    gateway sends nginx's allowed logins to that Dovecot as the master user."""
    try:
        dovecot_binary()
    except DovecotUnavailable as exc:
        pytest.skip(str(exc))
    ports = DovecotPorts.free()
    sync = {"imap_backend": f"127.0.0.1:{ports.imap}", "backend_master_user": MASTER_USER}
    async with sync_gateway(tmp_path, issuer, sync) as (gateway, _):
        (gateway.policy_dir / "hold.toml").write_text(HOLD)
        assert (await gateway.server.reload("test")).ok
        async with temporary_dovecot(
            gateway_url=f"http://127.0.0.1:{gateway.sync_port}/",
            client_secret=CLIENT_SECRET,
            master_password=BACKEND_PASSWORD,
            ports=ports,
        ) as dovecot:
            yield Stack(gateway, dovecot)


async def admin_metrics(gateway: RunningGateway) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as response,
    ):
        return await response.text()


def deliver(dovecot: TemporaryDovecot, to: str, subject: str) -> None:
    """A message into a real mailbox, through Dovecot's LMTP."""
    message = EmailMessage()
    message["From"] = "it@example.test"
    message["To"] = to
    message["Subject"] = subject
    message.set_content("Hello.\n")
    with smtplib.LMTP("127.0.0.1", dovecot.ports.lmtp, timeout=10) as lmtp:
        refused = lmtp.send_message(message, to_addrs=[to])
    assert refused == {}


def inbox_subjects(imap: imaplib.IMAP4) -> list[str]:
    """The Subject lines in INBOX of a logged-in session; logs out."""
    try:
        status, data = imap.select("INBOX", readonly=True)
        assert status == "OK", data
        count = int(data[0] or b"0")
        subjects = []
        for number in range(1, count + 1):
            status, parts = imap.fetch(str(number), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert status == "OK"
            header = parts[0]
            assert isinstance(header, tuple)
            subjects.append(header[1].decode().strip())
        return subjects
    finally:
        imap.logout()


def imap_login(port: int, user: str, password: str) -> list[str]:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    imap.login(user, password)
    return inbox_subjects(imap)


def imap_refusal(port: int, user: str, password: str) -> str:
    """The text of the tagged NO a LOGIN gets."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error) as refused:
            imap.login(user, password)
        return (
            str(refused.value.args[0], "utf-8")
            if isinstance(refused.value.args[0], bytes)
            else str(refused.value.args[0])
        )
    finally:
        imap.shutdown()


def imap_authenticate(port: int, mechanism: str, response: bytes) -> list[str]:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    imap.authenticate(mechanism, lambda _challenge: response)
    return inbox_subjects(imap)


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str, port: int) -> bytes:
    """RFC 7628 s 3.1: the GS2 header, then key=value pairs separated by ^A."""
    return f"n,a={user},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def pop3_login(port: int, user: str, password: str) -> int:
    """The number of messages POP3 USER/PASS sees."""
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        pop.pass_(password)
        return pop.stat()[0]
    finally:
        pop.quit()


def pop3_refusal(port: int, user: str, password: str) -> str:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        with pytest.raises(poplib.error_proto) as refused:
            pop.pass_(password)
        return bytes(refused.value.args[0]).decode()
    finally:
        pop.close()


async def thread(function: Callable[..., T], *args: object) -> T:
    async with asyncio.timeout(30):
        return await asyncio.to_thread(function, *args)


async def test_a_compliant_phone_reads_its_real_inbox_with_every_login_method(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    async with real_stack(tmp_path, issuer) as stack:
        dovecot = stack.dovecot
        await thread(deliver, dovecot, USER, "Quarterly figures")
        token = issuer.token(subject=USER)
        imap = dovecot.ports.imap
        assert await thread(imap_login, imap, USER, token) == ["Subject: Quarterly figures"]
        assert await thread(imap_authenticate, imap, "XOAUTH2", xoauth2(USER, token)) == [
            "Subject: Quarterly figures"
        ]
        assert await thread(
            imap_authenticate, imap, "OAUTHBEARER", oauthbearer(USER, token, imap)
        ) == ["Subject: Quarterly figures"]
        assert await thread(pop3_login, dovecot.ports.pop3, USER, token) == 1
        # a warning logs in too (the notice in the inbox is not there yet)
        warned = issuer.token(subject=USER, apps=["com.warn"])
        assert await thread(imap_login, imap, USER, warned) == ["Subject: Quarterly figures"]
        log = dovecot.log_text()
        assert f"user=<{USER}>, method=PLAIN" in log
        assert f"user=<{USER}>, method=XOAUTH2" in log
        assert f"user=<{USER}>, method=OAUTHBEARER" in log


async def test_curl_with_a_bearer_token_fetches_the_message(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed (apt-get install curl)")
    issuer = TestIssuer.generate("k1")
    async with real_stack(tmp_path, issuer) as stack:
        await thread(deliver, stack.dovecot, USER, "Fetched by curl")
        process = await asyncio.create_subprocess_exec(
            curl, "--silent", "--show-error", "--max-time", "10",
            "--user", f"{USER}:", "--oauth2-bearer", issuer.token(subject=USER),
            f"imap://127.0.0.1:{stack.dovecot.ports.imap}/INBOX;UID=1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err
        assert b"Subject: Fetched by curl" in out
        assert f"user=<{USER}>, method=OAUTHBEARER" in stack.dovecot.log_text()


async def test_refusals_reach_imap_and_pop3_clients_with_the_policy_message(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    forger = TestIssuer.generate("k1")  # same issuer and kid, another key
    async with real_stack(tmp_path, issuer) as stack:
        imap, pop3 = stack.dovecot.ports.imap, stack.dovecot.ports.pop3
        banned = issuer.token(subject=USER, apps=["com.reject"])
        assert await thread(imap_refusal, imap, USER, banned) == (
            "[CONTACTADMIN] RejectApp is banned."
        )
        assert await thread(pop3_refusal, pop3, USER, banned) == (
            "-ERR [AUTH] RejectApp is banned."
        )
        deferred = issuer.token(subject=USER, apps=["com.defer"])
        assert (await thread(imap_refusal, imap, USER, deferred)).startswith("[UNAVAILABLE] ")
        assert (await thread(pop3_refusal, pop3, USER, deferred)).startswith("-ERR [SYS/TEMP] ")
        expired = issuer.token(subject=USER, issued_at=datetime.now(UTC) - timedelta(hours=2))
        for token in (forger.token(subject=USER), expired, "not-a-token"):
            assert (await thread(imap_refusal, imap, USER, token)).startswith(
                "[AUTHENTICATIONFAILED] "
            )
            assert (await thread(pop3_refusal, pop3, USER, token)).startswith("-ERR [AUTH] ")
        # another user's token does not open alice's mailbox (Dovecot compares the
        # answer's email with the login name)
        bob = issuer.token(subject="bob@example.test")
        assert (await thread(imap_refusal, imap, USER, bob)).startswith("[AUTHENTICATIONFAILED] ")
        # The two-passdb chain makes one decision per login: the refusal check logs and
        # counts only the refusals, introspection everything else.
        metrics = await admin_metrics(stack.gateway)
        line = 'gateway_sync_decisions_total{access="sync",action="%s",protocol="%s"} %s'
        for action, protocol, count in (
            ("reject", "imap", "1.0"),
            ("reject", "pop3", "1.0"),
            ("defer", "imap", "1.0"),
            ("defer", "pop3", "1.0"),
            ("invalid_token", "imap", "3.0"),
            ("invalid_token", "pop3", "3.0"),
        ):
            assert line % (action, protocol, count) in metrics


async def test_a_gateway_that_does_not_answer_is_a_temporary_failure(tmp_path: Path) -> None:
    """Never a login, never a permanent refusal: the device retries later."""
    try:
        dovecot_binary()
    except DovecotUnavailable as exc:
        pytest.skip(str(exc))
    nobody_listens = f"http://127.0.0.1:{free_port()}/"
    async with temporary_dovecot(gateway_url=nobody_listens, client_secret="s") as dovecot:
        token = TestIssuer.generate("k1").token(subject=USER)
        assert (await thread(imap_refusal, dovecot.ports.imap, USER, token)).startswith(
            "[UNAVAILABLE] "
        )
        assert (await thread(pop3_refusal, dovecot.ports.pop3, USER, token)).startswith(
            "-ERR [SYS/TEMP] "
        )


async def test_a_held_phone_reads_the_quarantine_mailbox_until_the_retraction(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    async with real_stack(tmp_path, issuer) as stack:
        dovecot = stack.dovecot
        await thread(deliver, dovecot, USER, "Real mail")
        # LMTP reaches the quarantine mailbox (no sub-addressing in deploy/dovecot/)
        await thread(deliver, dovecot, QUARANTINE, "Your phone is quarantined")
        phone = issuer.token(subject=USER, device_id="phone-1", apps=["com.hold"])
        laptop = issuer.token(subject=USER, device_id="laptop-1", device_class="desktop")
        imap, pop3 = dovecot.ports.imap, dovecot.ports.pop3
        assert await thread(imap_login, imap, USER, phone) == ["Subject: Your phone is quarantined"]
        assert await thread(imap_authenticate, imap, "XOAUTH2", xoauth2(USER, phone)) == [
            "Subject: Your phone is quarantined"
        ]
        assert await thread(imap_login, imap, USER, laptop) == ["Subject: Real mail"]
        assert f"user=<{QUARANTINE}>" in dovecot.log_text()
        assert dovecot.maildir(QUARANTINE).is_dir()
        # retraction: the policy file is edited and reloaded; the next login is normal
        policy = stack.gateway.policy_dir / "hold.toml"
        policy.write_text(HOLD.replace('state = "enforce"', 'state = "retracted"'))
        assert (await stack.gateway.server.reload("test")).ok
        assert await thread(imap_login, imap, USER, phone) == ["Subject: Real mail"]
        assert await thread(pop3_login, pop3, USER, phone) == 1


async def doveadm_http(
    dovecot: TemporaryDovecot, command: str, parameters: Mapping[str, object], *, key: str
) -> tuple[int, object]:
    """One command through the doveadm HTTP API (a JSON array of [command, params, tag])."""
    authorization = "X-Dovecot-API " + base64.b64encode(key.encode()).decode()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.post(
            f"http://127.0.0.1:{dovecot.ports.doveadm_http}/doveadm/v1",
            json=[[command, dict(parameters), "t1"]],
            headers={"Authorization": authorization},
        ) as response,
    ):
        if response.status != 200:
            return response.status, None
        return response.status, await response.json()


async def test_the_doveadm_http_api_sees_an_open_session(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with real_stack(tmp_path, issuer) as stack:
        dovecot = stack.dovecot
        session = imaplib.IMAP4("127.0.0.1", dovecot.ports.imap, timeout=10)
        await thread(session.login, USER, issuer.token(subject=USER))
        try:
            key = dovecot.doveadm_api_key
            status, answer = await doveadm_http(dovecot, "who", {"mask": USER}, key=key)
            assert status == 200
            assert isinstance(answer, list)
            assert answer[0][0] == "doveadmResponse", answer
            sessions = answer[0][1]
            assert [(s["username"], s["service"]) for s in sessions] == [(USER, "imap")]
        finally:
            await thread(session.logout)
        # without the key: refused
        assert await doveadm_http(dovecot, "who", {}, key="wrong-key") == (401, None)


async def test_nginx_proxies_an_allowed_imap_login_to_dovecot_as_the_master_user(
    tmp_path: Path,
) -> None:
    try:
        nginx_binary()
    except NginxUnavailable as exc:
        pytest.skip(str(exc))
    issuer = TestIssuer.generate("k1")
    async with real_stack(tmp_path, issuer) as stack:
        await thread(deliver, stack.dovecot, USER, "Through nginx")
        async with temporary_nginx(
            auth_http=f"127.0.0.1:{stack.gateway.sync_port}/nginx/auth", secret=NGINX_SECRET
        ) as nginx:
            context = ssl.create_default_context(cafile=str(nginx.certificate))

            def login(token: str) -> list[str]:
                imap = imaplib.IMAP4_SSL(
                    "127.0.0.1", nginx.imaps_port, ssl_context=context, timeout=10
                )
                imap.login(USER, token)
                return inbox_subjects(imap)

            def refused(token: str) -> str:
                imap = imaplib.IMAP4_SSL(
                    "127.0.0.1", nginx.imaps_port, ssl_context=context, timeout=10
                )
                try:
                    with pytest.raises(imaplib.IMAP4.error) as error:
                        imap.login(USER, token)
                    return str(error.value)
                finally:
                    imap.shutdown()

            assert await thread(login, issuer.token(subject=USER)) == ["Subject: Through nginx"]
            held = issuer.token(subject=USER, apps=["com.hold"])
            assert await thread(login, held) == []  # the (empty) quarantine mailbox
            banned = issuer.token(subject=USER, apps=["com.reject"])
            assert "[CONTACTADMIN] RejectApp is banned." in await thread(refused, banned)
        log = stack.dovecot.log_text()
        # nginx logged in as the master user: the token never reached Dovecot
        assert f"Master user logging in as {USER}" in log
        assert f"Master user logging in as {QUARANTINE}" in log
        assert "oauth2" not in log
