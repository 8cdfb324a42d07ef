"""`gateway --version` and shell completion generated from the parser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway.cli import build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"gateway {gateway.__version__}\n"


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers after ``gateway <words>`` with the cursor at the end of the last."""
    words_array = " ".join(f"'{w}'" for w in ("gateway", *words))
    program = f"""
source {script}
COMP_WORDS=({words_array}); COMP_CWORD={len(words)}
COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
_shtab_gateway gateway '{words[-1]}' '{words[-2] if len(words) > 1 else "gateway"}'
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return sorted(line.strip() for line in result.stdout.splitlines() if line.strip())


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_subcommands_and_options(tmp_path: Path) -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "gateway", "completion", "bash"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    script = tmp_path / "gateway.bash"
    script.write_text(generated.stdout)
    assert complete(script, "ho") == ["hold"]
    assert complete(script, "hold", "re") == ["release"]
    assert "--force" in complete(script, "token", "keygen", "--")
    assert "--inventory" in complete(script, "impact", "--")
    (tmp_path / "gateway.toml").write_text("")
    assert complete(script, "check", "--config", str(tmp_path / "gateway.t")) == [
        str(tmp_path / "gateway.toml")
    ]


def test_every_subcommand_is_in_the_zsh_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#compdef gateway")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a.choices, dict))
    assert isinstance(subparsers.choices, dict)
    for name in subparsers.choices:
        assert name in script
