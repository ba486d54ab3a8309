"""Monitor configuration: one dataclass section per stage, loadable from a TOML file.

The command line picks the common options; a config file (``--config FILE``) may hold every
option, grouped by stage. Command-line options override the file. Unknown sections or keys
are an error that names the key and lists the valid ones, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from engine.errors import CemdError
from realtime.scoring.alerts import AlertConfig

DEMO_SOURCE = "synthetic:seed=7,seconds=45,size=640x480,fps=30"


@dataclass
class SourceConfig:
    source: str = DEMO_SOURCE
    realtime: bool = True  # files: paced at their frame rate (False = --fast, every frame)
    loop: bool = False
    open_timeout_s: float = 5.0
    read_timeout_s: float = 2.0
    stall_after_s: float = 2.0
    ring_slots: int = 4
    # live: when the newest frame is older than this fraction of a frame period, wait for the
    # next one instead (0 = off; docs/STREAMING.md "Frame freshness")
    fresh_wait: float = 0.5


@dataclass
class ScoringConfig:
    bundle: str = "models/demo"
    modality: str = "auto"  # wli | nbi | auto
    backend: str = "auto"  # auto | tensorrt | aoti | eager
    device: str = "auto"  # auto | cpu | cuda
    precision: str | None = None
    build_missing: bool = True  # compile a missing artifact (≈ 45 s per branch on a 2-core CPU)
    switch_frames: int = 2
    switch_confidence: float = 0.9
    redetect_fov_every: int = 15
    # ≥ 2: the branch runs in that many single-thread worker processes (CPU only), frames complete
    # in order; 1: in the scoring thread; "auto": one per core (at most 8) for --fast file analysis
    # on a CPU with ≥ 2 cores, else 1 (docs/STREAMING.md "Inference workers")
    inference_workers: int | str = "auto"


@dataclass
class PublishConfig:
    publish: str = "tcp://127.0.0.1:5556"
    replay: str | None = None  # default: the publish port + 1
    publisher_id: str | None = None
    curve_secret: str | None = None
    curve_allow: str | None = None
    heartbeat_s: float = 1.0
    maps: bool = True  # a `map` message (8-bit heat map) after every score, for overlays
    map_size: int = 64
    sndhwm: int = 10_000  # messages queued per subscriber before a slow one starts losing (alerts: replayable)
    sndbuf: int | None = None  # kernel send buffer per connection in bytes (None: the OS default)
    # decision → score message sent at real-time priority (Linux SCHED_FIFO 1) where the OS allows
    # it; the branch never runs at it (realtime/scoring/priority.py)
    rt_send: bool = True


@dataclass
class RunConfig:
    run_dir: str | None = None  # default: runs/stream-YYYYmmdd-HHMMSS
    dashboard: str = "auto"  # auto (when the terminal is interactive) | on | off
    max_seconds: float | None = None
    status_every_s: float = 1.0
    overlay: str = "none"  # none | window | file: start the overlay display on the capture ring
    overlay_out: str | None = None  # --overlay file: default RUN_DIR/overlay.mp4
    overlay_max_width: int | None = None  # the display scales wider frames down to this (less CPU)


@dataclass
class MonitorConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.scoring.modality not in ("wli", "nbi", "auto"):
            raise CemdError(f"modality must be wli, nbi or auto, not {self.scoring.modality!r}")
        if self.scoring.backend not in ("auto", "tensorrt", "aoti", "eager"):
            raise CemdError(f"backend must be auto, tensorrt, aoti or eager, not {self.scoring.backend!r}")
        if self.scoring.device not in ("auto", "cpu", "cuda"):
            raise CemdError(f"device must be auto, cpu or cuda, not {self.scoring.device!r}")
        if self.run.overlay not in ("none", "window", "file"):
            raise CemdError(f"overlay must be none, window or file, not {self.run.overlay!r}")
        if self.run.overlay != "none" and (self.publish.curve_secret or self.publish.curve_allow):
            raise CemdError("--overlay cannot hold CURVE client keys; with CURVE on, start the display yourself: "
                            "cemd display ENDPOINT --ring NAME --curve-secret … --curve-server-key …")
        if self.run.dashboard not in ("auto", "on", "off"):
            raise CemdError(f"dashboard must be auto, on or off, not {self.run.dashboard!r}")
        w = self.scoring.inference_workers
        if w != "auto" and (not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= 64):
            raise CemdError(f"inference_workers must be auto or a whole number from 1 to 64, got {w!r}")
        if self.scoring.switch_frames < 1:
            raise CemdError(f"switch_frames must be ≥ 1, got {self.scoring.switch_frames}")
        if not 8 <= self.publish.map_size <= 256:
            raise CemdError(f"map_size must be between 8 and 256, got {self.publish.map_size}")
        if not 1 <= self.publish.sndhwm <= 10_000_000:
            raise CemdError(f"sndhwm must be between 1 and 10000000 messages, got {self.publish.sndhwm}")
        sndbuf = self.publish.sndbuf
        if sndbuf is not None and (not isinstance(sndbuf, int) or isinstance(sndbuf, bool) or sndbuf < 1024):
            raise CemdError(f"sndbuf must be at least 1024 bytes (or null for the OS default), got {self.publish.sndbuf}")
        if self.source.ring_slots < 2:
            raise CemdError(f"ring_slots must be ≥ 2, got {self.source.ring_slots}")
        if not 0 <= self.source.fresh_wait < 1:
            raise CemdError(f"fresh_wait must be ≥ 0 and < 1 (a fraction of a frame period; 0 = off), "
                            f"got {self.source.fresh_wait}")
        self.alerts.validate()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(MonitorConfig)}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    if key == "n_of_m":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise CemdError(f"[{section}] n_of_m must be a pair of integers like [3, 5], got {value!r}")
        return tuple(value)
    if key == "inference_workers":  # "auto" or a count; validate() says what is allowed
        return value
    if isinstance(default, bool) and not isinstance(value, bool):
        raise CemdError(f"[{section}] {key} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if default is not None and not isinstance(value, type(default)):
        raise CemdError(f"[{section}] {key} must be a {type(default).__name__}, got {value!r}")
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
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CemdError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CemdError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CemdError(f"config file {path} is not valid TOML: {exc}") from None
    for section, values in data.items():
        if section not in SECTIONS:
            raise CemdError(f"config file {path}: unknown section [{section}]; valid: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise CemdError(f"config file {path}: {section} must be a [{section}] table")
        target = getattr(cfg, section)
        valid = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in valid:
                raise CemdError(f"config file {path}: unknown key {key!r} in [{section}]; "
                                f"valid keys: {', '.join(sorted(valid))}")
            setattr(target, key, _coerce(section, key, value, getattr(target, key)))
    return cfg


def example_config() -> str:
    """A commented TOML file with every option at its default (docs/STREAMING.md shows it)."""
    lines = ["# cemd monitor configuration: every option, at its default", ""]
    cfg = MonitorConfig()
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if value is None:
                lines.append(f"# {f.name} = ...")
            elif isinstance(value, bool):
                lines.append(f"{f.name} = {str(value).lower()}")
            elif isinstance(value, tuple):
                lines.append(f"{f.name} = [{', '.join(str(v) for v in value)}]")
            elif isinstance(value, str):
                lines.append(f'{f.name} = "{value}"')
            else:
                lines.append(f"{f.name} = {value}")
        lines.append("")
    return "\n".join(lines)
