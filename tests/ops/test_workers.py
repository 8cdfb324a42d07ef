"""What workers share besides the store: notices over unix datagrams (a hold, a release
request, an override change reach every other worker, and a worker that is down is
skipped) and the merged /metrics page (end to end: tests/hold/test_workers.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.workers import Peers, WorkerRole, merge_metrics


async def test_a_notice_reaches_every_other_worker_and_skips_one_that_is_down(
    tmp_path: Path,
) -> None:
    roles = [WorkerRole(k, 3, tmp_path, "run") for k in range(3)]
    zero, one = Peers(roles[0]), Peers(roles[1])  # worker 2 is down (restarting)
    heard: list[str] = []
    both = asyncio.Event()

    def hear(notice: str) -> None:
        heard.append(notice)
        if len(heard) == 2:
            both.set()

    listening = asyncio.create_task(one.listen(hear))
    try:
        zero.tell("held ann-phone")
        zero.tell("release")
        await asyncio.wait_for(both.wait(), timeout=5)
        assert heard == ["held ann-phone", "release"]
    finally:
        listening.cancel()
        zero.close()
        one.close()
    assert not roles[0].notice_path(0).exists()  # a worker removes its socket at close


def test_merged_metrics_label_each_worker_and_keep_each_family_together() -> None:
    page = (
        b"# HELP gateway_sessions_total Sessions.\n# TYPE gateway_sessions_total counter\n"
        b"gateway_sessions_total 3.0\n"
    )
    other = page.replace(b" 3.0", b" 5.0")
    merged = merge_metrics([(0, page), (1, other), (2, None)]).decode()
    assert merged.count("# TYPE gateway_sessions_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    sessions = {
        s.labels["worker"]: s.value
        for s in families["gateway_sessions"].samples
        if s.name == "gateway_sessions_total"
    }
    assert sessions == {"0": 3.0, "1": 5.0}
    up = {s.labels["worker"]: s.value for s in families["gateway_worker_up"].samples}
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
