"""A throwaway nginx mail proxy for tests, configured FROM deploy/nginx/nginx-mail.conf.

As with Dovecot (gateway/testing/dovecot.py), the shipped file is read and only site
values are substituted (listen port, certificate, pid and log paths, the gateway's
address and shared secret), each of which must match the shipped text. nginx runs as
``nginx -c <conf> -p <dir> -e <log>`` with ``daemon off`` (appended), as a child process
in its own process group; ``stop()`` ends it.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway.testing.dovecot import REPO_ROOT, free_port, self_signed_certificate, substitute
from gateway.testing.process import failure_text, stop_group

START_TIMEOUT = 15.0
DEPLOY_FILE = REPO_ROOT / "deploy" / "nginx" / "nginx-mail.conf"
#: Where Debian's libnginx-mod-mail installs the module the shipped file loads.
MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")


class NginxUnavailable(RuntimeError):
    """nginx or its mail module is missing; the message says what to install."""


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        raise NginxUnavailable("nginx not found (apt-get install nginx libnginx-mod-mail)")
    if not MAIL_MODULE.exists():
        raise NginxUnavailable(f"{MAIL_MODULE} not found (apt-get install libnginx-mod-mail)")
    return found


def render_config(shipped: str, root: Path, *, imaps_port: int, auth_http: str, secret: str) -> str:
    """The shipped file with this instance's values."""
    cert, key = self_signed_certificate(root, "nginx")
    worker_user = "user www-data;"
    if os.geteuid() != 0:
        replacement = "# user: not root, workers run as the current user"
    else:
        try:
            pwd.getpwnam("www-data")
            replacement = worker_user
        except KeyError:
            replacement = "user nobody;"
    text = substitute(
        shipped,
        [
            (worker_user, replacement),
            ("pid /run/nginx-mail.pid;", f"pid {root}/nginx.pid;"),
            ("error_log /var/log/nginx/mail-error.log;", f"error_log {root}/error.log info;"),
            ("auth_http 127.0.0.1:9588/nginx/auth;", f"auth_http {auth_http};"),
            ('"change-me-sync-nginx-secret"', f'"{secret}"'),
            ("/etc/ssl/certs/mail.example.com.pem", str(cert)),
            ("/etc/ssl/private/mail.example.com.key", str(key)),
            ("listen 993 ssl;", f"listen 127.0.0.1:{imaps_port} ssl;"),
        ],
        name="nginx-mail.conf",
    )
    return text + "\n# --- test settings (gateway/testing/nginx.py) ---\ndaemon off;\n"


@dataclass
class TemporaryNginx:
    root: Path
    imaps_port: int
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def certificate(self) -> Path:
        """The self-signed certificate nginx presents (a client's CA for it)."""
        return self.root / "nginx.pem"

    def log_text(self) -> str:
        try:
            return (self.root / "error.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self, binary: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(self.root / "nginx.conf"),
            "-p",
            str(self.root),
            "-e",
            str(self.root / "error.log"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    if self.process.returncode is not None:
                        raise RuntimeError(f"nginx exited at start:\n{await self._failure()}")
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", self.imaps_port)
                    except OSError:
                        await asyncio.sleep(0.05)
                        continue
                    writer.close()
                    return
        except TimeoutError:
            raise RuntimeError(f"nginx did not start:\n{await self._failure()}") from None

    async def _failure(self) -> str:
        return await failure_text(self.process, self.log_text())

    async def stop(self) -> None:
        """SIGQUIT (graceful) to the master, then SIGKILL to its group."""
        process, self.process = self.process, None
        await stop_group(process, signal.SIGQUIT)


def _prepare(shipped: Path, root: Path, *, imaps_port: int, auth_http: str, secret: str) -> None:
    root.chmod(0o755)  # nginx's workers (www-data) read the certificate
    text = render_config(
        shipped.read_text(), root, imaps_port=imaps_port, auth_http=auth_http, secret=secret
    )
    (root / "nginx.conf").write_text(text)


@asynccontextmanager
async def temporary_nginx(
    *, auth_http: str, secret: str, shipped: Path = DEPLOY_FILE
) -> AsyncIterator[TemporaryNginx]:
    """An nginx IMAP proxy (TLS, self-signed) asking ``auth_http`` (``host:port/path``);
    always stopped. Raises :class:`NginxUnavailable` when nginx is not installed."""
    binary = nginx_binary()
    root = Path(tempfile.mkdtemp(prefix="gateway-nginx-"))
    nginx = TemporaryNginx(root, free_port())
    try:
        _prepare(shipped, root, imaps_port=nginx.imaps_port, auth_http=auth_http, secret=secret)
        await nginx.start(binary)
        yield nginx
    finally:
        await nginx.stop()
        shutil.rmtree(root, ignore_errors=True)
