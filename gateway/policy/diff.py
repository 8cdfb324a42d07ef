"""What changed between two policy sets, by policy id. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.domain import PolicyState
from gateway.policy.model import Policy, PolicySet


@dataclass(frozen=True)
class PolicyDiff:
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    retracted: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.changed or self.retracted or self.removed)

    @classmethod
    def between(cls, old: PolicySet | None, new: PolicySet) -> PolicyDiff:
        # Policies that are the same objects in both sets, in the same places, at the start
        # and at the end (files the parse cache kept), have the same id and content on both
        # sides: only the run between can differ. A one-file reload of 100,000 policies
        # then compares a thousand. Ids are unique within a set, so this is exact.
        old_run, new_run = _changed_run(old.policies if old else (), new.policies)
        before = {p.id: p for p in old_run}
        after = {p.id: p for p in new_run}
        retracted = tuple(
            sorted(
                pid
                for pid, policy in after.items()
                if policy.state is PolicyState.RETRACTED
                and pid in before
                and before[pid].state is not PolicyState.RETRACTED
            )
        )
        return cls(
            added=tuple(sorted(set(after) - set(before))),
            changed=tuple(
                sorted(
                    pid
                    for pid in set(after) & set(before)
                    if after[pid] != before[pid] and pid not in retracted
                )
            ),
            retracted=retracted,
            removed=tuple(sorted(set(before) - set(after))),
        )


def _changed_run(
    old: Sequence[Policy], new: Sequence[Policy]
) -> tuple[Sequence[Policy], Sequence[Policy]]:
    shortest = min(len(old), len(new))
    head = 0
    while head < shortest and old[head] is new[head]:
        head += 1
    tail = 0
    while tail < shortest - head and old[-1 - tail] is new[-1 - tail]:
        tail += 1
    return old[head : len(old) - tail], new[head : len(new) - tail]
