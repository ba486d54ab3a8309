"""The live rich dashboard and the end-of-run summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_BARS = "▁▂▃▄▅▆▇█"
_STATE_STYLE = {"running": "bold green", "starting": "yellow", "degraded": "bold red", "stopped": "dim",
                "opening": "yellow", "stalled": "bold red", "reconnecting": "bold yellow", "ended": "dim",
                "error": "bold red"}


def sparkline(values: list[float], threshold: float | None, width: int = 60) -> Text:
    """Recent scores as block characters; red where above the threshold."""
    vals = list(values)[-width:]
    if not vals:
        return Text("no scores yet", style="dim")
    lo = min(vals + ([threshold] if threshold else []))
    hi = max(vals + ([threshold] if threshold else []))
    span = max(hi - lo, 1e-9)
    out = Text()
    for v in vals:
        ch = _BARS[min(len(_BARS) - 1, int((v - lo) / span * (len(_BARS) - 1) + 0.5))]
        out.append(ch, style="bold red" if threshold is not None and v > threshold else "cyan")
    return out


def render(monitor: Any) -> Group:
    live = monitor.live
    src = live.source or {}
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_column(style="bold")
    head.add_column()
    state = Text(live.state.upper(), style=_STATE_STYLE.get(live.state, ""))
    sstate = Text(str(src.get("state", live.source_state)), style=_STATE_STYLE.get(str(src.get("state")), ""))
    head.add_row("monitor", state, "source", Text.assemble(sstate, f"  {src.get('target', '')}"))
    size = f"{src.get('width')}×{src.get('height')}" if src.get("width") else "?"
    failed = f" · branch failed {live.frames_failed}" if live.frames_failed else ""
    head.add_row("frames", f"read {src.get('frames_read', 0)} · scored {live.frames_scored} · "
                 f"dropped {src.get('frames_dropped', 0)} · decode errors {src.get('decode_errors', 0)}{failed}",
                 "fps", f"in {src.get('fps', 0):.1f} · scored {live.fps_scored:.1f} · {size}")
    backends = monitor.backends
    mod = (live.modality or "?").upper()
    head.add_row("modality", f"{mod} ({'auto' if monitor.cfg.scoring.modality == 'auto' else 'fixed'})",
                 "backend", (", ".join(f"{m.upper()} {b}" for m, b in backends.items()) or "loading")
                 + (f" · {monitor.inference_workers} workers" if monitor.inference_workers > 1 else ""))
    if live.message:
        head.add_row("fault", Text(live.message, style="bold red"), "", "")

    lat = Table(title="stage latency (ms, recent)", box=None, padding=(0, 1), title_justify="left")
    lat.add_column("stage")
    for stage in ("capture", "preprocess", "inference", "decision"):
        lat.add_column(stage, justify="right")
    for q in (50, 99):
        row = [f"p{q}"]
        for stage in ("capture", "preprocess", "inference", "decision"):
            v = monitor.latency.recent_p(stage, q)
            row.append("–" if v is None else f"{v:.1f}")
        lat.add_row(*row)

    thr = live.threshold
    score_line = Text.assemble(
        ("score ", "bold"), (f"{live.scores[-1]:.4f}" if live.scores else "–"),
        ("  threshold ", "bold"), (f"{thr:.4f}" if thr is not None else "–"),
        ("  ALERT OPEN" if live.open_event is not None else "", "bold white on red"))

    alerts = Table(title=f"alert events ({live.events})", box=None, padding=(0, 1), title_justify="left")
    for col in ("event", "id", "modality", "frame", "peak", "box"):
        alerts.add_column(col)
    for a in list(live.recent_alerts)[-6:]:
        loc = a.get("location") or {}
        alerts.add_row(Text(a["event"], style="bold red" if a["event"] == "start" else ""), str(a["event_id"]),
                       a["modality"].upper(), str(a["frame_id"]), f"{a['peak_score']:.4f}", str(loc.get("box", "")))
    return Group(Panel(head, title="CEMD monitor", border_style="blue"), lat, score_line,
                 sparkline(list(live.scores), thr), alerts)


def summary_table(summary: dict[str, Any]) -> Group:
    t = Table(title="stage latency (ms)", box=None, padding=(0, 1), title_justify="left")
    for col in ("stage", "n", "p50", "p95", "p99", "max", "tail", "flatness"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for stage, s in summary["latency_ms"].items():
        if s.get("n"):
            t.add_row(stage, str(s["n"]), *(f"{s[k]:.2f}" for k in ("p50", "p95", "p99", "max", "tail", "flatness")))
    lines = [
        f"frames read {summary['frames_read']} · scored {summary['frames_scored']} · dropped "
        f"{summary['frames_dropped']} · decode errors {summary['decode_errors']}"
        + (f" · branch failed {summary['frames_failed']}" if summary.get("frames_failed") else "")
        + f" · {summary['seconds']:.1f} s",
        f"alert events {summary['events']} ({summary['alerts']} messages) · backends "
        + ", ".join(f"{m.upper()} {b}" for m, b in summary["backend"].items())
        + (f" · {summary['inference_workers']} inference workers" if summary.get("inference_workers", 1) > 1 else ""),
    ]
    gt = summary.get("synthetic_ground_truth")
    if gt:
        lines.append(f"against the synthetic video's own ground truth (SYNTHETIC): routing accuracy "
                     f"{gt['routing_accuracy']:.2%} over {gt['frames_routed']} frames · lesion intervals with an "
                     f"alert {gt['lesion_intervals_with_alert']}/{gt['lesion_intervals']} · events outside lesions "
                     f"{gt['events_outside_lesions']}")
    lines.append(f"run folder {summary['run_dir']} (summary.json, alerts.jsonl)")
    return Group(t, *(Text(line) for line in lines))
