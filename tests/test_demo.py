"""`gateway demo` shows, at each step of the story, what the phones' mail apps see when
they sync: from the sync endpoint (asked as Dovecot asks it), or through a real Dovecot."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.demo import play
from gateway.testing.dovecot import DovecotUnavailable, dovecot_binary


def sync_lines(lines: list[str]) -> list[str]:
    return [" ".join(line.split()) for line in lines if "syncs (IMAP)" in line]


async def test_the_demo_shows_what_the_mail_app_sees_at_each_step(tmp_path: Path) -> None:
    lines: list[str] = []
    steps = await play(tmp_path, out=lines.append)
    assert all(step.ok for step in steps), [s for s in steps if not s.ok]
    synced = sync_lines(lines)
    assert len(synced) == 7
    assert synced[0].endswith("Alice's iPhone (TikTok) syncs (IMAP) -> inbox ok")
    assert "-> inbox, warned: Remove TikTok from this device" in synced[1]
    assert (
        "Alice's iPhone (TikTok) syncs (IMAP) -> quarantine mailbox (quarantine+alice@"
        in (synced[2])
    )
    assert "Carol's Galaxy (TikTok) syncs (IMAP) -> quarantine mailbox" in synced[3]
    assert synced[4].endswith("Alice's MacBook syncs (IMAP) -> inbox ok")
    assert synced[5].endswith("Alice's iPhone (no TikTok) syncs (IMAP) -> inbox ok")
    assert synced[6].endswith("Carol's Galaxy (TikTok) syncs (IMAP) -> inbox ok")
    assert any("sync endpoint 127.0.0.1:" in line for line in lines)


@pytest.mark.slow
async def test_the_demo_syncs_through_a_real_dovecot(tmp_path: Path) -> None:
    try:
        dovecot_binary()
    except DovecotUnavailable as exc:
        pytest.skip(str(exc))
    lines: list[str] = []
    steps = await play(tmp_path, out=lines.append, dovecot=True)
    assert all(step.ok for step in steps), [s for s in steps if not s.ok]
    synced = sync_lines(lines)
    assert synced[0].endswith("-> inbox: Quarterly figures ok")
    # the warning notice, delivered by the gateway over LMTP, is in the real inbox
    assert "-> inbox: Quarterly figures | Action required for mobile m" in synced[1]
    assert "-> quarantine mailbox: Your mailbox is not available on al" in synced[2]
    assert "Alice's MacBook syncs (IMAP) -> inbox: Quarterly figures" in synced[4]
    assert "Carol's Galaxy (TikTok) syncs (IMAP) -> inbox: Quarterly figures" in synced[6]
    assert any("through a real Dovecot" in line for line in lines)
