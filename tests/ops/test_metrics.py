"""What /metrics says is true: an upstream outage shows at every stage, the reload alert
clears after a fix, the policy label has one series per policy, held mail is measured."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.hold.store import HoldStore
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.ops.test_admin_http import http_get
from tests.stories import TIKTOK, tiktok_ban

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


async def scrape(admin_port: int | None) -> Samples:
    assert admin_port is not None
    status, text = await http_get(admin_port, "/metrics")
    assert status == 200
    return samples(text)


async def test_an_upstream_outage_counts_at_connect_and_marks_the_target_down(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    phone = FakeDevice(issuer)
    async with gateway_with_upstream(tmp_path, issuer) as (gateway, upstream):
        target = f"127.0.0.1:{upstream.port}"
        assert (await phone.send(gateway.port)).accepted
        up = await scrape(gateway.admin_port)
        await upstream.stop()
        await gateway.server.services.relay.pool.close()  # its pooled connections die with it
        results = [await phone.send(gateway.port) for _ in range(3)]
        down = await scrape(gateway.admin_port)
    assert [r.mail[0] if r.mail else None for r in results] == [451, 451, 451]
    for stage in ("connect", "mail", "rcpt", "data"):
        assert value(up, "gateway_relay_total", stage=stage, result="accepted") == 1, stage
    assert value(up, "gateway_upstream_up", target=target) == 1
    assert value(down, "gateway_relay_total", stage="connect", result="failed") == 3
    assert value(down, "gateway_upstream_up", target=target) == 0
    assert value(down, "gateway_relay_total", stage="data", result="accepted") == 1  # unchanged


async def test_the_reload_alert_clears_when_a_bad_edit_is_reverted(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    good = tiktok_ban("reject")
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": good}) as (gateway, _):
        server = gateway.server
        assert server.admin_port is not None
        version = server.services.policies.current.version
        ban = gateway.policy_dir / "ban.toml"
        ban.write_text(good + "\n[[policy]\n")  # a typo
        await server.reload("test")
        failing = await scrape(gateway.admin_port)
        ban.write_text(good)  # reverted: the same version as before
        for _ in range(75):  # the watcher or the periodic check notices within 15 s
            if value(await scrape(gateway.admin_port), "gateway_policy_reload_last_success") == 1:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("gateway_policy_reload_last_success stayed 0 after the revert")
        assert server.services.policies.current.version == version
    assert value(failing, "gateway_policy_reload_last_success") == 0


async def test_the_policy_label_has_one_series_per_policy_id(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    policies = {
        "a.toml": '[[policy]]\nid = "a"\nmatch.apps_any = ["com.a"]\naction = "warn"\nmessage = "A."\n',
        "b.toml": '[[policy]]\nid = "b"\nmatch.apps_any = ["com.b"]\naction = "warn"\nmessage = "B."\n',
    }
    async with gateway_with_upstream(tmp_path, issuer, policies) as (gateway, _):
        await FakeDevice(issuer, apps={"com.a", "com.b"}).send(gateway.port)
        await FakeDevice(issuer, apps={"com.a"}).send(gateway.port)
        found = await scrape(gateway.admin_port)
    decisions = {
        dict(labels)["policy"]: v
        for (name, labels), v in found.items()
        if name == "gateway_decisions_total"
    }
    assert decisions == {"a": 2, "b": 1}


async def test_build_info_and_the_age_and_size_of_held_mail(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": tiktok_ban("hold")}) as (
        gateway,
        _,
    ):
        empty = await scrape(gateway.admin_port)
        phone = FakeDevice(issuer, apps={TIKTOK})
        for _ in range(2):
            assert (await phone.send(gateway.port)).data[0] == 250  # type: ignore[index]
        store = HoldStore(gateway.settings.hold.database)
        sizes = [h.size for h in store.select()]
        store.close()
        await asyncio.sleep(1.2)  # a release tick (0.2 s) after the mail is a second old
        found = await scrape(gateway.admin_port)
    assert value(found, "gateway_build_info", version=__version__) == 1
    assert value(empty, "gateway_held_bytes") == 0
    assert value(empty, "gateway_held_oldest_age_seconds") == 0
    assert value(found, "gateway_held_messages") == 2
    assert value(found, "gateway_held_bytes") == sum(sizes) > 0
    age = value(found, "gateway_held_oldest_age_seconds")
    assert age is not None
    assert 1.0 <= age < 10
