"""What changed between two policy sets, by policy id. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.domain import PolicyState
from gateway.policy.model import PolicySet


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
        before = old.by_id() if old else {}
        after = new.by_id()
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
                    # identical objects first: the parse cache keeps unchanged files'
                    if after[pid] is not before[pid]
                    and after[pid] != before[pid]
                    and pid not in retracted
                )
            ),
            retracted=retracted,
            removed=tuple(sorted(set(before) - set(after))),
        )
