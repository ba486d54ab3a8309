"""What the monitor reports about itself: the status payload (published every few seconds and at
each change of state) and the run summary (``summary.json``), built from its public state."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch

from calibration.events import alert_intervals, truth_modality
from engine.model.config import MODALITIES
from realtime.capture.sources import synthetic_events

Monitor = Any  # realtime.monitor.Monitor (not imported: it imports this module)


def versions() -> dict[str, str]:
    import av
    import cv2
    import zmq

    import engine

    return {"cemd": getattr(engine, "__version__", "0.1.0"), "python": platform.python_version(),
            "torch": torch.__version__, "av": av.__version__, "ffmpeg": str(av.library_versions.get("libavcodec")),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "opencv": cv2.__version__,
            "numpy": np.__version__}


def status_payload(m: Monitor, src: dict[str, Any]) -> dict[str, Any]:
    """The ``status`` message (docs/SCHEMA.md): pipeline state, source, scorer, the open event."""
    ev = m.alerts.open_event if m.alerts else None
    open_events = [a for a in m.alerts_sent[-1:] if ev is not None and a["event_id"] == ev.id]
    live = m.live
    return {
        "state": live.state, "message": live.message, "source": src,
        "scorer": {"state": "failing" if m.scorer_failures else "ready" if m.alerts else "loading",
                   "modality": live.modality,
                   "modality_mode": "auto" if m.cfg.scoring.modality == "auto" else "fixed",
                   "backends": {mod: m.backends.get(mod) for mod in MODALITIES},
                   "fps": round(live.fps_scored, 2), "frames_failed": live.frames_failed,
                   "inference_workers": m.inference_workers},
        "open_events": open_events,
        **({"restarts": m.restarts} if m.restarts is not None else {}),
    }


def run_summary(m: Monitor, seconds: float, src: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` (docs/STREAMING.md, "Run folder")."""
    starts = [a for a in m.alerts_sent if a["event"] == "start"]
    scoring_s, live = m.scoring_seconds, m.live
    router = m.scorer.router if m.scorer is not None else None
    out: dict[str, Any] = {
        "schema": "cemd.summary/1", "run_dir": str(m.run_dir), "seconds": round(seconds, 2),
        "source": src, "frames_read": src.get("frames_read", 0), "frames_scored": live.frames_scored,
        "frames_dropped": src.get("frames_dropped", 0), "frames_failed": live.frames_failed,
        "decode_errors": src.get("decode_errors", 0),
        "scoring_seconds": round(scoring_s, 3),
        "fps_scored": round(live.frames_scored / scoring_s, 2) if scoring_s > 0 else None,
        "latency_ms": m.latency.summary(), "alerts": len(m.alerts_sent), "events": len(starts),
        "event_list": [{k: a[k] for k in ("event_id", "modality", "start_frame_id", "peak_score", "peak_frame_id")}
                       for a in starts],
        "backend": m.backends,
        "backend_timings_ms": m.scorer.timings if m.scorer is not None else {},  # auto on the CPU: how it chose
        "device": m.device,
        "inference_workers": m.inference_workers,
        "thresholds": {"values": m.thresholds.values, "source": m.thresholds.source,
                       "n_of_m": list(m.alerts.n_of_m) if m.alerts else None}
        if m.thresholds else None,
        "modality_mode": m.cfg.scoring.modality,
        "modality_switches": router.switches if router is not None else 0,
        "publisher": {"endpoint": m.cfg.publish.publish, "rt_send": m.send_step.state,
                      "boot_id": m.publisher.boot_id if m.publisher else None,
                      "log_errors": m.publisher.log_errors if m.publisher else 0},
        "display": m.display_summary,
        "restarts": m.restarts,  # under --supervise: times the supervisor started the monitor again; else null
        "warnings": m.warnings, "state": live.state, "message": live.message,
        "versions": versions(), "config": m.cfg.to_json(),
    }
    if m.spec.kind == "synthetic" and m.routes:
        out["synthetic_ground_truth"] = against_synthetic_truth(m.routes, m.alerts_sent, synthetic_events(m.spec))
    return out


def against_synthetic_truth(routes: list[tuple[int, str]], alerts: list[dict[str, Any]],
                            truth: dict[str, Any]) -> dict[str, Any]:
    """Routing accuracy and lesion intervals with an alert, against a synthetic source's own events
    (SYNTHETIC; the event-level metrics of calibration.events, for the demo's closing lines)."""
    routed = [(f, mod) for f, mod in routes if f < truth["frames"]] or [(0, "")]
    shown = truth_modality(truth, np.full(truth["frames"], "", dtype="<U3"))
    acc = sum(mod == shown[f] for f, mod in routed) / len(routed)
    opened = [(ev["start_frame"], ev["end_frame"]) for ev in alert_intervals(alerts)]

    def overlaps(a: int, b: int, lesion: dict[str, Any]) -> bool:
        return a <= lesion["end_frame"] and b >= lesion["start_frame"]

    # only the lesions of the part of the video the run actually played
    intervals = [e for e in truth["lesions"] if overlaps(routed[0][0], routed[-1][0], e)]
    hit = [e for e in intervals if any(overlaps(a, b, e) for a, b in opened)]
    return {"synthetic": True, "frames_routed": len(routed), "routing_accuracy": round(acc, 4),
            "lesion_intervals": len(intervals), "lesion_intervals_with_alert": len(hit),
            "events_outside_lesions": sum(not any(overlaps(a, b, e) for e in intervals) for a, b in opened)}
