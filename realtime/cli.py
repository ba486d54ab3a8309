"""The `cemd` command: assembles the subcommands of every part of the product.

It lives in `realtime` because that is the one package allowed to import all others.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.text import Text

from calibration import cli as calibration_cli
from engine import cli as engine_cli
from engine.errors import CemdError
from realtime import display, keys, subscribe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cemd",
        description="Endoscopic anomaly monitor (CEMD): synthetic data, training, evaluation, streaming.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    engine_cli.register(sub)
    _add_run(sub)
    _add_fit_modality(sub)
    keys.register(sub)
    subscribe.register(sub)
    display.register(sub)
    calibration_cli.register(sub, _replayer)
    return parser


def _replayer(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 — the scorer calibration replays video with
    from realtime.replay import Replayer

    return Replayer(*args, **kwargs)


def _add_run(sub: argparse._SubParsersAction) -> None:
    import run_stream

    # Listed for --help only: main() hands everything after "run" to run_stream's own parser.
    p = sub.add_parser("run", help="the real-time monitor (same as python run_stream.py; cemd run --help)")
    p.set_defaults(func=lambda _args: run_stream.main([], prog="cemd run"))


def _add_fit_modality(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser("fit-modality", help="fit the WLI/NBI colour classifier used by --modality auto",
                       description="Fit the per-frame WLI/NBI classifier of --modality auto on a dataset's normal "
                                   "training images (layout: docs/DATA.md) and store it in the bundle.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset root with wli/train/good and nbi/train/good")
    p.set_defaults(func=_fit_modality)


def _fit_modality(args: argparse.Namespace) -> int:
    import json

    from realtime.routing import CLASSIFIER_FILE, fit_from_dataset

    if not args.bundle.is_dir():
        raise CemdError(f"bundle folder {args.bundle} does not exist")
    classifier = fit_from_dataset(args.data)
    out = args.bundle / CLASSIFIER_FILE
    out.write_text(json.dumps(classifier.to_json(), indent=2) + "\n")
    Console().print(f"wrote {out} (fitted on {args.data})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from engine.malloc import tune_malloc

    tune_malloc()  # calibration and evaluation score frame after frame too (engine/malloc.py)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        import run_stream

        return run_stream.main(argv[1:], prog="cemd run")
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
