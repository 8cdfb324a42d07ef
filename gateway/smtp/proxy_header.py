"""The PROXY protocol header a load balancer sends before the client's first byte.

Pure parsing, no I/O: the SMTP session reads the bytes (with a timeout and a size bound)
and asks these functions what they mean. Specification: HAProxy's proxy-protocol.txt
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt); section numbers below
refer to it. Version 2 (binary, s 2.2) is what `send-proxy-v2` sends; version 1 (text,
s 2.1) is read too because some balancers only speak it.

A `LOCAL` command (v2) or `UNKNOWN` protocol (v1) is the balancer talking for itself,
health checks mostly: the connection is valid and keeps the balancer's own address
(s 2.2: "the receiver must accept this connection as valid and must use the real
connection endpoints").
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

from gateway.errors import ProxyHeaderError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # s 2.2, the 12-byte binary signature
V1_PREFIX = b"PROXY "  # s 2.1
PREFIX_LENGTH = 6  # enough to tell v1 ("PROXY ") from v2 ("\r\n\r\n\x00\r") apart
V2_FIXED_LENGTH = 16  # signature, version and command, family, length
V1_MAX_LENGTH = 107  # s 2.1: the longest v1 line, CRLF included
V2_MAX_BODY = 2048  # addresses and TLVs; HAProxy's are far below this (s 2.2 allows 64k)

_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_ADDRESS_LENGTHS = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_PP2_TYPE_SSL = 0x20  # s 2.2.5
_PP2_CLIENT_SSL = 0x01


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer says about the connection it forwards."""

    version: Literal[1, 2]
    local: bool  # LOCAL / UNKNOWN: use the connection's own addresses
    source: tuple[str, int] | None = None  # the client's address and port
    destination: tuple[str, int] | None = None  # the address the client connected to
    client_tls: bool = False  # v2 PP2_TYPE_SSL: the client spoke TLS to the balancer


def version_of(prefix: bytes) -> Literal[1, 2]:
    """Which version begins with these :data:`PREFIX_LENGTH` bytes; raises when neither."""
    if prefix == V1_PREFIX:
        return 1
    if prefix == V2_SIGNATURE[:PREFIX_LENGTH]:
        return 2
    raise ProxyHeaderError(
        "the connection comes from a proxy_protocol_from network but does not begin with a "
        "PROXY protocol header: make the balancer send one (HAProxy: send-proxy-v2) or "
        "remove its network from [smtp] proxy_protocol_from",
        "missing",
    )


def v2_body_length(fixed: bytes) -> int:
    """The length of the rest of a v2 header, from its first 16 bytes (s 2.2)."""
    if len(fixed) != V2_FIXED_LENGTH or not fixed.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("bad PROXY v2 signature", "malformed")
    if fixed[12] >> 4 != 2:
        raise ProxyHeaderError(f"PROXY protocol version {fixed[12] >> 4} is not 2", "malformed")
    (length,) = struct.unpack("!H", fixed[14:16])
    if length > V2_MAX_BODY:
        raise ProxyHeaderError(
            f"PROXY v2 header of {length} bytes is over the {V2_MAX_BODY}-byte bound",
            "oversized",
        )
    return int(length)


def parse_v2(fixed: bytes, body: bytes) -> ProxyHeader:
    """A whole v2 header: the 16 fixed bytes and the :func:`v2_body_length` bytes after."""
    if len(body) != v2_body_length(fixed):
        raise ProxyHeaderError("PROXY v2 header shorter than its length field", "malformed")
    command = _COMMANDS.get(fixed[12] & 0x0F)
    if command is None:
        raise ProxyHeaderError(f"unknown PROXY v2 command {fixed[12] & 0x0F:#x}", "malformed")
    family, transport = fixed[13] >> 4, fixed[13] & 0x0F
    address_length = _ADDRESS_LENGTHS.get(family, 0)
    if len(body) < address_length:
        raise ProxyHeaderError("PROXY v2 address block is truncated", "malformed")
    client_tls = _client_tls(body[address_length:])
    if command == "LOCAL":  # s 2.2: the family and address block are ignored
        return ProxyHeader(2, local=True, client_tls=client_tls)
    if family not in (_AF_INET, _AF_INET6) or transport != _STREAM:
        raise ProxyHeaderError(
            "PROXY v2 header for something other than TCP over IPv4 or IPv6 "
            f"(family {family:#x}, transport {transport:#x})",
            "unsupported",
        )
    size = 4 if family == _AF_INET else 16
    source = ipaddress.ip_address(body[:size])
    destination = ipaddress.ip_address(body[size : 2 * size])
    source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return ProxyHeader(
        2,
        local=False,
        source=(str(source), source_port),
        destination=(str(destination), destination_port),
        client_tls=client_tls,
    )


def _client_tls(tlvs: bytes) -> bool:
    """Whether the TLVs (s 2.2.7) carry PP2_TYPE_SSL with the PP2_CLIENT_SSL bit."""
    offset = 0
    while offset + 3 <= len(tlvs):
        kind = tlvs[offset]
        (length,) = struct.unpack("!H", tlvs[offset + 1 : offset + 3])
        value = tlvs[offset + 3 : offset + 3 + length]
        if len(value) != length:
            raise ProxyHeaderError("PROXY v2 TLV runs past the header's end", "malformed")
        if kind == _PP2_TYPE_SSL and length >= 1 and value[0] & _PP2_CLIENT_SSL:
            return True
        offset += 3 + length
    return False


def parse_v1(line: bytes) -> ProxyHeader:
    """A whole v1 line, CRLF included (s 2.1): ``PROXY TCP4 src dst sport dport``."""
    if len(line) > V1_MAX_LENGTH or not line.endswith(b"\r\n") or not line.startswith(V1_PREFIX):
        raise ProxyHeaderError("PROXY v1 line is malformed or too long", "malformed")
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII", "malformed") from None
    if len(fields) >= 2 and fields[1] == "UNKNOWN":  # s 2.1: the rest is ignored
        return ProxyHeader(1, local=True)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line has the wrong fields", "malformed")
    _, protocol, source, destination, source_port, destination_port = fields
    version = 4 if protocol == "TCP4" else 6
    return ProxyHeader(
        1,
        local=False,
        source=(_v1_address(source, version), _v1_port(source_port)),
        destination=(_v1_address(destination, version), _v1_port(destination_port)),
    )


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(
            f"PROXY v1 address {text!r} is not an address", "malformed"
        ) from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY v1 address {text!r} is not IPv{version}", "malformed")
    return str(address)


def _v1_port(text: str) -> int:
    # s 2.1: decimal, no leading zero
    if not text.isdigit() or not text.isascii() or (text != "0" and text.startswith("0")):
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not a port", "malformed")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not a port", "malformed")
    return port
