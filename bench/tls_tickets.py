"""Server CPU per TLS 1.3 handshake with 0, 1 and 2 session tickets (OpenSSL's default
is 2), for an ECDSA P-256 and an RSA 2048 certificate.

    python -m bench.tls_tickets [--handshakes 2000] [--rounds 5]

Both ends run in this process over memory BIOs, so no socket or event loop is measured:
only the server's own calls (its handshake, reading the client's first command, writing
one reply, which flushes the tickets) are timed, with the thread's CPU clock. Clients never
resume, like the phones measured in docs/performance.md. Prints medians of ``rounds``.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import trustme


def _server_context(key_type: trustme.KeyType, directory: Path, tickets: int) -> ssl.SSLContext:
    ca = trustme.CA(key_type=key_type)
    cert = ca.issue_cert("gateway.test", key_type=key_type)
    pem = directory / f"{key_type.name}.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(pem))
    context.num_tickets = tickets
    return context


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the client's cost is not measured
    return context


def server_cpu_per_handshake(server: ssl.SSLContext, client: ssl.SSLContext, count: int) -> float:
    """Seconds of server CPU per handshake (plus one command in, one reply out)."""
    spent = 0.0
    for _ in range(count):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, server_hostname="gateway.test")
        s = server.wrap_bio(s_in, s_out, server_side=True)
        done = False
        while True:
            try:
                c.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                pass
            s_in.write(c_out.read())
            if done:
                break
            started = time.thread_time()
            with contextlib.suppress(ssl.SSLWantReadError):
                s.do_handshake()
            spent += time.thread_time() - started
            c_in.write(s_out.read())
        c.write(b"EHLO phone.test\r\n")
        s_in.write(c_out.read())
        started = time.thread_time()
        with contextlib.suppress(ssl.SSLWantReadError):
            while not s.read(4096):
                pass
        s.write(b"250 gateway.test\r\n")
        spent += time.thread_time() - started
        c_in.write(s_out.read())
        assert c.version() == "TLSv1.3"
    return spent / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    client = _client_context()
    with tempfile.TemporaryDirectory() as name:
        for key_type in (trustme.KeyType.ECDSA, trustme.KeyType.RSA):
            contexts = {n: _server_context(key_type, Path(name), n) for n in (0, 1, 2)}
            samples: dict[int, list[float]] = {n: [] for n in contexts}
            for _ in range(args.rounds):  # interleaved, so drift hits all three alike
                for n, context in contexts.items():
                    samples[n].append(server_cpu_per_handshake(context, client, args.handshakes))
            medians = {n: statistics.median(s) * 1e6 for n, s in samples.items()}
            cells = "  ".join(
                f"{n} tickets {medians[n]:7.1f} µs ({medians[n] / medians[2] - 1:+.1%})"
                for n in (2, 1, 0)
            )
            print(f"{key_type.name:>5}: server CPU per handshake: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
