"""A throwaway Dovecot 2.3 for tests, configured FROM the shipped deploy/dovecot/ files.

The files an admin installs are read, and only site values are substituted (ports,
paths, system users, the gateway's URL and client secret); each substitution must match
the shipped text, so that a change to deploy/dovecot/ that the kit does not follow fails
loudly instead of testing something else. A few test-only settings (log file, no delay
after failed logins) are appended after the shipped text, where they override it.

Dovecot runs in the foreground (``dovecot -F``) as a child process in its own process
group, on loopback with free ports, with a temporary base_dir, TLS certificate and
maildirs; ``stop()`` (always called by :func:`temporary_dovecot`) ends the group.
As root, mail is owned by ``nobody`` and Dovecot's own processes run as the ``dovecot``
and ``dovenull`` users that Debian's package creates; otherwise everything runs as the
current user.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import grp
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway.testing.process import failure_text, stop_group

START_TIMEOUT = 20.0
REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "dovecot"
#: The master user nginx logs in as (deploy/dovecot/README.md: /etc/dovecot/master-users).
MASTER_USER = "gateway"


class DovecotUnavailable(RuntimeError):
    """Dovecot (or what the kit needs to run it) is missing; the message says what."""


class SubstitutionMissing(AssertionError):
    """A shipped file no longer contains the text the kit substitutes: update the kit."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def substitute(text: str, replacements: Sequence[tuple[str, str]], *, name: str) -> str:
    """Replace each ``old`` with ``new``; every ``old`` must occur in the shipped text."""
    for old, new in replacements:
        if old not in text:
            raise SubstitutionMissing(f"{name}: {old!r} not found; update gateway/testing")
        text = text.replace(old, new)
    return text


def dovecot_binary() -> str:
    found = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.access("/usr/sbin/dovecot", os.X_OK) else None
    )
    if found is None:
        raise DovecotUnavailable(
            "dovecot not found (apt-get install dovecot-imapd dovecot-pop3d dovecot-lmtpd;"
            " .ci/run does)"
        )
    return found


@dataclass(frozen=True)
class DovecotPorts:
    imap: int
    imaps: int
    pop3: int
    pop3s: int
    lmtp: int
    doveadm_http: int

    @classmethod
    def free(cls) -> DovecotPorts:
        return cls(*(free_port() for _ in range(6)))


@dataclass(frozen=True)
class SystemUsers:
    """Who owns mail, and who Dovecot's internal and login processes run as."""

    mail_user: str
    mail_group: str
    internal_user: str
    login_user: str

    @classmethod
    def for_this_process(cls) -> SystemUsers:
        me = pwd.getpwuid(os.geteuid())
        if me.pw_uid != 0:
            group = grp.getgrgid(me.pw_gid).gr_name
            return cls(me.pw_name, group, me.pw_name, me.pw_name)
        for name in ("dovecot", "dovenull", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                raise DovecotUnavailable(
                    f"no system user {name!r} to run Dovecot's processes"
                ) from None
        nobody = pwd.getpwnam("nobody")
        return cls("nobody", grp.getgrgid(nobody.pw_gid).gr_name, "dovecot", "dovenull")


def self_signed_certificate(directory: Path, stem: str) -> tuple[Path, Path]:
    """A certificate and key for localhost and 127.0.0.1, as PEM files ``<stem>.pem``/``<stem>.key``
    (Dovecot's ``ssl = required`` needs one to start; nginx's ``listen ... ssl`` too)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def render_config(
    deploy_dir: Path,
    root: Path,
    ports: DovecotPorts,
    users: SystemUsers,
    *,
    gateway_url: str,
    client_secret: str,
) -> dict[str, str]:
    """The shipped files with this instance's values: file name -> text."""
    etc = f"{root}/etc/"
    conf = substitute(
        (deploy_dir / "dovecot.conf").read_text(),
        [
            ("listen = *, ::", "listen = 127.0.0.1"),
            ("base_dir = /run/dovecot", f"base_dir = {root}/run"),
            ("state_dir = /var/lib/dovecot", f"state_dir = {root}/state"),
            ("/etc/dovecot/", etc),
            ("/var/vmail/", f"{root}/mail/"),
            ("mail_uid = vmail", f"mail_uid = {users.mail_user}"),
            ("mail_gid = vmail", f"mail_gid = {users.mail_group}"),
            ("port = 143\n", f"port = {ports.imap}\n"),
            ("port = 993\n", f"port = {ports.imaps}\n"),
            ("port = 110\n", f"port = {ports.pop3}\n"),
            ("port = 995\n", f"port = {ports.pop3s}\n"),
            ("port = 24\n", f"port = {ports.lmtp}\n"),
            ("port = 8080\n", f"port = {ports.doveadm_http}\n"),
        ],
        name="dovecot.conf",
    )
    conf += f"""
# --- test settings (gateway/testing/dovecot.py) ---
default_internal_user = {users.internal_user}
default_login_user = {users.login_user}
log_path = {root}/dovecot.log
auth_failure_delay = 0
# No growing delay after repeated failures from one address (every test client is
# 127.0.0.1): the documented way to turn Dovecot's auth penalty off.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
    files = {"dovecot.conf": conf}
    for name in ("oauth2-refusal.conf.ext", "oauth2-introspect.conf.ext"):
        files[name] = substitute(
            (deploy_dir / name).read_text(),
            [
                ("http://127.0.0.1:9588/", gateway_url.rstrip("/") + "/"),
                (
                    "client_secret = change-me-sync-client-secret",
                    f"client_secret = {client_secret}",
                ),
            ],
            name=name,
        )
    return files


@dataclass
class TemporaryDovecot:
    """One running Dovecot. ``doveadm_api_key`` authorizes the doveadm HTTP API."""

    root: Path
    ports: DovecotPorts
    users: SystemUsers
    doveadm_api_key: str
    master_password: str
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.root / "etc" / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maildir(self, user: str) -> Path:
        """Where ``mail_location`` puts a user's maildir (``%d/%n/Maildir``)."""
        local, _, domain = user.rpartition("@")
        return self.root / "mail" / domain / local / "Maildir"

    @property
    def doveadm_authorization(self) -> str:
        """The Authorization header value for the doveadm HTTP API."""
        return "X-Dovecot-API " + base64.b64encode(self.doveadm_api_key.encode()).decode()

    async def start(self, binary: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "-F",
            "-c",
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: stop() ends every child
        )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                for port in (self.ports.imap, self.ports.pop3, self.ports.lmtp):
                    await self._wait_for(port)
        except TimeoutError:
            raise RuntimeError(f"dovecot did not start:\n{await self._failure()}") from None

    async def _wait_for(self, port: int) -> None:
        while True:
            process = self.process
            if process is None or process.returncode is not None:
                raise RuntimeError(f"dovecot exited at start:\n{await self._failure()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return

    async def _failure(self) -> str:
        return await failure_text(self.process, self.log_text())

    async def stop(self) -> None:
        """SIGTERM to the master (it ends its children), then SIGKILL to the group."""
        process, self.process = self.process, None
        await stop_group(process, signal.SIGTERM)


def _prepare(
    root: Path,
    files: Mapping[str, str],
    users: SystemUsers,
    *,
    api_key: str,
    master_password: str,
) -> None:
    """Lay out the instance: config, secrets, certificate, mail directory."""
    root.chmod(0o755)  # Dovecot's unprivileged processes enter it
    etc = root / "etc"
    private = etc / "private"
    private.mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    self_signed_certificate(private, "dovecot")
    (private / "doveadm-api-key").write_text(api_key)
    (private / "doveadm-password").write_text(secrets.token_urlsafe(16))
    # Read by the auth process (the internal user): a test password, in the clear.
    (etc / "master-users").write_text(f"{MASTER_USER}:{{PLAIN}}{master_password}\n")
    mail = root / "mail"
    mail.mkdir()
    mail_user = pwd.getpwnam(users.mail_user)
    os.chown(mail, mail_user.pw_uid, grp.getgrnam(users.mail_group).gr_gid)


@asynccontextmanager
async def temporary_dovecot(
    *,
    gateway_url: str,
    client_secret: str,
    master_password: str | None = None,
    ports: DovecotPorts | None = None,
    deploy_dir: Path = DEPLOY_DIR,
    doveadm_api_key: str | None = None,
) -> AsyncIterator[TemporaryDovecot]:
    """A Dovecot whose logins the gateway at ``gateway_url`` decides; always stopped.

    ``ports`` may be chosen first (:meth:`DovecotPorts.free`) when the gateway must know
    them before Dovecot knows the gateway (``[sync] imap_backend`` for nginx, ``lmtp``,
    ``doveadm_url``), and so may ``doveadm_api_key`` (``doveadm_api_key_file``). Raises
    :class:`DovecotUnavailable` when Dovecot is not installed (tests skip)."""
    binary = dovecot_binary()
    if not (deploy_dir / "dovecot.conf").exists():
        raise DovecotUnavailable(f"{deploy_dir}/dovecot.conf not found (a source checkout?)")
    users = SystemUsers.for_this_process()
    root = Path(tempfile.mkdtemp(prefix="gateway-dovecot-"))
    ports = ports or DovecotPorts.free()
    api_key = doveadm_api_key or secrets.token_urlsafe(16)
    password = master_password or secrets.token_urlsafe(16)
    dovecot = TemporaryDovecot(root, ports, users, api_key, password)
    try:
        files = render_config(
            deploy_dir, root, ports, users, gateway_url=gateway_url, client_secret=client_secret
        )
        _prepare(root, files, users, api_key=api_key, master_password=password)
        await dovecot.start(binary)
        yield dovecot
    finally:
        await dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)
