"""Which devices a reload moves to another mailbox (or none): the comparison that decides
whose sessions are ended and who is told a ban was withdrawn. Pure, no servers."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from gateway.domain import Access, Action, DeviceClass, PolicyState
from gateway.logins import Outcome, sync_changes
from gateway.policy.engine import compile_policy_set
from gateway.policy.model import Policy, PolicySet
from tests.policy.test_engine import BAN, claims

NOW = datetime(2020, 7, 12, tzinfo=UTC)  # after the ban's enforce_at
PHONE = claims(device_id="phone-1")
LAPTOP = claims(device_id="laptop-1", device_class=DeviceClass.DESKTOP)
SENDER_ONLY = claims(device_id="phone-2", user="bob@example.test")


def compiled(*policies: Policy):  # type: ignore[no-untyped-def]
    return compile_policy_set(PolicySet(tuple(policies), version=str(len(policies))))


def uses(device):  # type: ignore[no-untyped-def]
    return {Access.SEND} if device is SENDER_ONLY else {Access.SEND, Access.SYNC}


def test_a_ban_moves_syncing_phones_only_and_a_retraction_moves_them_back() -> None:
    hold = replace(BAN, action=Action.HOLD, state=PolicyState.ENFORCE)
    none, banned = compiled(), compiled(hold)
    devices = [PHONE, LAPTOP, SENDER_ONLY]
    changes = sync_changes(none, banned, devices, NOW, uses, "quarantine")
    assert [(c.device_id, c.before, c.after) for c in changes] == [
        ("phone-1", Outcome.ALLOW, Outcome.QUARANTINE)
    ]
    assert not changes[0].withdrawn
    refused = sync_changes(none, banned, devices, NOW, uses, "refuse")
    assert [c.after for c in refused] == [Outcome.REFUSE]
    retracted = compiled(replace(hold, state=PolicyState.RETRACTED))
    (back,) = sync_changes(banned, retracted, devices, NOW, uses, "quarantine")
    assert (back.before, back.after, back.withdrawn) == (Outcome.QUARANTINE, Outcome.ALLOW, True)
    assert back.policy_ids == (BAN.id,)


def test_a_warning_or_a_send_only_ban_changes_no_login() -> None:
    warn = replace(BAN, action=Action.WARN, state=PolicyState.ENFORCE)
    assert sync_changes(compiled(), compiled(warn), [PHONE], NOW, uses, "quarantine") == []
    send_only = replace(
        BAN, action=Action.REJECT, state=PolicyState.ENFORCE, access=frozenset({Access.SEND})
    )
    assert sync_changes(compiled(), compiled(send_only), [PHONE], NOW, uses, "quarantine") == []
