"""`gorilla-jax`: parse arguments, call one function, print. Subcommands live in commands/."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from gorilla_jax import __version__
from gorilla_jax.errors import GorillaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gorilla-jax",
        description="Gorilla (LLM connected with massive APIs) in JAX/Flax: data, training, "
        "generation and AST evaluation of API calls.",
    )
    parser.add_argument("--version", action="version", version=f"gorilla-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    from gorilla_jax import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"gorilla_jax.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console command (not a call from Python): huge pages for big buffers
        from gorilla_jax.host_memory import reexec_with_huge_pages

        reexec_with_huge_pages(sys.argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GorillaError as e:
        print(f"gorilla-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
