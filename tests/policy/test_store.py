"""The policy store's reload path for large sets: changed files parsed in a worker process."""

from __future__ import annotations

from pathlib import Path

import pytest

import gateway.policy.store as store_module
from gateway.policy.loader import load_policy_dir
from gateway.policy.store import PolicyStore


def _bans(first: int, count: int, message: str = "Remove it.") -> str:
    return "\n".join(
        f'[[policy]]\nid = "ban-{i}"\nmatch.apps_any = ["com.vendor{i}.app"]\n'
        f'action = "hold"\nmessage = "{message}"\n'
        for i in range(first, first + count)
    )


@pytest.mark.slow
def test_a_changed_file_of_a_large_set_is_parsed_in_a_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same policies as parsing in place; files the cache kept stay the same objects; a
    file with a problem is still refused with its line."""
    monkeypatch.setattr(store_module, "PARSE_IN_PROCESS_FROM", 2)
    (tmp_path / "a.toml").write_text(_bans(0, 3))
    (tmp_path / "b.toml").write_text(_bans(3, 3))
    store = PolicyStore(tmp_path, {})
    try:
        store.reload("start")
        kept = store.current.source.by_id()["ban-0"]
        assert store._pool is None  # the first load has no set in force: parsed here
        (tmp_path / "b.toml").write_text(_bans(3, 3, "Remove it now."))
        result = store.reload("edit")
        assert store._pool is not None
        assert result.ok
        assert result.diff.changed == ("ban-3", "ban-4", "ban-5")
        assert store.current.source.policies == load_policy_dir(tmp_path).policies
        assert store.current.source.by_id()["ban-0"] is kept
        (tmp_path / "b.toml").write_text(_bans(3, 3) + '\nbogus = "x"\n')
        refused = store.reload("broken")
        assert not refused.ok
        assert any("bogus" in str(problem) for problem in refused.problems)
        assert store.current.version == result.version  # the last good set stays
    finally:
        store.close()
    assert store._pool is None
