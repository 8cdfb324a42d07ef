"""Decisions over the last hours, in memory: counts per action per time bucket, for the
admin overview's chart (GET /api/v1/decisions).

Fed where submission decisions are counted (:meth:`Metrics.decided`): the decisions
``gateway_decisions`` counts, each once (the metric counts one per policy), per bucket. Bounded: at most ``buckets`` buckets of at
most one count per action (five), whatever the traffic. Per process and since its start:
a restart begins an empty chart, and on a fleet each replica charts its own decisions
(the fleet's sum is Prometheus's job).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

BUCKET_SECONDS = 600  # ten minutes
BUCKETS = 36  # six hours


@dataclass(frozen=True)
class Bucket:
    start: datetime
    counts: dict[str, int]


@dataclass(frozen=True)
class Series:
    bucket_seconds: int
    buckets: tuple[Bucket, ...]  # oldest first, the current (partial) bucket last

    def as_dict(self) -> dict[str, object]:
        return {
            "bucket_seconds": self.bucket_seconds,
            "buckets": [{"start": b.start.isoformat(), "counts": b.counts} for b in self.buckets],
        }


class DecisionTimeline:
    """A ring of per-bucket counts, keyed by bucket number (unix time // bucket length)."""

    def __init__(
        self,
        bucket_seconds: int = BUCKET_SECONDS,
        buckets: int = BUCKETS,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.bucket_seconds = bucket_seconds
        self.buckets = buckets
        self._now = now
        self._counts: dict[int, dict[str, int]] = {}

    def count(self, action: str) -> None:
        """One decision now."""
        bucket = int(self._now() // self.bucket_seconds)
        counts = self._counts.get(bucket)
        if counts is None:
            # a new bucket: forget those that left the window (or lie ahead of a clock
            # that went back), so there are never more than ``buckets``
            for old in [b for b in self._counts if not bucket - self.buckets < b <= bucket]:
                del self._counts[old]
            counts = self._counts[bucket] = {}
        counts[action] = counts.get(action, 0) + 1

    def series(self) -> Series:
        """Every bucket of the window, empty ones included, oldest first."""
        current = int(self._now() // self.bucket_seconds)
        return Series(
            self.bucket_seconds,
            tuple(
                Bucket(
                    datetime.fromtimestamp(b * self.bucket_seconds, UTC),
                    dict(sorted(self._counts.get(b, {}).items())),
                )
                for b in range(current - self.buckets + 1, current + 1)
            ),
        )
