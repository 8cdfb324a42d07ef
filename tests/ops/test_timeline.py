"""The in-memory decisions timeline behind the overview's chart: counts land in their
ten-minute bucket, the window is six hours, and memory stays bounded whatever the clock
does."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.ops.timeline import DecisionTimeline


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


START = 1_800_000_000.0  # a multiple of 600: the start of a bucket


def test_counts_per_bucket_over_the_window() -> None:
    clock = Clock(START)
    timeline = DecisionTimeline(now=clock)
    timeline.count("hold")
    timeline.count("allow")
    clock.at += 599
    timeline.count("allow")  # the same bucket
    clock.at += 1
    timeline.count("reject")  # the next
    series = timeline.series()
    assert (series.bucket_seconds, len(series.buckets)) == (600, 36)
    assert series.buckets[-1].start == datetime.fromtimestamp(START + 600, UTC)
    assert series.buckets[-1].counts == {"reject": 1}
    assert series.buckets[-2].counts == {"allow": 2, "hold": 1}
    assert all(b.counts == {} for b in series.buckets[:-2])

    clock.at += 35 * 600  # the first bucket leaves the window
    assert timeline.series().buckets[0].counts == {"reject": 1}
    clock.at += 600
    assert all(b.counts == {} for b in timeline.series().buckets)


def test_memory_is_bounded_by_the_window_even_when_the_clock_jumps() -> None:
    clock = Clock(START)
    timeline = DecisionTimeline(now=clock)
    for n in range(1000):
        clock.at = START + n * 600
        timeline.count("allow")
    assert len(timeline._counts) == 36
    clock.at = START  # back in time: what lies ahead is forgotten
    timeline.count("warn")
    assert len(timeline._counts) == 1
    assert timeline.series().buckets[-1].counts == {"warn": 1}
