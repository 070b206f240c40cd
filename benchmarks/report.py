"""What every benchmark prints is also written, with its command and machine, to `benchmarks/results/<name>.md`.

The docs link to those files instead of quoting figures by hand, so a figure cannot drift from the code that measured
it: re-running a benchmark rewrites its file. The rows behind the printed lines go to `<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_results_flag(parser: argparse.ArgumentParser, label: bool = False) -> None:
    """`--results DIR`: where the report goes (default `benchmarks/results`); with `label`, also `--label L`, which
    names the file `<name>_L` (one file per bundle or recipe measured)."""
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help="directory of <name>.md and <name>.json",
    )
    if label:
        parser.add_argument("--label", default="", help="results file <name>_LABEL (e.g. the bundle's recipe)")


def machine() -> str:
    """One line about the machine the figures come from (they depend on it)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for module, dist in (("onnxruntime", "onnxruntime-gpu"), ("torch", "torch"), ("qdrant_edge", "qdrant-edge-py")):
        if module in sys.modules:
            try:
                versions.append(f"{dist} {metadata.version(dist)}")
            except metadata.PackageNotFoundError:  # e.g. the CPU-only onnxruntime package
                versions.append(f"{module} {getattr(sys.modules[module], '__version__', '?')}")
    return f"{model or platform.machine()}, {cores} cores usable; Python {platform.python_version()}; " + ", ".join(
        versions
    )


class Report:
    """Prints a benchmark's lines as it goes and saves them as Markdown (plus the rows as JSON) at the end.

    Args:
        name: The benchmark's module name (`services_batching`): the results file's name.
        argv: The arguments it ran with (recorded as the command that reproduces the file).
        results: Directory of the files.
        markdown: The lines are Markdown already (a table); otherwise they are kept as a text block.
        module: The benchmark's module when `name` is more specific (`services_batching_text`).
        label: Appended to `name` (`services_batching_text_default`): `--label` of `add_results_flag`.
    """

    def __init__(
        self,
        name: str,
        argv: list[str] | None,
        results: Path = RESULTS_DIR,
        markdown: bool = False,
        module: str | None = None,
        label: str = "",
    ) -> None:
        self.name = f"{name}_{label}" if label else name
        self.module = module or name
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.results = Path(results)
        self.markdown = markdown
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        """Prints a line and keeps it for the file."""
        print(text, flush=True)
        self.lines.append(text)

    def save(self, rows: Any) -> Path:
        """Writes `<name>.md` (command, date, machine, printed lines) and `<name>.json` (`rows`); returns the .md."""
        self.results.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m", f"benchmarks.{self.module}", *map(shlex.quote, self.argv)])
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        body = "\n".join(self.lines) if self.markdown else "```text\n" + "\n".join(self.lines) + "\n```"
        text = (
            f"# {self.name}\n\nWritten by `benchmarks/{self.module}.py`; do not edit (re-run it instead).\n\n"
            f"- command: `{command}`\n- measured: {when}\n- machine: {machine()}\n\n{body}\n"
        )
        md = self.results / f"{self.name}.md"
        md.write_text(text)
        (self.results / f"{self.name}.json").write_text(
            json.dumps({"command": command, "measured": when, "machine": machine(), "rows": rows}, indent=2) + "\n"
        )
        return md
