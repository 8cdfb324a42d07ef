"""schemathesis against the admin API's OpenAPI document: no request it generates gets a 5xx.

Bounded: a fixed seed and a 30 s time budget (without the stateful phase); as an operator with
the CSRF value, so that the state-changing operations are reached too (against real held
mail). Slow (a subprocess), so marked slow.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from gateway.testing.issuer import TestIssuer
from tests.admin.kit import CSRF, carol, console, hold

pytestmark = pytest.mark.slow

ST = Path(sys.executable).with_name("st")


@pytest.mark.skipif(
    not ST.exists(), reason="schemathesis is in the test extra: pip install -e '.[test]'"
)
async def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with console(tmp_path, issuer) as c:
        for n in range(3):
            await hold(carol(issuer), c.gateway.port, f"carol #{n}")
        process = await asyncio.create_subprocess_exec(
            str(ST),
            "run",
            f"{c.base}/openapi.json",
            "--url",
            c.base,
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "8",
            "--seed",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-time",
            "30",  # seconds: the fuzzing phase runs until this budget is spent
            "--request-timeout",
            "10",
            "--workers",
            "1",
            "--header",
            f"Authorization: Bearer {c.operator.token}",
            "--header",
            f"{CSRF}: {c.operator.csrf}",
            "--report-dir",
            str(tmp_path / "schemathesis"),
            cwd=tmp_path,  # its cache (.schemathesis/) lands there, not in the checkout
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(180):
            output, _ = await process.communicate()
        text = output.decode("utf-8", "replace")
        assert process.returncode == 0, text[-4000:]
        (tmp_path / "schemathesis.txt").write_text(text)
        assert "Fuzzing" in text
        assert " passed" in text
        # The gateway still answers after the run.
        assert (await c.viewer.get("/status"))[0] == 200
