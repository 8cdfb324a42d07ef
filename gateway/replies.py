"""SMTP replies as values: a frozen Reply(code, enhanced, text), never string literals.

Enhanced status codes per RFC 3463 / RFC 2034. ``Reply.line()`` is what goes on the wire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED_RE = re.compile(r"^(\d{3})[ -](\d\.\d{1,3}\.\d{1,3}) ")

# A multi-line reply passed on from an upstream keeps at most this many lines, each with
# at most MAX_REPLY_TEXT characters of text: with "550-5.123.123 " and CRLF, a line stays
# within RFC 5321's 512 octets (s 4.5.3.1.5).
MAX_REPLY_LINES = 8
MAX_REPLY_TEXT = 480


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def line(self) -> str:
        # Keep user-facing policy text on one line and in ASCII (RFC 5321 s 4.2).
        text = " ".join(self.text.split()).encode("ascii", "replace").decode()
        return f"{self.code} {self.enhanced} {text}"

    def wire(self) -> str:
        """What the client is sent: text of several lines ("\\n"-separated, as built for
        an upstream's multi-line reply) goes as continuation lines, "550-..." then
        "550 ..." (RFC 5321 s 4.2.1), each with the enhanced code (RFC 2034 s 3);
        other text as :meth:`line`."""
        if "\n" not in self.text:
            return self.line()
        lines = [
            " ".join(t.split()).encode("ascii", "replace").decode() for t in self.text.split("\n")
        ]
        last = len(lines) - 1
        return "\r\n".join(
            f"{self.code}{' ' if n == last else '-'}{self.enhanced} {text}"
            for n, text in enumerate(lines)
        )

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500


OK = Reply(250, "2.0.0", "OK")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
AUTH_BAD_SYNTAX = Reply(501, "5.5.2", "Malformed SASL message")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO first")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
# RFC 3463 s 3.4 X.3.1 "mail system full"; 452 per RFC 5321 s 4.2.3 / RFC 1870 s 6.1.
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage; please try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 s 4.5.3.1.6)")
BARE_LINEFEED = Reply(
    550, "5.5.2", "Message contains bare CR or LF characters; use CRLF line endings"
)
INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary internal error; please try again later")
STORE_FAILED = Reply(451, "4.3.0", "Temporary storage failure; please try again later")
UPSTREAM_UNAVAILABLE = Reply(
    451, "4.4.1", "Upstream mail server unavailable; please try again later"
)
UPSTREAM_TIMEOUT = Reply(451, "4.4.2", "Upstream mail server timed out; please try again later")
UPSTREAM_LOST = Reply(
    451, "4.4.2", "Connection to upstream mail server lost; please try again later"
)
IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
BYE = Reply(221, "2.0.0", "Bye")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections; please try again later")
IDLE_UNAUTHENTICATED_SHED = Reply(
    421, "4.3.2", "Too many connections; closing an idle unauthenticated connection"
)
TOO_MANY_FROM_ADDRESS = Reply(
    421, "4.7.0", "Too many connections from your address; please try again later"
)
TOO_MANY_MESSAGES = Reply(450, "4.7.1", "Too many messages; please try again in a minute")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures; closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors; closing connection")
EARLY_TALKER = Reply(554, "5.5.0", "Protocol error: command sent before the server's reply")

# aiosmtpd answers some commands itself with bare codes; these defaults add the
# (220 is left alone: the greeting and "220 Ready to start TLS" carry none)
# enhanced code a client expects (RFC 2034 s 3: "all" replies after EHLO carry one).
_DEFAULT_ENHANCED = {
    211: "2.0.0", 214: "2.0.0", 221: "2.0.0", 250: "2.0.0", 252: "2.5.0",
    354: "", 421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
    550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.5.0", 555: "5.5.4",
}  # fmt: skip


def add_enhanced_code(line: str) -> str:
    """Give a bare aiosmtpd reply ("552 Error: ...") its enhanced code."""
    if _ENHANCED_RE.match(line) or len(line) < 3 or not line[:3].isdigit():
        return line
    code = int(line[:3])
    enhanced = _DEFAULT_ENHANCED.get(code)
    if not enhanced or line[3:4] == "-":
        return line
    rest = line[4:]
    if rest.startswith("Error: "):
        rest = rest[len("Error: ") :]
    return f"{code} {enhanced} {rest}"
