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
    p = argparse.ArgumentParser(
        prog=prog,
        description="Real-time endoscopic anomaly monitor: scores every frame with the student branch of its "
                    "modality and publishes alerts over ZeroMQ. No arguments: the synthetic demo.",
    )
    p.add_argument("--source", help="video file, stream URL (rtsp/udp/rtp/srt/http/tcp), device:N or /dev/videoN, "
                                    "or synthetic[:seed=S,seconds=T,size=WxH,fps=F] (default: the synthetic demo)")
    p.add_argument("--modality", choices=["wli", "nbi", "auto"], help="branch to use; auto = detect per frame "
                                                                      "(default)")
    p.add_argument("--bundle", help="model bundle folder (default models/demo)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "aoti", "eager"], help="default auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--inference-workers", type=_workers, metavar="N|auto",
                   help="run the branch in N single-thread worker processes (CPU; 1 = in the scoring thread); "
                        "default auto: one per core for --fast files on a CPU, else 1 (docs/STREAMING.md)")
    p.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ PUB endpoint (default tcp://127.0.0.1:5556; "
                                                         "replay on the next port)")
    p.add_argument("--replay", metavar="ENDPOINT", help="replay (REQ/ROUTER) endpoint (default: publish port + 1)")
    p.add_argument("--run-dir", help="where alerts.jsonl and summary.json go (default runs/stream-TIMESTAMP)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                      help="play files at their frame rate; latest frame wins (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="analyse files as fast as possible, every frame, none dropped")
    p.add_argument("--loop", action="store_true", default=None, help="restart files at the end")
    p.add_argument("--fresh-wait", type=float, metavar="F",
                   help="live: when the newest frame is older than F of a frame period, wait for the next "
                        "one (default 0.5; 0 = always take the newest at once)")
    p.add_argument("--sensitivity", type=float, help="threshold divisor: 1.0 = calibrated, 1.2 = 20%% more sensitive")
    p.add_argument("--max-seconds", type=float, help="stop after this many seconds of scoring")
    p.add_argument("--overlay", choices=["none", "window", "file"],
                   help="start the overlay display on the capture's frames: an OpenCV window, or an annotated "
                        "video (--overlay-out, default RUN_DIR/overlay.mp4); default none")
    p.add_argument("--overlay-out", metavar="FILE", help="the annotated video of --overlay file")
    p.add_argument("--overlay-max-width", type=int, metavar="PX",
                   help="the overlay shows/writes frames wider than this scaled down to it (less CPU at 1080p)")
    p.add_argument("--dashboard", choices=["auto", "on", "off"], help="live dashboard (default: when interactive)")
    p.add_argument("--no-compile", dest="build_missing", action="store_false", default=None,
                   help="never compile a branch at start; use a compiled artifact only if `cemd export` made one")
    p.add_argument("--curve-secret", metavar="FILE", help="the monitor's CURVE secret key (cemd keys)")
    p.add_argument("--curve-allow", metavar="DIR", help="folder of client public keys allowed to connect")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file that may hold every option "
                                                               "(docs/STREAMING.md); options given here win")
    p.add_argument("--print-config", action="store_true", help="print a config file with every default and exit")
    return p


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a whole number, not {value!r}") from None


# command-line option → (config section, key)
_OVERRIDES = {
    "source": ("source", "source"), "realtime": ("source", "realtime"), "loop": ("source", "loop"),
    "fresh_wait": ("source", "fresh_wait"),
    "bundle": ("scoring", "bundle"), "modality": ("scoring", "modality"), "backend": ("scoring", "backend"),
    "device": ("scoring", "device"), "build_missing": ("scoring", "build_missing"),
    "inference_workers": ("scoring", "inference_workers"),
    "sensitivity": ("alerts", "sensitivity"), "publish": ("publish", "publish"), "replay": ("publish", "replay"),
    "curve_secret": ("publish", "curve_secret"), "curve_allow": ("publish", "curve_allow"),
    "overlay": ("run", "overlay"), "overlay_out": ("run", "overlay_out"),
    "overlay_max_width": ("run", "overlay_max_width"),
    "run_dir": ("run", "run_dir"), "dashboard": ("run", "dashboard"), "max_seconds": ("run", "max_seconds"),
}


def config_from_args(args: argparse.Namespace):  # -> MonitorConfig
    from realtime.config import load_config

    cfg = load_config(args.config)
    demo = args.config is None and args.source is None
    if demo:  # the embedded default must start in seconds: use a compiled branch only if one is cached
        cfg.scoring.build_missing = False
    for opt, (section, key) in _OVERRIDES.items():
        value = getattr(args, opt)
        if value is not None:
            setattr(getattr(cfg, section), key, value)
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
        return run(args, console)
    except CemdError as exc:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
