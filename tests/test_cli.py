"""The `imgtxt` console command: top-level help and every sub-command's help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imgtxt.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails_with_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_useful_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imgtxt.cli", command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--" in result.stdout
