"""The shipped alerts fire on what the gateway really produces.

``promtool test rules`` checks each alert against the input series in
deploy/prometheus/alerts.test.yml; here the gateway is run through each failure (the
upstream stopped, a bad policy edit, the hold store locked by another connection, mail
held) and every series that file feeds promtool must be in the gateway's /metrics in that
failure, with the same labels and, at the moment an alert is expected to fire, on the same
side of zero. So an alert cannot pass its test on series the gateway never produces.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.ops.test_admin_http import http_get
from tests.ops.test_metrics import Samples, samples
from tests.stories import TIKTOK, tiktok_ban

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)

# Which failure of the gateway each alert's test series stand for.
SCENARIO = {
    "GatewayRelayFailing": "upstream_down",
    "GatewayUpstreamDown": "upstream_down",
    "GatewayPolicyReloadFailing": "reload_failing",
    "GatewayHoldStoreFailing": "store_failing",
    "GatewayHeldMessagesHigh": "held",
    "GatewayHeldMailAging": "held",
    "GatewayRelaySlow": "traffic",
    "GatewayTokenSignaturesFailing": "traffic",
    "GatewayAuthFailuresHigh": "traffic",
    "GatewayLimitsRefusing": "traffic",
    "GatewaySessionsNearLimit": "traffic",
    "GatewayDown": "prometheus",  # `up` is Prometheus's own series
}
PROMETHEUS_LABELS = {"job", "instance"}


@needs_promtool
def test_promtool_checks_the_rules_and_every_alert_has_a_firing_test() -> None:
    assert PROMTOOL is not None
    for command in (
        [PROMTOOL, "check", "rules", "alerts.yml"],
        [PROMTOOL, "test", "rules", "alerts.test.yml"],
    ):
        done = subprocess.run(
            command, cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert firing == alerts == set(SCENARIO)


def expand(values: str) -> list[float | None]:
    """promtool's series notation: ``a``, ``axn``, ``a+bxn``, ``a-bxn``, ``_``."""
    out: list[float | None] = []
    for token in values.split():
        if token == "_":
            out.append(None)
            continue
        found = re.fullmatch(r"(-?[\d.e+]+?)(?:([+-][\d.]+)?x(\d+))?", token)
        assert found, token
        start, step, count = found.groups()
        if count is None:
            out.append(float(start))
        else:
            out.extend(float(start) + float(step or 0) * i for i in range(int(count) + 1))
    return out


def parse_series(text: str) -> tuple[str, dict[str, str]]:
    found = re.fullmatch(r"(\w+)(?:\{(.*)\})?", text)
    assert found, text
    return found.group(1), dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))


def duration_steps(text: str) -> int:
    found = re.fullmatch(r"(\d+)([smh])", text)
    assert found, text
    return int(found.group(1)) * {"s": 1, "m": 60, "h": 3600}[found.group(2)] // 60


def find(scrape: Samples, name: str, labels: dict[str, str]) -> list[float]:
    """Values of the scraped series matching; a smarthost's target may be any host:port."""
    wanted = {k: v for k, v in labels.items() if k not in PROMETHEUS_LABELS}
    matches = []
    for (scraped_name, scraped_labels), value in scrape.items():
        have = dict(scraped_labels)
        if scraped_name != name or set(have) != set(wanted):
            continue
        if all(k == "target" or have[k] == v for k, v in wanted.items()):
            matches.append(value)
    return matches


async def _scrape(port: int | None) -> Samples:
    assert port is not None
    status, text = await http_get(port, "/metrics")
    assert status == 200
    return samples(text)


async def run_through_failures(tmp_path: Path) -> dict[str, Samples]:
    """One gateway, driven through each failure in turn, scraped in each."""
    issuer = TestIssuer.generate("k1")
    scrapes: dict[str, Samples] = {}
    ban = tiktok_ban("hold")
    async with gateway_with_upstream(
        tmp_path,
        issuer,
        {"ban.toml": ban},
        extra="busy_timeout_seconds = 0.2\n",
        limits={"messages_per_user_per_minute": 3},
    ) as (gateway, upstream):
        services = gateway.server.services
        phone = FakeDevice(issuer)
        assert (await phone.send(gateway.port)).accepted
        await FakeDevice(TestIssuer.generate("k1")).send(gateway.port)  # bad_signature
        hasty = FakeDevice(issuer, user="carol@example.test", device_id="phone-3")
        mail = [await hasty.send(gateway.port) for _ in range(4)]
        assert [r.mail[0] if r.mail else None for r in mail] == [250, 250, 250, 450]
        scrapes["traffic"] = await _scrape(gateway.admin_port)

        held = FakeDevice(issuer, user="dave@example.test", device_id="phone-2", apps={TIKTOK})
        for _ in range(2):
            result = await held.send(gateway.port)
            assert result.data is not None
            assert result.data[0] == 250
        await asyncio.sleep(1.3)  # ticks (0.2 s) once the mail is more than a second old
        scrapes["held"] = await _scrape(gateway.admin_port)

        (gateway.policy_dir / "ban.toml").write_text(ban + "\n[[policy]\n")  # a typo
        assert not (await gateway.server.reload("test")).ok
        scrapes["reload_failing"] = await _scrape(gateway.admin_port)

        await upstream.stop()
        await services.relay.pool.close()  # its pooled connections are gone with it
        erin = FakeDevice(issuer, user="erin@example.test", device_id="phone-4")
        for _ in range(3):
            result = await erin.send(gateway.port)
            assert result.mail is not None
            assert result.mail[0] == 451
        scrapes["upstream_down"] = await _scrape(gateway.admin_port)

        locker = sqlite3.connect(str(gateway.settings.hold.database), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # a backup or an sqlite3 shell, say
        try:
            async with asyncio.timeout(10):
                while (scrape := await _scrape(gateway.admin_port)).get(  # noqa: ASYNC110
                    ("gateway_hold_store_writable", ())
                ) != 0:
                    await asyncio.sleep(0.1)
            scrapes["store_failing"] = scrape
        finally:
            locker.execute("ROLLBACK")
            locker.close()
    return scrapes


async def test_every_series_the_alert_tests_feed_promtool_is_what_the_gateway_produces(
    tmp_path: Path,
) -> None:
    scrapes = await run_through_failures(tmp_path)
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    checked = 0
    for test in tests:
        alertnames = {case["alertname"] for case in test["alert_rule_test"]}
        scenarios = {SCENARIO[name] for name in alertnames} - {"prometheus"}
        fires_at = [
            duration_steps(case["eval_time"])
            for case in test["alert_rule_test"]
            if case["exp_alerts"]
        ]
        if not scenarios:
            continue
        if not fires_at:  # the healthy case: the series exist after ordinary traffic
            scenarios = {"traffic"}
        for entry in test["input_series"]:
            name, labels = parse_series(entry["series"])
            values = expand(entry["values"])
            at = values[min(fires_at[0], len(values) - 1)] if fires_at else None
            for scenario in scenarios:
                found = find(scrapes[scenario], name, labels)
                assert found, f"{entry['series']} is not produced in {scenario}"
                if at is not None and scenario != "traffic":
                    assert (found[0] > 0) == (at > 0), (entry["series"], scenario, found, at)
                checked += 1
    assert checked >= 20
