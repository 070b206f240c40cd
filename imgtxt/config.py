"""Configuration from flags and `IMGTXT_*` environment variables, through one helper used by every entry point."""

from __future__ import annotations

import argparse
import os

ENV_PREFIX = "IMGTXT_"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The one help formatter of every `imgtxt` command: shows each option's default, except where there is none
    to show (None, or off for a switch). Light to import (no grpc, no onnxruntime), so the trainer uses it too."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ([], {}):
            return action.help
        return super()._get_help_string(action)


def env_name(option: str) -> str:
    """The environment variable of a long option: `--max-batch` -> `IMGTXT_MAX_BATCH`."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """Lets `IMGTXT_<OPTION>` environment variables set the default of every long option of `parser`.

    Precedence: command-line flag > environment variable > built-in default. Each option's help gains its variable
    name, so `--help` documents both. Values are converted with the option's own `type`, so a bad value fails the
    same way as on the command line, naming the variable.

    Args:
        parser: A parser whose options are all added.
        environ: The environment (default `os.environ`).
    """
    env = os.environ if environ is None else environ
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "version"):
            continue
        var = env_name(longs[0])
        action.help = f"{action.help or ''} [env {var}]".strip()
        if var not in env:
            continue
        raw = env[var]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            truthy = raw.strip().lower() in _TRUE
            action.default = truthy if isinstance(action, argparse._StoreTrueAction) else not truthy
            continue
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x: the variable says which
            word = raw.strip().lower()
            if word not in _TRUE + _FALSE:
                parser.error(
                    f"environment variable {var}={raw!r} is invalid for {longs[0]}: use one of {_TRUE + _FALSE}"
                )
            action.default = word in _TRUE
            continue
        convert = int if isinstance(action, argparse._CountAction) else action.type
        try:
            value = convert(raw) if callable(convert) else raw
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"environment variable {var}={raw!r} is invalid for {longs[0]}: {exc}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"environment variable {var}={raw!r} is not one of {list(action.choices)}")
        action.default = value
        action.required = False


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
