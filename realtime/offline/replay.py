"""Offline replay: a recorded video (or a folder of frames) through the live monitor's own units.

Calibration and ``cemd evaluate-video`` must see exactly the scores and alerts the monitor
would produce, so this uses the monitor's ``FrameScorer`` (backend ``auto`` by default) and
``AlertLogic`` in the same order and on the same source clock — only without the capture
process, ring and publisher: every frame is decoded and scored, as in ``run_stream.py --fast``.

A decode thread reads ahead (PyAV releases the GIL while decoding and converting), so decode
and inference overlap on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from engine.constants import IMAGE_SUFFIXES
from engine.errors import CemdError
from engine.model.backbone import file_sha256
from realtime.capture.sources import PyAVReader
from realtime.scoring.alerts import AlertConfig, AlertLogic, Thresholds
from realtime.scoring.frame_scorer import FrameScorer, source_time_ns

Log = Callable[[str], None]
_END = object()


@dataclass
class ScoreTrack:
    """Per-frame results of one replayed source (arrays of equal length, in frame order)."""

    source: str
    kind: str  # video | images
    fps: float
    width: int
    height: int
    sha256: str
    frame_id: np.ndarray  # int64, 0-based index in the source
    t_ms: np.ndarray  # float64, source time (PTS for videos, index / fps for image folders)
    modality: np.ndarray  # <U3, the branch that scored the frame
    score: np.ndarray  # float32 image score
    decode_errors: int = 0
    looks_like: dict[str, int] = field(default_factory=dict)  # colour classifier votes, every 5th frame
    alerts: list[dict[str, Any]] = field(default_factory=list)  # when replayed with alert logic
    seconds: float = 0.0  # wall time of the replay
    cached: bool = False  # read back from a score cache, not scored now

    @property
    def frames(self) -> int:
        return len(self.frame_id)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "frames": self.frames,
                "fps": round(self.fps, 4), "width": self.width, "height": self.height,
                "decode_errors": self.decode_errors}


def folder_digest(files: list[Path]) -> str:
    """One hash over a folder's frames: names and contents, in order."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- frame sources


def _read_images(files: list[Path]) -> Iterator[tuple[np.ndarray, int | None, tuple[int, int] | None]]:
    import cv2

    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise CemdError(f"{f} is not a readable image")
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None, None


def _read_video(reader: PyAVReader) -> Iterator[tuple[np.ndarray, int | None, tuple[int, int] | None]]:
    while (frame := reader.read()) is not None:
        yield frame.image, frame.pts, frame.time_base


class _ReadAhead:
    """Runs a frame iterator on a thread, a few frames ahead of the consumer."""

    def __init__(self, frames: Iterator[Any], depth: int = 4) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(frames,), name="replay-decode", daemon=True)
        self._thread.start()

    def _run(self, frames: Iterator[Any]) -> None:
        try:
            for item in frames:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_END)
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer, raised there
            self._q.put(exc)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- the replayer


class Replayer:
    """Loads the branches once; replays any number of sources through them.

    ``modality`` is ``wli``, ``nbi`` or ``auto`` (both branches, routed per frame with the
    monitor's hysteresis). The router and the field-of-view tracker restart for every source.
    """

    def __init__(self, bundle: Any, modality: str = "auto", backend: str = "auto", device: str = "cpu",
                 switch_frames: int = 2, switch_confidence: float = 0.9, redetect_fov_every: int = 15,
                 log: Log = lambda _s: None, build: bool = True) -> None:
        self.bundle = bundle
        self.modality = modality
        self.scorer = FrameScorer.from_bundle(bundle, modality, backend, device, switch_frames=switch_frames,
                                              switch_confidence=switch_confidence,
                                              redetect_fov_every=redetect_fov_every, log=log, build=build)
        self.classifier = self.scorer.classifier
        for warning in self.scorer.warnings:
            log(f"warning: {warning}")

    @property
    def backends(self) -> dict[str, str]:
        return self.scorer.backends

    def _open(self, path: Path, digest: str | None = None) -> tuple[Iterator[Any], str, float, str, int | None, Any]:
        """(frames, kind, fps, sha256, frame count if known, closer); ``digest``: the sha256 if already known."""
        if path.is_dir():
            files = image_files(path)
            if not files:
                raise CemdError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            return _read_images(files), "images", 0.0, digest or folder_digest(files), len(files), None
        if not path.is_file():
            raise CemdError(f"{path} does not exist; give a video file or a folder of frames")
        reader = PyAVReader(str(path), network=False, open_timeout=10.0, read_timeout=10.0)
        total = reader.frame_count
        return _read_video(reader), "video", reader.fps or 0.0, digest or file_sha256(path), total, reader

    def alert_logic(self, sensitivity: float = 1.0) -> AlertLogic:
        """The monitor's alert logic with the bundle's calibration (as ``run_stream.py`` sets it up)."""
        return AlertLogic(Thresholds.for_bundle(self.bundle), AlertConfig(sensitivity=sensitivity))

    def score_key(self, digest: str, image_fps: float) -> str:
        """What a source's scores depend on: its content, the model files, the colour classifier,
        the branch backends and the routing and field-of-view settings (not the thresholds)."""
        return hashlib.sha256(json.dumps({
            "format": SCORE_CACHE_FORMAT, "source": digest, "image_fps": image_fps,
            "model": self.bundle.meta.get("files", {}), "config": self.bundle.meta.get("model"),
            "classifier": self.classifier.to_json(), "modality": self.modality, "backends": self.backends,
            "switch": list(self.scorer.switch), "redetect_fov_every": self.scorer.redetect_fov_every,
        }, sort_keys=True, default=str).encode()).hexdigest()

    def replay(self, path: Path | str, alerts: AlertLogic | None = None, image_fps: float = 30.0,
               progress: Callable[[int, int | None], None] | None = None, workers: int = 1,
               cache: Path | None = None) -> ScoreTrack:
        """Score every frame of ``path``; with ``alerts`` (``alert_logic()``), also raise alerts.

        ``workers`` > 1 (scores only, video files): split the video into chunks scored by that
        many processes (``replay_parallel``); the result is the same per frame.

        ``cache`` (scores only): a folder where the scores of each source are kept, keyed by
        ``score_key``; a source already scored with the same model and settings is read back
        instead of scored again (``ScoreTrack.cached``).
        """
        path = Path(path)
        entry = digest = None
        if cache is not None and alerts is None and path.exists():  # a missing one: _open says so clearly
            digest = folder_digest(image_files(path)) if path.is_dir() else file_sha256(path)
            entry = Path(cache) / f"{path.name}-{self.score_key(digest, image_fps)[:20]}.npz"
            if (hit := _read_cached(entry, path)) is not None:
                return hit
        track = self._replay(path, alerts, image_fps, progress, workers, digest)
        if entry is not None:
            _write_cached(entry, track)
        return track

    def _replay(self, path: Path, alerts: AlertLogic | None, image_fps: float,
                progress: Callable[[int, int | None], None] | None, workers: int, digest: str | None) -> ScoreTrack:
        if workers > 1 and alerts is None and path.is_file():
            track = replay_parallel(self, path, workers, progress, digest)
            if track is not None:
                return track
        frames, kind, fps, digest, total, reader = self._open(path, digest)
        if kind == "images" or not fps:
            fps = image_fps
        t0 = time.perf_counter()
        ahead = _ReadAhead(frames)
        try:
            out = self._score(((i, *f) for i, f in enumerate(ahead)), fps, alerts,
                              (lambda i: progress(i + 1, total)) if progress else None)
        finally:
            ahead.close()
            if reader is not None:
                reader.close()
        if not out["ids"]:
            raise CemdError(f"{path} has no decodable video frames")
        return ScoreTrack(str(path), kind, float(fps), out["width"], out["height"], digest,
                          np.asarray(out["ids"], np.int64), np.asarray(out["times"], np.float64),
                          np.asarray(out["mods"], dtype="<U3"), np.asarray(out["scores"], np.float32),
                          reader.decode_errors if reader else 0, out["votes"], out["alerts"],
                          time.perf_counter() - t0)

    def _score(self, frames: Iterator[tuple[int, np.ndarray, int | None, Any]], fps: float,
               logic: AlertLogic | None, progress: Callable[[int], None] | None, keep_from: int = 0,
               t_origin_ms: float | None = None) -> dict[str, Any]:
        """The monitor's per-frame path (``FrameScorer``, alert logic) over (index, image, pts, time_base).

        Frames before ``keep_from`` only warm up the field-of-view tracker and the router (a
        chunk of a split video starts a little early so that they are settled by then).
        """
        scorer = self.scorer
        scorer.reset()
        out: dict[str, Any] = {"ids": [], "times": [], "mods": [], "scores": [], "alerts": [], "width": 0,
                               "height": 0, "votes": {"wli": 0, "nbi": 0} if scorer.router is None else {}}
        t_first = t_origin_ms
        last_ns = 0
        for i, image, pts, tb in frames:
            if not out["width"]:
                out["height"], out["width"] = image.shape[:2]
            frame = scorer.prepare(image)
            if scorer.router is None and i % 5 == 0 and i >= keep_from and (p := self.classifier.p_nbi(frame.crop)) is not None:
                out["votes"]["nbi" if p >= 0.5 else "wli"] += 1
            if i < keep_from:
                continue
            amap, score = scorer.run_branch(frame.modality, frame.tensor)
            t_ns = source_time_ns(pts, tb, int(round(i * 1e9 / fps)))
            if t_first is None:
                t_first = t_ns / 1e6
            if logic is not None:
                decision = logic.update(i, pts, t_ns, frame.modality, score, lambda: amap[0, 0].float().cpu().numpy(),
                                        frame.box)
                out["alerts"] += decision.alerts
            out["ids"].append(i)
            out["times"].append(t_ns / 1e6 - t_first)
            out["mods"].append(frame.modality)
            out["scores"].append(score)
            last_ns = t_ns
            if progress:
                progress(i)
        if logic is not None and out["ids"]:
            out["alerts"] += logic.close(out["ids"][-1], None, last_ns, "source_ended")
        return out

    def check_modality(self, track: ScoreTrack, share: float = 0.6) -> str | None:
        """With a fixed modality: a message when the video looks like the other light."""
        votes = track.looks_like
        total = sum(votes.values())
        if self.modality == "auto" or not total:
            return None
        other = "nbi" if self.modality == "wli" else "wli"
        if votes[other] / total >= share:
            return (f"{track.source} looks like {other.upper()} video ({votes[other] / total:.0%} of the frames checked "
                    f"by the colour classifier), but the {self.modality.upper()} branch was asked for; use "
                    f"--modality {other} or --modality auto")
        return None


# --------------------------------------------------------------------------- score cache

SCORE_CACHE_FORMAT = 1
_CACHED_ARRAYS = ("frame_id", "t_ms", "modality", "score")


def _write_cached(entry: Path, track: ScoreTrack) -> None:
    """Keep a track's scores (atomically: a half-written entry is never read)."""
    meta = {"format": SCORE_CACHE_FORMAT, "kind": track.kind, "fps": track.fps, "width": track.width,
            "height": track.height, "sha256": track.sha256, "decode_errors": track.decode_errors,
            "looks_like": track.looks_like, "seconds": track.seconds}
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.asarray(json.dumps(meta)), **{k: getattr(track, k) for k in _CACHED_ARRAYS})
    os.replace(tmp, entry)


def _read_cached(entry: Path, path: Path) -> ScoreTrack | None:
    """The kept scores of ``path``, or None (no entry, or one that cannot be read: scored again)."""
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"]))
            arrays = {k: d[k] for k in _CACHED_ARRAYS}
        if meta.get("format") != SCORE_CACHE_FORMAT or len({len(a) for a in arrays.values()}) != 1:
            return None
        return ScoreTrack(str(path), meta["kind"], float(meta["fps"]), int(meta["width"]), int(meta["height"]),
                          meta["sha256"], arrays["frame_id"].astype(np.int64), arrays["t_ms"].astype(np.float64),
                          arrays["modality"].astype("<U3"), arrays["score"].astype(np.float32),
                          int(meta["decode_errors"]), dict(meta["looks_like"]), [], float(meta["seconds"]),
                          cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- parallel replay

_WARM_PERIODS = 3  # a chunk starts this many field-of-view re-detections early, so the tracker and router settle
_MIN_CHUNK = 300
_worker: dict[str, Any] = {}


def _init_worker(bundle_path: str, modality: str, backend: str, device: str, counter: Any) -> None:
    from engine.deploy.bundle import load_bundle

    torch.set_num_threads(1)  # one process per core: two single-thread branches beat one two-thread one
    _worker["replayer"] = Replayer(load_bundle(bundle_path), modality, backend, device, build=False)
    _worker["counter"] = counter


def _chunk_frames(path: str, first: int, stop: int, fps: float, pts0: int, tb: Any
                  ) -> Iterator[tuple[int, np.ndarray, int | None, Any]]:
    """Frames ``first``…``stop - 1`` of a constant-rate video, found by seeking; index from PTS."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1
        if first > 0:
            container.seek(int(pts0 + first / fps / tb), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                raise CemdError(f"{path}: a frame without a timestamp; cannot split it")
            i = int(round(float((frame.pts - pts0) * tb) * fps))
            if i >= stop:
                return
            if i >= first:
                ftb = frame.time_base or tb
                yield i, frame.to_ndarray(format="rgb24"), frame.pts, (ftb.numerator, ftb.denominator)


def _score_chunk(job: tuple[str, int, int, float, int, Any, float]) -> dict[str, Any]:
    path, a, b, fps, pts0, tb, t0_ms = job
    rep: Replayer = _worker["replayer"]
    counter = _worker["counter"]
    first = max(0, a - _WARM_PERIODS * rep.scorer.redetect_fov_every)  # chunks start on the tracker's re-detection phase

    def tick(i: int) -> None:
        if i % 10 == 9:
            with counter.get_lock():
                counter.value += 10

    out = rep._score(_chunk_frames(path, first, b, fps, pts0, tb), fps, None, tick, keep_from=a, t_origin_ms=t0_ms)
    out["chunk"] = (a, b)
    return out


def _probe_for_split(path: Path) -> tuple[int, float, int, Any, float] | None:
    """(frames, fps, first PTS, time base, first time ms) when the video can be split by time."""
    import av

    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate
            n, tb = int(s.frames or 0), s.time_base
            if not n or not rate or tb is None or (s.guessed_rate and abs(float(s.average_rate or 0) -
                                                                      float(s.guessed_rate)) > 0.01 * float(rate)):
                return None  # unknown length or variable frame rate: no exact split
            first = next(c.decode(s))
            if first.pts is None:
                return None
            return n, float(rate), int(first.pts), tb, float(first.pts * tb) * 1000
    except (av.error.FFmpegError, StopIteration, IndexError):
        return None


def replay_parallel(rep: Replayer, path: Path, workers: int,
                    progress: Callable[[int, int | None], None] | None = None,
                    digest: str | None = None) -> ScoreTrack | None:
    """Scores of ``path`` from ``workers`` processes, each on its own chunks; None when the video
    cannot be split exactly (unknown length, variable frame rate, missing timestamps): then the
    caller replays it in one piece. ``digest``: the file's sha256 if already known."""
    import multiprocessing as mp

    probe = _probe_for_split(path)
    if probe is None:
        return None
    n, fps, pts0, tb, t0_ms = probe
    period = rep.scorer.redetect_fov_every  # chunk starts on multiples of it: field-of-view re-detections fall on the same frames
    size = -(-max(_MIN_CHUNK, -(-n // (workers * 4))) // period) * period
    jobs = [(str(path), a, min(n, a + size), fps, pts0, tb, t0_ms) for a in range(0, n, size)]
    ctx = mp.get_context("spawn")
    counter = ctx.Value("l", 0)
    first_branch = next(iter(rep.scorer.branches.values()))
    backend, device = first_branch.backend, first_branch.device
    t_start = time.perf_counter()
    parts: list[dict[str, Any]] = []
    with ctx.Pool(workers, _init_worker, (str(rep.bundle.path), rep.modality, backend, device, counter)) as pool:
        pending = pool.imap_unordered(_score_chunk, jobs)
        while len(parts) < len(jobs):
            try:
                parts.append(pending.next(timeout=0.5))
            except mp.TimeoutError:
                pass
            if progress:
                progress(min(n, counter.value), n)
    parts.sort(key=lambda p: p["chunk"])
    ids = np.concatenate([np.asarray(p["ids"], np.int64) for p in parts])
    if len(ids) != n or not np.array_equal(ids, np.arange(n)):
        return None  # timestamps did not map onto 0…n-1: not constant-rate after all
    if progress:
        progress(n, n)
    votes: dict[str, int] = {}
    for p in parts:
        for k, v in p["votes"].items():
            votes[k] = votes.get(k, 0) + v
    return ScoreTrack(str(path), "video", fps, parts[0]["width"], parts[0]["height"], digest or file_sha256(path), ids,
                      np.concatenate([np.asarray(p["times"], np.float64) for p in parts]),
                      np.concatenate([np.asarray(p["mods"], dtype="<U3") for p in parts]),
                      np.concatenate([np.asarray(p["scores"], np.float32) for p in parts]), 0, votes, [],
                      time.perf_counter() - t_start)
