"""The real-time monitor: capture → preprocess → route → score → decide → publish, wired in one place.

Each stage is a small unit with plain inputs and outputs (``FramePreprocessor``,
``ModalityRouter``, a ``Scorer`` per branch, ``AlertLogic``, ``AlertPublisher``); this
module only connects them, stamps monotonic times between them, and turns every fault into
a ``status`` message and a dashboard state instead of a silent stop.

Stage timings of a frame (ms): ``capture`` = written into the shared-memory ring → taken by
the scorer (ring wait and copy), ``preprocess`` = field of view, crop, resize, routing,
``inference`` = the branch, ``decision`` = alert logic and location, ``publish`` = decision →
sent on the socket (the scoring thread sends ``score`` itself), ``end_to_end`` = ring write → sent.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engine.deploy.bundle import load_bundle
from engine.errors import CemdError
from realtime.capture.process import CaptureProcess
from realtime.capture.sources import SourceSpec, parse_source
from realtime.clients.display_process import DisplayProcess
from realtime.clients.overlay import encode_heatmap
from realtime.config import MonitorConfig, auto_inference_workers, run_dir_or_default
from realtime.publish.publisher import AlertPublisher, CurveServerConfig
from realtime.scoring.alerts import AlertLogic, Thresholds
from realtime.scoring.frame_scorer import FrameScorer, check_modality, source_time_ns
from realtime.scoring.priority import RealtimeStep
from realtime.states import SOURCE_FAULTS, MonitorState, SourceState
from realtime.stats import RateMeter, StageLatencies
from realtime.summary import run_summary, status_payload
from realtime.supervisor import supervised_restarts

Log = Callable[[str], None]
_MAX_SCORER_FAILURES = 10


@dataclass
class LiveState:
    """What the dashboard shows; written by the scoring loop only, read by the dashboard thread."""

    state: MonitorState = MonitorState.STARTING
    message: str | None = None
    source_state: str = SourceState.OPENING
    source: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    scores: deque = field(default_factory=lambda: deque(maxlen=120))
    threshold: float | None = None
    recent_alerts: deque = field(default_factory=lambda: deque(maxlen=8))
    frames_scored: int = 0
    frames_failed: int = 0  # frames the branch raised on: neither scored nor dropped
    last_frame_id: int | None = None
    fps_scored: float = 0.0
    events: int = 0
    open_event: int | None = None


@dataclass
class _Job:
    """One frame between the scorer's in-order stages and its branch call (possibly in a worker)."""

    frame_id: int
    pts: int | None
    time_base: tuple[int, int] | None
    t_capture_wall_ns: int
    t_capture_mono_ns: int
    source_ns: int
    tensor: torch.Tensor
    box: tuple[int, int, int]
    modality: str
    t_got: int
    t_pre: int
    t_inf: int = 0
    amap: torch.Tensor | None = None
    score: float = float("nan")
    error: Any = None  # the branch's exception (or a worker's message): counted, never scored


class Monitor:
    def __init__(self, config: MonitorConfig, log: Log = print) -> None:
        config.validate()
        self.cfg = config
        self.log = log
        self.live = LiveState()
        self.latency = StageLatencies()
        self.warnings: list[str] = []
        self._stop = threading.Event()
        self._rate = RateMeter()
        self.alerts_sent: list[dict[str, Any]] = []
        self.routes: list[tuple[int, str]] = []
        self.scorer_failures = 0  # in a row
        self.send_step = RealtimeStep(config.publish.rt_send)  # decision → score sent at SCHED_FIFO 1
        self._scorer_gave_up = False
        self.final_summary: dict[str, Any] | None = None  # once a run that got past set-up has finished
        self._last_scored: tuple[int, int | None, int] | None = None  # frame_id, pts, source time of the last scored frame
        self._t_first_scored: int | None = None
        self._t_last_scored: int | None = None
        self.exit_code = 0
        self.restarts = supervised_restarts()  # None unless started by `--supervise`
        self.spec: SourceSpec = parse_source(config.source.source)  # bad --source fails here, before anything loads
        self.run_dir = run_dir_or_default(config.run.run_dir)
        self.publisher: AlertPublisher | None = None
        self.capture: CaptureProcess | None = None
        # Set while loading the model; None/empty until then, which status and summary report as such.
        self.device: str | None = None
        self.scorer: FrameScorer | None = None
        self.thresholds: Thresholds | None = None
        self.alerts: AlertLogic | None = None
        self.pool: Any = None  # realtime.scoring.infer_pool.InferencePool with --inference-workers ≥ 2
        self.display: DisplayProcess | None = None  # the overlay display process (--overlay)
        self.display_summary: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        self.log(f"[yellow]warning:[/] {text}")

    def _device(self) -> str:
        d = self.cfg.scoring.device
        if d == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if d == "cuda" and not torch.cuda.is_available():
            raise CemdError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
        return d

    def _load_model(self) -> None:
        sc = self.cfg.scoring
        self.bundle = load_bundle(sc.bundle)
        self.device = self._device()
        check_modality(self.bundle, sc.modality)  # a bundle that cannot run says so before anything compiles
        self.thresholds = Thresholds.for_bundle(self.bundle)
        if self.thresholds.warning:
            self._warn(self.thresholds.warning)
        self.scorer = FrameScorer.from_bundle(self.bundle, sc.modality, sc.backend, self.device, sc.precision,
                                              sc.switch_frames, sc.switch_confidence, sc.redetect_fov_every,
                                              log=lambda s: self.log(f"  {s}"), build=sc.build_missing)
        for warning in self.scorer.warnings:
            self._warn(warning)
        self.alerts = AlertLogic(self.thresholds, self.cfg.alerts,
                                 first_event_id=self.publisher.event_id_base if self.publisher else 0)
        for last in self.publisher.orphaned_events if self.publisher else []:
            self.publisher.publish("alert", AlertLogic.end_orphan(last))  # a dead monitor left it open
            self.log(f"event {last.get('event_id')} was left open by the previous monitor on this run folder: ended "
                     "(monitor_restarted)")
        self._start_workers()

    @property
    def backends(self) -> dict[str, str]:
        """Backend of each loaded branch; empty while the model loads."""
        return self.scorer.backends if self.scorer is not None else {}

    @property
    def _lossless(self) -> bool:
        """A file analysed --fast: every frame, none dropped (live and paced sources: latest wins)."""
        return not self.spec.is_live and not self.cfg.source.realtime

    @property
    def inference_workers(self) -> int:
        """Branch worker processes in use; 1 = the branch runs in the scoring thread."""
        return self.pool.workers if self.pool is not None else 1

    def _start_workers(self) -> None:
        n = self.cfg.scoring.inference_workers
        if n == "auto":
            n = auto_inference_workers(self._lossless, self.device)
        if n < 2:
            return
        if self.device != "cpu":
            self._warn(f"--inference-workers {n} is for CPUs; on {self.device} the branch runs in the scoring thread")
            return
        from realtime.scoring.infer_pool import InferencePool

        self.log(f"starting {n} inference workers (one thread each) …")
        torch.set_num_threads(1)  # this process now only prepares frames; its OpenMP threads would spin
        self.pool = InferencePool(str(self.bundle.path), {m: (b.backend, b.precision) for m, b in self.scorer.branches.items()},
                                  self.device, n, self.bundle.model.input_size)
        self.pool.start()
        self.log(f"inference workers ready (pids {', '.join(str(p) for p in self.pool.pids)})")

    def _start_publisher(self) -> None:
        pc = self.cfg.publish
        curve = None
        if pc.curve_secret or pc.curve_allow:
            if not (pc.curve_secret and pc.curve_allow):
                raise CemdError("CURVE needs both --curve-secret (the monitor's secret key file) and --curve-allow "
                                "(a folder of allowed client public keys); make keys with: cemd keys")
            curve = CurveServerConfig(Path(pc.curve_secret), Path(pc.curve_allow))
        self.publisher = AlertPublisher(pc.publish, pc.replay, run_dir=self.run_dir, publisher_id=pc.publisher_id,
                                        heartbeat_interval=pc.heartbeat_s, curve=curve, sndhwm=pc.sndhwm,
                                        sndbuf=pc.sndbuf,
                                        state_provider=lambda: {"state": self.live.state,
                                                                "last_frame_id": self.live.last_frame_id})
        self.publisher.start()

    def setup(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start_publisher()  # first: a port in use fails in a second, not after the model loads
        self.publish_status()
        self._start_display()  # while the model loads, so that it is ready for the first frame
        self.log(f"loading bundle {self.cfg.scoring.bundle} …")
        self._load_model()
        sc = self.cfg.source
        self.capture = CaptureProcess(self.spec, realtime=sc.realtime, loop=sc.loop, slots=sc.ring_slots,
                                      open_timeout=sc.open_timeout_s, read_timeout=sc.read_timeout_s,
                                      stall_after_s=sc.stall_after_s)
        self.log(f"opening source {self.spec} …")
        self.capture.start()
        if self.display is not None:
            self.display.hand_ring(self.capture.ring_name)
        self.live.state = MonitorState.RUNNING

    def _start_display(self) -> None:
        if self.cfg.run.overlay != "none":
            self.display = DisplayProcess(self.cfg.run, self.cfg.display, self.cfg.publish.publish, self.run_dir, self.log,
                                          self._warn)

    def _stop_display(self) -> None:
        if self.display is not None:
            self.display_summary = self.display.stop()

    # ------------------------------------------------------------------ status

    def _source_status(self) -> dict[str, Any]:
        s = self.capture.stats() if self.capture else {}
        return {"kind": self.spec.kind, "target": str(self.spec), "state": s.get("state", SourceState.OPENING),
                "frames_read": s.get("frames_read", 0), "frames_dropped": s.get("frames_dropped", 0),
                "decode_errors": s.get("decode_errors", 0), "fps": round(float(s.get("fps") or 0.0), 2),
                "width": s.get("width"), "height": s.get("height"),
                "last_frame_age_ms": s.get("last_frame_age_ms"), "reconnects": s.get("reconnects", 0)}

    def _lasting_fault(self) -> str | None:
        """A fault that outlives a recovered source: the overlay gone, the alert log unwritable."""
        log_fault = self.publisher.log_fault if self.publisher else None
        display_lost = self.display.check() if self.display is not None else None
        return "; ".join(f for f in (display_lost, log_fault) if f) or None

    def publish_status(self, source_state: str | None = None) -> None:
        """Publish the status; ``source_state``: a source state passed since the last loop (see
        `_handle_source_events`), published with the source's other figures as they are now."""
        src = self._source_status()
        if source_state is not None:
            src = {**src, "state": source_state}
        self.live.source, self.live.source_state = src, src["state"]
        # one consistent view: a bad source degrades the pipeline
        if self.live.state in (MonitorState.RUNNING, MonitorState.DEGRADED):
            lasting = self._lasting_fault()
            if src["state"] in SOURCE_FAULTS:
                self._fault(self.live.message or f"source {src['state']}")
            elif lasting and not self.scorer_failures:
                self._fault(lasting)  # shown on the dashboard and in the log, not only published
            elif src["state"] == SourceState.RUNNING and self.live.state == MonitorState.DEGRADED and not self.scorer_failures:
                self.live.state, self.live.message = MonitorState.RUNNING, None
        payload = status_payload(self, src)
        if self.publisher:
            self.publisher.publish("status", payload)

    def _fault(self, message: str) -> None:
        if self.live.message != message:
            self.live.message = message
            self.log(f"[red]fault:[/] {message}")
        self.live.state = MonitorState.DEGRADED

    # ------------------------------------------------------------------ the loop

    def _source_time_ns(self, frame: Any) -> int:
        """Source time for hold timers: PTS for files (so --fast analysis keeps real durations)."""
        pts = frame.pts if not self.spec.is_live else None
        return source_time_ns(pts, frame.time_base, frame.t_capture_mono_ns)

    def _prepare(self, frame: Any) -> _Job | None:
        """Field of view, crop, routing: the in-order part before the branch; None when the capture
        lapped the slot while it was read (counted as dropped)."""
        t_got = time.monotonic_ns()
        tensor, crop, box = self.scorer.crop(frame.image)  # reads the crop straight out of the ring
        if not self.capture.release(frame):
            return None
        modality, _switched = self.scorer.route(crop)
        return _Job(frame.frame_id, frame.pts, frame.time_base, frame.t_capture_wall_ns, frame.t_capture_mono_ns,
                    self._source_time_ns(frame), tensor, box, modality, t_got, time.monotonic_ns())

    def _score_frame(self, frame: Any) -> None:
        """One frame start to end on this thread (no inference workers)."""
        job = self._prepare(frame)
        if job is None:
            return
        try:
            job.amap, job.score = self.scorer.run_branch(job.modality, job.tensor)
        except Exception as exc:  # noqa: BLE001 — a scorer fault becomes a status, not a silent stop
            job.error = exc
        job.t_inf = time.monotonic_ns()
        self._complete(job)

    def _complete(self, job: _Job) -> None:
        """Alert logic and publishing for a frame whose branch call is done, in frame order."""
        modality, exc = job.modality, job.error
        if exc is not None:
            self.scorer_failures += 1
            self.live.frames_failed += 1
            self._fault(f"{modality.upper()} branch failed on frame {job.frame_id}: {exc}")
            if self.scorer_failures == 1:
                self.publish_status()  # at once: a client must not wait for the next status tick
            if self.scorer_failures >= _MAX_SCORER_FAILURES:
                self._scorer_gave_up = True
                why = f"the {modality.upper()} branch failed {self.scorer_failures} frames in a row; last error: {exc}"
                self._fault(f"stopping: {why}")  # the last status says why the monitor stopped
                raise CemdError(why) from (exc if isinstance(exc, BaseException) else None)
            return
        if self.scorer_failures:
            self.scorer_failures, self.live.message, self.live.state = 0, None, MonitorState.RUNNING
            self.log(f"{modality.upper()} branch scoring again from frame {job.frame_id}")
            self.publish_status()  # shows a lasting fault (display gone, log unwritable) again, if any
        amap, score = job.amap, job.score
        self._last_scored = (job.frame_id, job.pts, job.source_ns)  # where an event still open at the end ends
        with self.send_step():
            decision, t_dec, payload, publish_ms = self._decide_and_send(job)
        for alert in decision.alerts:
            self._emit_alert(alert)
        if self.cfg.publish.maps:  # after the score is out: the overlay's heat map, never in its way
            heat = encode_heatmap(amap[0, 0], self.cfg.publish.map_size, 2 * decision.threshold)
            self.publisher.publish("map", {"frame_id": job.frame_id, "modality": modality,
                                           "box": [int(v) for v in job.box], "location": decision.location, **heat})
        for stage, ms in payload["timings_ms"].items():
            self.latency.add(stage, ms)
        if publish_ms is not None:  # sent: the frame's last two stages
            self.latency.add("publish", publish_ms)
            self.latency.add("end_to_end", (t_dec - job.t_capture_mono_ns) / 1e6 + publish_ms)
        self.routes.append((job.frame_id, modality))
        live = self.live
        live.frames_scored += 1
        live.last_frame_id, live.modality, live.threshold = job.frame_id, modality, decision.threshold
        live.scores.append(score)
        live.open_event = decision.event_id
        self._rate.tick(t_dec)
        if self._t_first_scored is None:
            self._t_first_scored = job.t_got
        self._t_last_scored = t_dec
        live.fps_scored = self._rate.rate(t_dec)

    def _decide_and_send(self, job: _Job) -> tuple[Any, int, dict[str, Any], float | None]:
        """Alert logic, then the score message sent: the frame's last, short, urgent step."""
        amap, modality, score, t_inf = job.amap, job.modality, job.score, job.t_inf
        decision = self.alerts.update(job.frame_id, job.pts, job.source_ns, modality, score,
                                      lambda: amap[0, 0].float().cpu().numpy(), job.box)
        t_dec = time.monotonic_ns()
        payload = {
            "frame_id": job.frame_id, "pts": job.pts,
            "time_base": list(job.time_base) if job.time_base else None,
            "t_capture_wall_ns": job.t_capture_wall_ns, "t_capture_mono_ns": job.t_capture_mono_ns,
            "timings_ms": {"capture": round((job.t_got - job.t_capture_mono_ns) / 1e6, 3),
                           "preprocess": round((job.t_pre - job.t_got) / 1e6, 3),
                           "inference": round((t_inf - job.t_pre) / 1e6, 3),
                           "decision": round((t_dec - t_inf) / 1e6, 3)},
            "modality": modality, "modality_mode": "auto" if self.cfg.scoring.modality == "auto" else "fixed",
            "backend": self.backends[modality], "score": round(score, 6),
            "threshold": round(decision.threshold, 6), "event_state": decision.event_state,
            "event_id": decision.event_id, "location": decision.location, "t_decision_mono_ns": t_dec,
        }
        return decision, t_dec, payload, self.publisher.publish_score_now(payload)

    def _emit_alert(self, alert: dict[str, Any]) -> None:
        self.publisher.publish("alert", alert)
        self.alerts_sent.append(alert)
        if alert["event"] == "start":
            self.live.events += 1
        if alert["event"] != "update":
            self.live.recent_alerts.append(alert)

    def _handle_source_events(self) -> None:
        events = self.capture.poll_events()
        for ev in events:
            if ev.state in SOURCE_FAULTS:
                self._fault(f"source {ev.state}" + (f": {ev.message}" if ev.message else ""))
        # one status per state passed: a source that went stalled and then reconnecting between two
        # loops is published as both, in order, not only as the second
        passed = [ev.state for i, ev in enumerate(events) if i == 0 or ev.state != events[i - 1].state]
        for state in passed[:-1]:
            self.publish_status(source_state=state)
        if events:
            self.publish_status()

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Set up, score until the source ends (or Ctrl-C / max_seconds), write the summary."""
        t0 = time.monotonic()
        # The scoring thread shares the GIL with the capture reader and publisher threads; when
        # one of them waits for it, the scoring thread gives it up only after the switch
        # interval (5 ms by default), which showed up directly in the publish-delay tail.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            self.setup()
            self.t_running = time.monotonic()
            if self.pool is not None:
                try:
                    self._loop_with_workers(self.pool)
                except CemdError as exc:
                    if not self._scorer_gave_up:  # a worker died: the run cannot go on without its branch
                        self._scorer_gave_up = True
                        self._fault(f"stopping: {exc}")
                    raise
            else:
                self._loop()
        finally:
            summary = self._finish(time.monotonic() - t0)
            sys.setswitchinterval(switch)
        return summary

    def _out_of_time(self, now: float) -> bool:
        if self.cfg.run.max_seconds and now - self.t_running >= self.cfg.run.max_seconds:
            self._stop.set()  # a stop like Ctrl-C: an open event ends with reason "stopped"
            return True
        return False

    def _capture_lost(self) -> bool:
        if self.capture.alive:
            return False
        self._fault(self.capture.stats().get("message") or "capture process died")
        self.exit_code = 1
        return True

    def _loop(self) -> None:
        """One frame at a time on this thread: take, prepare, branch, decide, publish."""
        next_status = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._out_of_time(now):
                break
            frame = self.capture.next_frame(timeout=0.05, copy=False, fresh=self.cfg.source.fresh_wait)
            self._handle_source_events()
            if frame is not None:
                self._score_frame(frame)
            elif self.capture.ended or self._capture_lost():
                break
            if now >= next_status:
                self.publish_status()
                next_status = now + self.cfg.run.status_every_s

    def _loop_with_workers(self, pool: Any) -> None:
        """Branch calls in worker processes, one frame in flight per worker; this thread prepares
        the next frame while they run and completes frames strictly in frame order. A live source
        hands over a frame only when a worker is free (latest frame wins, nothing waits to go stale);
        a file in --fast mode has the next frame prepared and waiting."""
        next_status = 0.0
        in_flight: deque[_Job] = deque()
        by_worker: dict[int, _Job] = {}
        ready: _Job | None = None
        source_done = False
        lossless = self._lossless
        while not self._stop.is_set():
            now = time.monotonic()
            if self._out_of_time(now):
                break
            pool.check()  # a worker that died while idle stops the monitor now, not when next needed
            if ready is None and not source_done and (pool.free or lossless):
                # wait for a frame only when there is nothing to collect meanwhile
                frame = self.capture.next_frame(timeout=0.002 if in_flight else 0.05, copy=False,
                                                fresh=self.cfg.source.fresh_wait)
                self._handle_source_events()
                if frame is not None:
                    ready = self._prepare(frame)
                elif self.capture.ended or self._capture_lost():
                    source_done = True
            if ready is not None and pool.free:
                by_worker[pool.submit(ready.modality, ready.tensor)] = ready
                ready.tensor = None  # in the worker's buffer now
                in_flight.append(ready)
                ready = None
            if in_flight:
                idle = ready is not None or not pool.free or source_done
                self._collect(pool, by_worker, in_flight, 0.05 if idle else 0.0)
            elif source_done:
                break
            if now >= next_status:
                self.publish_status()
                next_status = now + self.cfg.run.status_every_s
        # stopped (Ctrl-C, --max-seconds): the frames already in the workers still get their result
        deadline = time.monotonic() + 10
        while in_flight and time.monotonic() < deadline:
            self._collect(pool, by_worker, in_flight, 0.05)

    def _collect(self, pool: Any, by_worker: dict[int, _Job], in_flight: deque[_Job], timeout: float) -> None:
        """Take the workers' results (waiting up to ``timeout`` s), then complete the frames at the
        head of the queue whose result is in: a frame finished early waits for the ones before it."""
        for result in pool.collect(timeout):
            job = by_worker.pop(result.worker)
            job.t_inf = time.monotonic_ns()
            job.amap, job.error = result.amap, result.error
            job.score = result.score if result.score is not None else float("nan")
        while in_flight and in_flight[0].t_inf:
            self._complete(in_flight.popleft())

    # ------------------------------------------------------------------ the end

    def _finish(self, seconds: float) -> dict[str, Any]:
        if self.alerts and self._last_scored is not None:
            reason = "scorer_failed" if self._scorer_gave_up else "stopped" if self._stop.is_set() else "source_ended"
            # on the scoring clock (PTS for files), so the event's duration is in the source's time
            for alert in self.alerts.close(*self._last_scored, reason):
                self._emit_alert(alert)
        src = self._source_status() if self.capture else {}
        if self.pool is not None:
            self.pool.close()
        if self.capture:
            self.capture.stop()
        self._stop_display()  # before the publisher closes: its last frames still get their results
        self.live.state = MonitorState.STOPPED
        self.publish_status()
        if self.publisher:
            self.publisher.close()  # sends everything queued first
        summary = run_summary(self, seconds, src)
        if self.run_dir.exists():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.live.frames_scored or self.live.frames_failed:
            self.final_summary = summary
        return summary

    @property
    def scoring_seconds(self) -> float:
        """From the first frame taken to the last one scored."""
        return (self._t_last_scored - self._t_first_scored) / 1e9 if self._t_first_scored else 0.0


def install_signal_handlers(monitor: Monitor) -> None:
    """SIGTERM and a first Ctrl-C stop the run cleanly (events closed, summary written); a second Ctrl-C aborts."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigint(*_: Any) -> None:
        if monitor._stop.is_set():
            raise KeyboardInterrupt
        monitor.request_stop()

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, monitor.request_stop)
    if os.name == "posix":
        signal.signal(signal.SIGHUP, monitor.request_stop)
