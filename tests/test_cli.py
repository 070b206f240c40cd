"""The `imgtxt` console command: top-level help, every sub-command's help and its defaults, and exit codes."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from imgtxt.cli import COMMANDS, main
from imgtxt.errors import EXIT_FAILURE, EXIT_USAGE
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


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


def _shows_a_default(action: argparse.Action) -> bool:
    """An option whose help must show its default: it has one that means something (not None, not off)."""
    no_default = action.default is None or action.default is False or action.default in ([], {})
    return bool(action.option_strings) and action.default is not argparse.SUPPRESS and not no_default


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_shows_every_default(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parsers: list[argparse.ArgumentParser] = []
    print_help = argparse.ArgumentParser.print_help

    def record(self: argparse.ArgumentParser, file: IO[str] | None = None) -> None:
        parsers.append(self)
        print_help(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    (parser,) = parsers
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    formatter = parser._get_formatter()
    # Each option's entry runs from its invocation (`--port PORT`) to the next option's.
    starts = sorted(
        (text.index(" " + formatter._format_action_invocation(a) + " "), a) for a in parser._actions if a.option_strings
    )
    for i, (start, action) in enumerate(starts):
        if _shows_a_default(action):
            entry = text[start : starts[i + 1][0] if i + 1 < len(starts) else len(text)]
            assert f"(default: {action.default})" in entry, f"{command} {action.option_strings[0]}: {entry!r}"


# Each command given a bundle path that does not exist (train and export: the path they take instead).
MISSING_PATH = {
    "demo": ["--bundle", "no/such/bundle", "--data", "data", "--artifacts", "art", "--no-serve"],
    "train": ["--config", "no/such/config.yaml", "--out", "run"],
    "eval": ["--bundle", "no/such/bundle", "--data", "data"],
    "export": ["--checkpoint", "no/such/best.pt", "--out", "bundle"],
    "serve-image": ["--bundle", "no/such/bundle"],
    "serve-text": ["--bundle", "no/such/bundle"],
    "serve-search": ["--bundle", "no/such/bundle", "--in-process", "--store", "q", "--port", "0", "--http-port", "0"],
    "index": ["data", "--bundle", "no/such/bundle", "--in-process", "--store", "q"],
    "search": ["--text", "a dog", "--bundle", "no/such/bundle", "--in-process", "--store", "q"],
    "bundle-info": ["no/such/bundle"],
}


def test_every_command_has_a_missing_path_case() -> None:
    assert set(MISSING_PATH) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_same_bad_input_gives_the_same_exit_code_in_every_command(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_dataset(tmp_path / "data", 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([command, *MISSING_PATH[command], "--no-such-flag"])
    assert exc.value.code == EXIT_USAGE and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main([command, *MISSING_PATH[command]]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"imgtxt {command}: error: " in err and "no/such/" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["index", "data", "--store", "q"],
        ["search", "--text", "a dog", "--store", "q"],
        ["eval", "--via-index", "--data", "data", "--store", "q"],
        ["serve-search", "--store", "q", "--port", "0", "--http-port", "0"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_unreachable_service_is_a_runtime_failure_in_every_command(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_dataset(tmp_path / "data", 2)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    assert main([*argv, "--image-service", nowhere, "--text-service", nowhere]) == EXIT_FAILURE
    assert f"imgtxt {argv[0]}: error: cannot use the " in capsys.readouterr().err


FORK_PROBE = """
import shutil, subprocess, threading
from concurrent import futures
from imgtxt.cli import process_defaults
process_defaults()  # what `imgtxt` does before a sub-command imports grpc
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(4))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
stop = threading.Event()
def busy():
    while not stop.is_set():
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
threading.Thread(target=busy, daemon=True).start()
crashed = 0
for _ in range(300):
    # preexec_fn makes CPython fork() rather than vfork(), so gRPC's fork handlers (when on) run in the child
    child = subprocess.run([shutil.which("true")], preexec_fn=lambda: None, close_fds=True, capture_output=True)
    crashed += child.returncode != 0
stop.set()
print(crashed)
"""


def test_a_fork_while_grpc_is_busy_does_not_abort_the_child() -> None:
    # With gRPC's fork support on (its default), about 3 % of these children die before exec with `epoll_wait
    # error: Bad file descriptor` (SIGABRT; grpcio 1.85): 300 forks all survive it with well under 0.1 % chance.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    probe = subprocess.run([sys.executable, "-c", FORK_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "0", probe.stderr[-2000:]
