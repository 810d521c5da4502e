"""`minicpmo` console command. Each subcommand lives with the code it drives; this file only routes.

Subcommands are registered lazily (module path + function) so `minicpmo --help` does not import torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from services.runtime.torch_env import use_torch_env

# name -> (module, function taking (subparsers, name) and registering its parser with set_defaults(func=...))
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-checkpoint": ("services.common.tiny_checkpoint", "register_cli"),
    "inspect-checkpoint": ("services.common.inspect", "register_cli"),
    "serve": ("services.app.serve", "register_cli"),
    "chat": ("services.client.cli", "register_chat"),
    "session": ("services.client.cli", "register_session"),
    "bench": ("services.common.bench", "register_cli"),
    "build-kernels": ("services.llm_core.engine.cpu_attention", "register_cli"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpmo", description="MiniCPM-o 2.6 serving pipeline")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[:1]
    for name in SUBCOMMANDS:
        if name in wanted:
            module, fn = SUBCOMMANDS[name]
            getattr(importlib.import_module(module), fn)(sub, name)
        else:  # listed in --help without importing its module
            sub.add_parser(name, help=f"(see `minicpmo {name} --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    use_torch_env()  # before any subcommand imports torch
    args = build_parser(argv).parse_args(argv)
    import grpc  # client subcommands raise RpcError; show the status, not a traceback

    try:
        return int(args.func(args) or 0)
    except grpc.RpcError as e:
        print(f"minicpmo {args.command}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
