"""The `cemd` command: assembles the subcommands of every part of the product.

It lives in `realtime` because that is the one package allowed to import all others.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.text import Text

from engine import cli as engine_cli
from engine.errors import CemdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cemd",
        description="Endoscopic anomaly monitor (CEMD): synthetic data, training, evaluation, streaming.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    engine_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CemdError as exc:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
