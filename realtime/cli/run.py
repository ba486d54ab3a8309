"""Entry point of the real-time monitor: capture → score → alerts over ZeroMQ.

With no arguments it runs the embedded default: the demo bundle on a synthetic examination
video (lesions, a WLI↔NBI switch) played in real time, publishing on 127.0.0.1, with a live
dashboard, and a summary at the end. See docs/STREAMING.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from engine.errors import CemdError


def build_parser(prog: str = "run_stream.py") -> argparse.ArgumentParser:
    """Every option with a flag in realtime/config.py (and realtime/scoring/alerts.py), plus the file ones."""
    from engine.options import add_arguments
    from realtime.config import default_sections

    p = argparse.ArgumentParser(
        prog=prog,
        description="Real-time endoscopic anomaly monitor: scores every frame with the student branch of its "
                    "modality and publishes alerts over ZeroMQ. No arguments: the synthetic demo.",
    )
    add_arguments(p, default_sections())
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file that may hold every option "
                                                               "(docs/STREAMING.md); options given here win")
    p.add_argument("--print-config", action="store_true", help="print a config file with every default and exit")
    p.add_argument("--supervise", action="store_true",
                   help="run the monitor as a child process and start it again on the same endpoint and run folder "
                        "when it dies (backing off in a crash loop); SIGTERM or Ctrl-C stops both")
    return p


def config_from_args(args: argparse.Namespace):  # -> MonitorConfig
    from engine.options import apply_arguments
    from realtime.config import load_config

    cfg = load_config(args.config)
    demo = args.config is None and getattr(args, "source.source") is None
    if demo:  # the embedded default must start in seconds: use a compiled branch only if one is cached
        cfg.scoring.build_missing = False
    apply_arguments(cfg, args)
    return cfg


def run(args: argparse.Namespace, console: Console) -> int:
    from rich.live import Live

    from realtime.cli.dashboard import render, summary_table
    from realtime.monitor import Monitor, install_signal_handlers

    cfg = config_from_args(args)
    monitor = Monitor(cfg, log=lambda s: console.print(s, highlight=False, soft_wrap=True))
    install_signal_handlers(monitor)
    show = cfg.run.dashboard == "on" or (cfg.run.dashboard == "auto" and console.is_terminal)

    class _View:
        def __rich__(self):  # rebuilt at each refresh, in rich's refresh thread
            return render(monitor)

    try:
        if show:
            with Live(_View(), console=console, refresh_per_second=4, transient=False):
                summary = monitor.run()
        else:
            summary = monitor.run()
    except KeyboardInterrupt:
        monitor.request_stop()
        console.print("[yellow]interrupted[/]")
        return 130
    except CemdError:
        if monitor.final_summary is not None:  # a fault that ended a run: what it did, then the error
            console.print()
            console.print(summary_table(monitor.final_summary))
        raise
    console.print()
    console.print(summary_table(summary))
    if summary.get("message") and summary.get("state") != "running":
        console.print(Text.assemble(("last fault: ", "bold red"), str(summary["message"])))
    return monitor.exit_code


def _supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the options here (a bad one fails once, not in a restart loop), then supervise a child."""
    from realtime.capture.sources import parse_source
    from realtime.supervisor import supervise

    cfg = config_from_args(args)
    cfg.validate()
    if cfg.source.source:
        parse_source(cfg.source.source)
    err = Console(stderr=True)
    return supervise([a for a in argv if a != "--supervise"], cfg.run.run_dir,
                     log=lambda s: err.print(s, highlight=False, soft_wrap=True))


def main(argv: list[str] | None = None, prog: str = "run_stream.py") -> int:
    from engine.malloc import tune_malloc

    tune_malloc()  # before frames flow: big per-frame buffers stay in the heap (engine/malloc.py)
    args = build_parser(prog).parse_args(argv)
    console = Console()
    if args.print_config:
        from realtime.config import example_config

        print(example_config())
        return 0
    try:
        if args.supervise:
            return _supervise(args, sys.argv[1:] if argv is None else argv)
        return run(args, console)
    except CemdError as exc:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
