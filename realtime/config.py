"""Monitor configuration: one dataclass section per stage, loadable from a TOML file.

The command line picks the common options; a config file (``--config FILE``) may hold every
option, grouped by stage. Command-line options override the file. Unknown sections or keys
are an error that names the key and lists the valid ones, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import CemdError, read_document, shown
from engine.model.config import MAX_WHOLE
from engine.options import check_choices, example_toml, one_of, option
from realtime.clients.overlay import OverlayOptions
from realtime.publish.schema import DEFAULT_ENDPOINT
from realtime.scoring.alerts import AlertConfig

DEMO_SOURCE = "synthetic:seed=7,seconds=45,size=640x480,fps=30"


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a whole number, not {value!r}") from None


@dataclass
class SourceConfig:
    source: str = option(DEMO_SOURCE, "video file, stream URL (rtsp/udp/rtp/srt/http/tcp), device:N or /dev/videoN, "
                         "or synthetic[:seed=S,seconds=T,size=WxH,fps=F] (default: the synthetic demo)", flag="--source")
    realtime: bool = option(True, "files: paced at their frame rate (false: every frame, as fast as possible)",
                            switches={"--realtime": (True, "play files at their frame rate; latest frame wins (default)"),
                                      "--fast": (False, "analyse files as fast as possible, every frame, none dropped")})
    loop: bool = option(False, "restart files at the end", switches={"--loop": (True, "restart files at the end")})
    open_timeout_s: float = option(5.0, "seconds to wait for a source to open")
    read_timeout_s: float = option(2.0, "seconds a read may block before the source counts as stalled")
    stall_after_s: float = option(2.0, "no frame for this long: the source is stalled (live sources reconnect)")
    ring_slots: int = option(4, "frames the capture ring holds (≥ 2)")
    fresh_wait: float = option(0.5, "live: when the newest frame is older than this fraction of a frame period, wait "
                               "for the next one (0 = always take the newest at once)", flag="--fresh-wait", metavar="F")


@dataclass
class ScoringConfig:
    bundle: str = option("models/demo", "model bundle folder", flag="--bundle")
    modality: str = option("auto", "branch to use; auto = detect WLI/NBI per frame", choices=("wli", "nbi", "auto"),
                           flag="--modality")
    backend: str = option("auto", "how the branch runs (onnxruntime, openvino: the optional extras)",
                          choices=("auto", "tensorrt", "cuda-graph", "aoti", "onnxruntime", "openvino", "eager"),
                          flag="--backend")
    device: str = option("auto", "where the branch runs", choices=("auto", "cpu", "cuda"), flag="--device")
    precision: str | None = option(None, "fp16 or fp32 (default: the backend's own: fp16 on CUDA, fp32 on CPU)",
                                   choices=(None, "fp16", "fp32"))
    build_missing: bool = option(True, "compile or export a branch that has no compiled artifact yet (AOTInductor ≈ 45 s "
                                 "per branch on a 2-core CPU, an ONNX graph ≈ 5 s)",
                                 switches={"--no-compile": (False, "never compile a branch at start; use a compiled "
                                                                   "artifact only if `cemd export` made one")})
    switch_frames: int = option(2, "frames in a row of the other light before the router switches branch")
    switch_confidence: float = option(0.9, "classifier confidence a frame needs to count toward a switch")
    redetect_fov_every: int = option(15, "frames between two field-of-view detections")
    inference_workers: int | str = option(
        "auto", "the branch in N single-thread worker processes (CPU; 1 = in the scoring thread); auto: one per core "
        "(at most 8) for --fast files on a CPU with ≥ 2 cores, else 1 (docs/STREAMING.md)",
        flag="--inference-workers", metavar="N|auto", parse=_workers)


@dataclass
class PublishConfig:
    publish: str = option(DEFAULT_ENDPOINT, "ZeroMQ PUB endpoint (replay on the next port)", flag="--publish",
                          metavar="ENDPOINT")
    replay: str | None = option(None, "replay (REQ/ROUTER) endpoint (default: the publish port + 1)", flag="--replay",
                                metavar="ENDPOINT")
    publisher_id: str | None = option(None, "name in every message (default: host and process)")
    curve_secret: str | None = option(None, "the monitor's CURVE secret key file (cemd keys)", flag="--curve-secret",
                                      metavar="FILE")
    curve_allow: str | None = option(None, "folder of client public keys allowed to connect", flag="--curve-allow",
                                     metavar="DIR")
    heartbeat_s: float = option(1.0, "seconds between heartbeats")
    maps: bool = option(True, "a `map` message (8-bit heat map, for overlays) after every score")
    map_size: int = option(64, "side of the heat map in the `map` message (8–256)")
    sndhwm: int = option(10_000, "messages queued per subscriber before a slow one starts losing (alerts: replayable)")
    sndbuf: int | None = option(None, "kernel send buffer per connection in bytes (default: the OS's)")
    rt_send: bool = option(True, "decision → score message sent at real-time priority (Linux SCHED_FIFO 1) where the "
                           "OS allows it; the branch never runs at it")


def run_dir_or_default(run_dir: str | None) -> Path:
    """``--run-dir``, or ``runs/stream-TIMESTAMP`` (the time of this call) when none was given."""
    return Path(run_dir or f"runs/stream-{time.strftime('%Y%m%d-%H%M%S')}")


@dataclass
class RunConfig:
    run_dir: str | None = option(None, "where alerts.jsonl and summary.json go (default runs/stream-TIMESTAMP)",
                                 flag="--run-dir")
    dashboard: str = option("auto", "live dashboard; auto = when the terminal is interactive",
                            choices=("auto", "on", "off"), flag="--dashboard")
    max_seconds: float | None = option(None, "stop after this many seconds of scoring", flag="--max-seconds",
                                       parse=float)
    status_every_s: float = option(1.0, "seconds between status messages")
    overlay: str = option("none", "start the overlay display on the capture's frames: an OpenCV window, or an "
                          "annotated video (overlay_out)", choices=("none", "window", "file"), flag="--overlay")
    overlay_out: str | None = option(None, "the annotated video of --overlay file (default RUN_DIR/overlay.mp4)",
                                     flag="--overlay-out", metavar="FILE")
    overlay_max_width: int | None = option(None, "the overlay shows/writes frames wider than this scaled down to it "
                                           "(less CPU at 1080p)", flag="--overlay-max-width", metavar="PX", parse=int)


@dataclass
class DisplaySection:
    """The overlay display's look when the monitor starts it (``--overlay``); ``cemd display``
    reads the same section from ``--config FILE``."""

    heatmap: bool = option(OverlayOptions.heatmap, "start with the heat map on (key h toggles)")
    debug: bool = option(OverlayOptions.debug, "show the technical numbers: latencies, backend, score (key d toggles)",
                         switches={"--debug-overlay": (True, "the overlay shows latencies, backend, score and "
                                                             "threshold (key d toggles)")})
    opacity: float = option(OverlayOptions.opacity, "heat-map opacity, 0.05–1 (keys +/-)")
    max_result_age_s: float = option(OverlayOptions.max_result_age_s, "AI NOT ACTIVE when the newest score is older than this")
    cue: str | None = option(None, "at each alert start: bell (terminal bell) or a sound file to play")
    draw_log: str | None = option(None, "the overlay writes what it drew on each frame (frame, result frame, box) "
                                        "here, one JSON line per frame", flag="--overlay-draw-log", metavar="FILE")


@dataclass
class MonitorConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    run: RunConfig = field(default_factory=RunConfig)
    display: DisplaySection = field(default_factory=DisplaySection)

    def validate(self) -> None:
        for section in SECTIONS:
            check_choices(getattr(self, section))
        if self.run.overlay != "none" and (self.publish.curve_secret or self.publish.curve_allow):
            raise CemdError("--overlay cannot hold CURVE client keys; with CURVE on, start the display yourself: "
                            "cemd display ENDPOINT --ring NAME --curve-secret … --curve-server-key …")
        w = self.scoring.inference_workers
        if w != "auto" and (not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= 64):
            raise CemdError(f"inference_workers must be auto or a whole number from 1 to 64, got {shown(w)}")
        if self.scoring.switch_frames < 1:
            raise CemdError(f"switch_frames must be ≥ 1, got {self.scoring.switch_frames}")
        if not 8 <= self.publish.map_size <= 256:
            raise CemdError(f"map_size must be between 8 and 256, got {self.publish.map_size}")
        if not 1 <= self.publish.sndhwm <= 10_000_000:
            raise CemdError(f"sndhwm must be between 1 and 10000000 messages, got {self.publish.sndhwm}")
        sndbuf = self.publish.sndbuf
        if sndbuf is not None and (not isinstance(sndbuf, int) or isinstance(sndbuf, bool) or sndbuf < 1024):
            raise CemdError(f"sndbuf must be at least 1024 bytes (or null for the OS default), got {self.publish.sndbuf}")
        for name, value in (("[source] open_timeout_s", self.source.open_timeout_s),
                            ("[source] read_timeout_s", self.source.read_timeout_s),
                            ("[source] stall_after_s", self.source.stall_after_s),
                            ("[publish] heartbeat_s", self.publish.heartbeat_s),
                            ("[run] status_every_s", self.run.status_every_s),
                            ("[run] max_seconds", self.run.max_seconds)):
            if value is not None and not 0 < value < math.inf:
                raise CemdError(f"{name} must be a number of seconds > 0, got {value}")
        if not 0 <= self.scoring.switch_confidence <= 1:
            raise CemdError(f"switch_confidence must be a classifier confidence from 0 to 1, "
                            f"got {self.scoring.switch_confidence}")
        if self.scoring.redetect_fov_every < 1:
            raise CemdError(f"redetect_fov_every must be ≥ 1 frame, got {self.scoring.redetect_fov_every}")
        if self.run.overlay_max_width is not None and self.run.overlay_max_width < 16:
            raise CemdError(f"overlay_max_width must be at least 16 px (or unset), got {self.run.overlay_max_width}")
        if self.source.ring_slots < 2:
            raise CemdError(f"ring_slots must be ≥ 2, got {self.source.ring_slots}")
        if not 0 <= self.source.fresh_wait < 1:
            raise CemdError(f"fresh_wait must be ≥ 0 and < 1 (a fraction of a frame period; 0 = off), "
                            f"got {self.source.fresh_wait}")
        self.alerts.validate()
        d = self.display
        if not 0.05 <= d.opacity <= 1:
            raise CemdError(f"[display] opacity must be between 0.05 and 1, got {d.opacity}")
        if not 0 < d.max_result_age_s < math.inf:
            raise CemdError(f"[display] max_result_age_s must be > 0 s, got {d.max_result_age_s}")
        if d.cue and d.cue != "bell" and not Path(d.cue).is_file():
            raise CemdError(f"[display] cue: no sound file {shown(d.cue, 120)} (or use bell)")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(MonitorConfig)}


def _kind(target: Any, key: str, default: Any) -> type | None:
    """The type an option holds: its default's, or for an option without a default (None) its annotation's."""
    if default is not None:
        return type(default)
    hint = next((str(f.type) for f in dataclasses.fields(target) if f.name == key), "")
    for name, kind in (("float", float), ("int", int), ("str", str)):
        if name in hint.replace("None", ""):
            return kind
    return None


def _coerce(section: str, key: str, value: Any, default: Any, target: Any = None) -> Any:
    if key == "n_of_m":
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_WHOLE for v in value)):
            raise CemdError(f"[{section}] n_of_m must be a pair of integers like [3, 5], got {shown(value)}")
        return tuple(value)
    if key == "inference_workers":  # "auto" or a count; validate() says what is allowed
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_WHOLE:
            raise CemdError(f"[{section}] inference_workers must be auto or a whole number from 1 to 64, "
                            f"got {shown(value)}")
        return value
    kind = _kind(target, key, default) if target is not None or default is not None else None
    if kind is bool and not isinstance(value, bool):
        raise CemdError(f"[{section}] {key} must be true or false, got {shown(value)}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not abs(value) <= 1e300:  # abs() first: an int too big for a float; NaN and ±inf fail it
            raise CemdError(f"[{section}] {key} must be a finite number, got {shown(value)}")
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_WHOLE:
            raise CemdError(f"[{section}] {key} must be a whole number up to {MAX_WHOLE}, got {shown(value)}")
        return value
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise CemdError(f"[{section}] {key} must be a {'number' if kind is float else kind.__name__}, "
                        f"got {shown(value)}")
    choices = next((f.metadata.get("choices") for f in dataclasses.fields(target) if f.name == key), None) \
        if target is not None else None
    if choices and value not in choices:
        raise CemdError(f"[{section}] {key} must be {one_of(choices)}, not {shown(value)}")
    if isinstance(value, str) and "\x00" in value:
        raise CemdError(f"[{section}] {key} must not hold a NUL character, got {shown(value)}")
    return value


def auto_inference_workers(lossless_file: bool, device: str) -> int:
    """What ``inference_workers = "auto"`` means here: one single-thread branch process per usable
    core (at most 8) for --fast file analysis on a CPU with two or more cores, else 1 (paced and
    live sources keep the two-thread branch in the scoring thread: lower latency per frame)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8) if lossless_file and device == "cpu" and cores >= 2 else 1


def load_config(path: Path | None) -> MonitorConfig:
    """Defaults, overlaid with a TOML file when given."""
    cfg = MonitorConfig()
    if path is None:
        return cfg
    path = Path(path)
    data = read_document(path, tomllib.loads, "config file", "TOML")
    for section, values in data.items():
        if section not in SECTIONS:
            raise CemdError(f"config file {path}: unknown section [{shown(section)}]; valid: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise CemdError(f"config file {path}: {section} must be a [{section}] table")
        target = getattr(cfg, section)
        valid = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in valid:
                raise CemdError(f"config file {path}: unknown key {shown(key)} in [{section}]; "
                                f"valid keys: {', '.join(sorted(valid))}")
            setattr(target, key, _coerce(section, key, value, getattr(target, key), target))
    return cfg


def example_config() -> str:
    """A commented TOML file with every option at its default (docs/STREAMING.md shows it)."""
    return example_toml("cemd monitor configuration: every option, at its default", default_sections())


def default_sections() -> dict[str, Any]:
    """The sections of a default config, by name."""
    cfg = MonitorConfig()
    return {name: getattr(cfg, name) for name in SECTIONS}
