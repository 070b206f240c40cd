"""Flags and the output rule that every `imgtxt` sub-command shares: help with defaults, `--json PATH|-`, the
per-user home, where embeddings come from (services or in-process), payload filters.

One grammar: a flag means the same thing, with the same type and variable, in every command that has it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgtxt.bundle import Bundle, load_bundle
from imgtxt.client import ServiceEncoder
from imgtxt.config import HelpFormatter as HelpFormatter  # defined with the env defaults; re-exported here
from imgtxt.connection import add_connection_flags, connections_from_args
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.session import DEVICES, PRECISION_CHOICES, SessionConfig, default_cache_dir
from imgtxt.encoders.types import Encoder


def default_home(environ: dict[str, str] | None = None) -> Path:
    """Per-user data directory: `$IMGTXT_HOME`, else `$XDG_DATA_HOME/imgtxt`, else `~/.local/share/imgtxt`.

    Always absolute, so a command's default store does not depend on the directory it is started from.
    """
    env = os.environ if environ is None else environ
    if env.get("IMGTXT_HOME"):
        return Path(env["IMGTXT_HOME"]).expanduser().absolute()
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".local" / "share"
    return (base / "imgtxt").absolute()


def emit(target: str | None, result: Any, human: Callable[[], None]) -> None:
    """The one output rule of every command: `--json PATH` writes `result` as JSON to PATH (and prints the human
    output), `--json -` prints the JSON instead of the human output, no `--json` prints the human output only."""
    if target and target != "-":
        out = Path(target)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if target == "-":
        print(json.dumps(result, sort_keys=True))
    else:
        human()
    sys.stdout.flush()


def add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """`--json PATH|-`, the same in every command."""
    parser.add_argument(
        "--json", metavar="PATH", help=f"write {what} as JSON to PATH ('-': print the JSON instead of the text)"
    )


def add_encoder_flags(parser: argparse.ArgumentParser) -> None:
    """Where embeddings come from: the gRPC services (default; connection flags shared with every client path) or
    ONNX Runtime in-process."""
    g = parser.add_argument_group("encoders")
    g.add_argument("--bundle", type=Path, help="model bundle (needed for --in-process and the trained unit head)")
    g.add_argument("--in-process", action="store_true", help="run the ONNX towers here instead of calling services")
    g.add_argument("--device", choices=DEVICES, default="auto", help="in-process ORT device")
    g.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help="in-process graph precision")
    add_connection_flags(parser)


def build_encoder(
    args: argparse.Namespace, needs: tuple[str, ...] = ("image", "text")
) -> tuple[Encoder, Bundle | None]:
    """The encoder the flags ask for, and the bundle when one was named.

    Args:
        args: Parsed `add_encoder_flags` flags.
        needs: The towers the command will use (`image`, `text`): only their services are connected to.

    Raises:
        ValueError: `--in-process` without `--bundle`, or services serving another bundle than `--bundle`.
        ConfigError: Bad connection flags (e.g. a token bound for a plaintext, non-loopback address).
        ImgTxtError: A needed service cannot be reached.
    """
    bundle = load_bundle(args.bundle) if args.bundle else None
    if args.in_process:
        if bundle is None:
            raise ValueError("--in-process needs --bundle")
        cfg = SessionConfig(device=args.device, cache_dir=default_cache_dir())
        return BundleEncoder.from_bundle(bundle, cfg, precision=args.precision), bundle
    connections = connections_from_args(args)
    encoder = ServiceEncoder(
        connections["image"] if "image" in needs else None, connections["text"] if "text" in needs else None
    )
    if bundle is not None and bundle.version != encoder.bundle_version:
        encoder.close()
        raise ValueError(f"the services serve bundle {encoder.bundle_version}, not --bundle {bundle.version}")
    return encoder, bundle


def parse_filters(items: list[str]) -> dict[str, Any]:
    """`key=value` payload filters; a value that parses as a JSON number or boolean is matched as one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"filter must be key=value, got {item!r}")
        try:
            value = json.loads(raw)
            out[key] = value if isinstance(value, bool | int) else raw
        except json.JSONDecodeError:
            out[key] = raw
    return out


def filter_type(text: str) -> dict[str, Any]:
    """argparse type of `--filter`: `key=value`, or several separated by commas (as `IMGTXT_FILTER` holds them)."""
    try:
        return parse_filters([part for part in text.split(",") if part])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


class FilterAction(argparse.Action):
    """Repeatable `--filter`: the flags on the command line replace `IMGTXT_FILTER` (a flag beats the variable)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        current = getattr(namespace, self.dest)
        base = {} if current is self.default else current
        setattr(namespace, self.dest, {**base, **values})


def add_filter_flag(parser: argparse.ArgumentParser) -> None:
    """`--filter KEY=VALUE` (repeatable), as a dict in `args.filter`."""
    parser.add_argument(
        "--filter",
        action=FilterAction,
        type=filter_type,
        default={},
        metavar="KEY=VALUE",
        help="payload filter (repeatable; JSON ints and bools match as such; the variable takes k=v,k=v)",
    )
