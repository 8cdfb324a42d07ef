"""The README's test-kit example, run as a user would: its own file, its own pytest,
pytest-asyncio in its default (strict) mode, no configuration of ours."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.issuer import TestIssuer
from gateway.testing.pytest_plugin import GatewayFactory

REPO = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Writing integration tests with the test kit") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the README's test-kit example is gone"
    return found.group(1)


@pytest.mark.slow
def test_the_readme_example_passes_in_pytest_asyncio_default_mode(tmp_path: Path) -> None:
    (tmp_path / "test_example.py").write_text(readme_example())
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-o", "asyncio_default_fixture_loop_scope=function", "test_example.py",
        ],
        cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "mode=Mode.STRICT" in output, output  # pytest-asyncio's default
    assert re.search(r"\b2 passed\b", output), output
    assert "skipped" not in output


async def test_any_config_section_can_be_given_to_the_factory(
    gateway_factory: GatewayFactory, test_issuer: TestIssuer
) -> None:
    ban = (
        '[[policy]]\nid = "x"\nmatch.apps_any = ["com.bad"]\naction = "reject"\n'
        'exempt.groups = ["sales"]\n'
    )
    async with gateway_factory(
        {"ban.toml": ban},
        groups={"sales": ["bob@example.test"]},
        limits={"max_connections": 7},
        gateway={"notices": False},
    ) as gateway:
        assert gateway.settings.groups["sales"] == frozenset({"bob@example.test"})
        assert gateway.settings.groups["it-staff"]  # the test defaults are kept
        assert gateway.settings.limits.max_connections == 7
        bob = FakeDevice(test_issuer, user="bob@example.test", apps={"com.bad"})
        assert (await bob.send(gateway.port, sender="bob@example.test")).data[0] == 250
        alice = FakeDevice(test_issuer, user="alice@example.test", apps={"com.bad"})
        assert (await alice.send(gateway.port)).mail[0] == 550
