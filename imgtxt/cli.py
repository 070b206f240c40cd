"""The `imgtxt` command: one entry point whose sub-commands are each owned by the package that implements them.

Sub-command modules are imported only when run, so `imgtxt serve-text` never imports torch and `imgtxt --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module:function taking argv and returning an exit code, one-line help, extra needed)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("demo.cli:main", "end to end: get a bundle, start both services, index val, run example queries", ""),
    "train": ("trainer.train:main", "train the image and text towers (dual encoder)", "train"),
    "eval": ("evaluation.cli:main", "R@K evaluation of a bundle, a checkpoint (needs imgtxt[train]) or the index", ""),
    "export": ("trainer.export:main", "export a checkpoint's towers to an ONNX model bundle", "train"),
    "serve-image": ("image_encoder_service.__main__:main", "serve a bundle's image tower over gRPC", ""),
    "serve-text": ("text_encoder_service.__main__:main", "serve a bundle's text tower over gRPC", ""),
    "serve-search": ("search_service.__main__:main", "serve search over an index: gRPC, HTTP/JSON and a web page", ""),
    "index": ("indexer.cli:main", "encode images/captions/units and write them into Qdrant", ""),
    "search": ("search.cli:main", "search the index with a text or an image query", ""),
    "bundle-info": ("imgtxt.bundle_info:main", "verify a model bundle and describe it", ""),
}


def _load(target: str, extra: str):  # type: ignore[no-untyped-def]
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if (
            extra
            and exc.name
            and exc.name.split(".")[0] in ("torch", "transformers", "onnx", "efficientnet_lite_pytorch")
        ):
            raise SystemExit(
                f"imgtxt: this command needs the [{extra}] extra: pip install 'imgtxt[{extra}]' ({exc})"
            ) from exc
        raise
    return getattr(module, func)


def process_defaults() -> None:
    """Process-wide settings of every `imgtxt` process, applied before a sub-command imports grpc.

    gRPC's fork support is switched off unless the environment says otherwise: no imgtxt process uses gRPC in a
    forked child, and with it on, a fork() while channels are busy restarts gRPC's poller in the child, which then
    aborts (`epoll_wait error: Bad file descriptor`, SIGABRT) when `close_fds` closes its epoll descriptor before exec
    (grpc/grpc#43055). gRPC reads the variable when it is first imported. The services this process starts inherit it.
    """
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def main(argv: list[str] | None = None) -> int:
    """Parses the sub-command and hands the remaining arguments to its owner."""
    process_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="imgtxt",
        description="Image–text retrieval: train a dual encoder, serve its towers over gRPC, index into Qdrant.",
        epilog="Run `imgtxt COMMAND --help` for a command's options. Options also read IMGTXT_<OPTION> env variables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text, extra) in COMMANDS.items():
        sub.add_parser(name, help=help_text + (f" (needs imgtxt[{extra}])" if extra else ""), add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints the usage error with the valid choices and exits 2
    target, _, extra = COMMANDS[argv[0]]
    return int(_load(target, extra)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
