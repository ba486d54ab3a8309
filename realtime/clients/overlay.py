"""What the overlay display draws, and the state it draws from.

`ResultState` keeps the latest result received over ZeroMQ (score, heat map, open event,
status, heartbeat) and decides whether the AI is active; `draw_overlay` paints one frame
from a `View` of it. Both are plain functions of their inputs, so the display process, the
tests and anyone embedding the overlay elsewhere draw the same thing.

The default look is the clinical one: one box around the lesion where the latest scored frame
has it, a small status light, and AI NOT ACTIVE when results stop, all placed by `Layout` off
the lit image and away from the scope's own text. The heat map (key h) and the technical
numbers (``debug``: latencies, backend, score) are opt-in.

Heat maps travel on the ``map`` topic as a small 8-bit grid (``encode_heatmap``): value / vmax,
where vmax is twice the alert threshold, so 128 is the threshold itself.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from realtime.clients.layout import CORNERS, Layout, Rect

MAP_ENCODING = "u8-base64"

# colours (RGB)
# The lesion box: Okabe–Ito sky blue. Blue is absent from white-light mucosa, this one is light
# enough to show on the dark lumen, and it stays far from mucosa, blood, bile, glints and NBI
# tones in normal vision and in simulated protanopia and deuteranopia (worst CIELAB ΔE 43,
# against 6 for a green box and 35 for yellow; tests/test_display.py measures it).
BOX_COLOUR = (86, 180, 233)
INACTIVE_AMBER = (255, 170, 0)
OK_GREEN = (40, 200, 80)
ALERT_RED = (220, 30, 30)  # debug look: a score above the threshold
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def encode_heatmap(amap: Any, size: int, vmax: float) -> dict[str, Any]:
    """An anomaly map (S×S, torch or numpy) as a ``size``×``size`` 8-bit grid scaled by ``vmax``."""
    if hasattr(amap, "detach"):  # torch: to numpy here; no torch op on the scoring thread (see below)
        amap = amap.detach().float().cpu().numpy()
    # cv2, not torch: a torch op between two branch calls measured 4× slower branch calls in the
    # monitor (32 → 122 ms p50 at 640x480, the OpenMP pool contended), while cv2 costs ~0.1 ms here
    grid = cv2.resize(np.asarray(amap, np.float32).reshape(np.shape(amap)[-2:]), (size, size),
                      interpolation=cv2.INTER_AREA)
    vmax = float(vmax) if vmax and np.isfinite(vmax) and vmax > 0 else 1.0
    q = np.clip(np.nan_to_num(grid, nan=0.0) / vmax * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return {"size": [size, size], "vmax": round(vmax, 6), "encoding": MAP_ENCODING,
            "data": base64.b64encode(q.tobytes()).decode("ascii")}


def decode_heatmap(message: dict[str, Any]) -> np.ndarray | None:
    """The grid of a ``map`` message as float32 in [0, 1] (1 = vmax), or None if it is malformed."""
    try:
        h, w = (int(v) for v in message["size"])
        if message.get("encoding") != MAP_ENCODING or not (0 < h <= 1024 and 0 < w <= 1024):
            return None
        raw = base64.b64decode(message["data"], validate=True)
        if len(raw) != h * w:
            return None
        return np.frombuffer(raw, np.uint8).reshape(h, w).astype(np.float32) / 255.0
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class OverlayOptions:
    heatmap: bool = False  # key h
    debug: bool = False  # the technical numbers (latencies, backend, score); key d
    opacity: float = 0.45
    max_result_age_s: float = 1.0  # a newer score than this must have arrived, else AI NOT ACTIVE
    heartbeat_timeout_s: float = 3.0  # no message at all for this long: AI NOT ACTIVE

    def change_opacity(self, step: float) -> None:
        self.opacity = float(min(1.0, max(0.05, round(self.opacity + step, 2))))


@dataclass
class View:
    """Everything `draw_overlay` needs for one frame."""

    active: bool
    reason: str | None = None  # why not active
    score: float | None = None
    threshold: float | None = None
    modality: str | None = None
    backend: str | None = None
    event_id: int | None = None  # an open alert event
    location: dict[str, Any] | None = None
    heatmap: np.ndarray | None = None
    heat_box: tuple[int, int, int] | None = None  # crop square (x0, y0, side) in source pixels
    result_age_ms: float | None = None
    display_latency_ms: float | None = None
    result_frame_id: int | None = None


@dataclass
class ResultState:
    """The latest monitor messages, fed by the receiver thread, read by the drawing loop."""

    options: OverlayOptions = field(default_factory=OverlayOptions)
    score: dict[str, Any] | None = None
    t_score: float = 0.0
    heat: tuple[int, np.ndarray, tuple[int, int, int]] | None = None  # (frame_id, grid, box)
    open_event: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    t_message: float | None = None
    boot_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"messages": 0, "bad_messages": 0, "boot_changes": 0,
                                                            "alerts": 0})
    problems: list[str] = field(default_factory=list)  # the last 20, newest last (for summaries)
    event_starts: list[int] = field(default_factory=list)  # event ids, for the audible cue

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._unreported: list[str] = []  # problems not yet taken by take_problems()

    def problem(self, text: str) -> None:
        with self._lock:
            self.counts["bad_messages"] += 1
            self._note(text)

    def _note(self, text: str) -> None:
        """With the lock held: keep a problem for the summary and for the next take_problems()."""
        self.problems.append(text)
        del self.problems[:-20]
        self._unreported.append(text)
        del self._unreported[:-100]  # a reader that never takes them costs nothing

    def update(self, message: dict[str, Any], now: float | None = None) -> None:
        """Take one decoded, validated message."""
        now = time.monotonic() if now is None else now
        topic = message.get("topic")
        with self._lock:
            self.counts["messages"] += 1
            self.t_message = now
            boot = message.get("boot_id")
            if self.boot_id is not None and boot != self.boot_id:
                self.counts["boot_changes"] += 1
                self.open_event, self.score, self.heat = None, None, None  # a restarted monitor starts afresh
                self._note(f"monitor restarted (boot {str(boot)[:8]})")
            self.boot_id = boot
            if topic == "score":
                self.score, self.t_score = message, now
            elif topic == "map":
                grid = decode_heatmap(message)
                box = message.get("box")
                if grid is not None and isinstance(box, list) and len(box) == 3:
                    self.heat = (int(message.get("frame_id", -1)), grid, (int(box[0]), int(box[1]), int(box[2])))
            elif topic == "alert":
                self.counts["alerts"] += 1
                if message.get("event") == "start":
                    self.event_starts.append(int(message.get("event_id", -1)))
                if message.get("event") in ("start", "update"):
                    self.open_event = message
                elif self.open_event is None or message.get("event_id") == self.open_event.get("event_id"):
                    self.open_event = None
            elif topic == "status":
                self.status = message
                if message.get("state") == "stopped":
                    self.open_event = None

    def take_problems(self) -> list[str]:
        """Problems since the last call (at most the last 100), oldest first."""
        with self._lock:
            out, self._unreported = self._unreported, []
            return out

    def take_event_starts(self) -> list[int]:
        with self._lock:
            out, self.event_starts = self.event_starts, []
            return out

    def view(self, now: float | None = None) -> View:
        """The overlay for a frame shown now: the latest result, or why the AI is not active."""
        now = time.monotonic() if now is None else now
        opts = self.options
        with self._lock:
            score, t_score, heat, event, status = self.score, self.t_score, self.heat, self.open_event, self.status
            t_message = self.t_message
        reason = None
        if t_message is None:
            reason = "no contact with the monitor"
        elif now - t_message > opts.heartbeat_timeout_s:
            reason = f"monitor silent for {now - t_message:.0f} s"
        elif status is not None and status.get("state") in ("stopped", "error"):
            reason = f"monitor {status.get('state')}"
        elif status is not None and isinstance(status.get("scorer"), dict) and status["scorer"].get("state") == "failing":
            reason = "the monitor's branch is failing"  # said at once: no need to wait for the results to age
        elif score is None:
            reason = "no results yet"
        elif now - t_score > opts.max_result_age_s:
            reason = f"no results for {now - t_score:.1f} s"
        if reason is not None:
            return View(active=False, reason=reason)
        assert score is not None
        grid, box = None, None
        if heat is not None and heat[0] == score.get("frame_id"):
            grid, box = heat[1], heat[2]
        event_open = event is not None and event.get("modality") == score.get("modality")
        # the latest scored frame's own location (the monitor sets one on every frame of an open
        # event), never the event's peak-frame location: with the camera moving, that is where the
        # lesion was, not where it is
        location = score.get("location")
        return View(active=True, score=_num(score.get("score")), threshold=_num(score.get("threshold")),
                    modality=score.get("modality"), backend=score.get("backend"),
                    event_id=event.get("event_id") if event_open else None, location=location,
                    heatmap=grid, heat_box=box, result_age_ms=(now - t_score) * 1000,
                    result_frame_id=score.get("frame_id"))


def scale_view(view: View, factor: float) -> View:
    """The same view for a frame resized by ``factor`` (source-pixel coordinates scaled with it)."""
    if factor == 1.0:
        return view
    out = replace(view)
    if view.location:
        loc = dict(view.location)
        if loc.get("contour"):
            loc["contour"] = [[int(round(x * factor)), int(round(y * factor))] for x, y in loc["contour"]]
        for key in ("box", "peak"):
            if loc.get(key):
                loc[key] = [int(round(v * factor)) for v in loc[key]]
        out.location = loc
    if view.heat_box is not None:
        x0, y0, side = view.heat_box
        out.heat_box = (int(round(x0 * factor)), int(round(y0 * factor)), max(1, int(round(side * factor))))
    return out


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------------- drawing


def draw_overlay(image: np.ndarray, view: View, options: OverlayOptions, layout: Layout | None = None) -> np.ndarray:
    """Paint ``view`` onto an RGB frame in place and return it. ``layout``: where labels may go
    (`Layout.measure` of this frame, before drawing, when not given; a display keeps one)."""
    layout = layout if layout is not None and layout.shape == image.shape[:2] else Layout.measure(image)
    h, w = image.shape[:2]
    unit = max(h, w) / 1000.0  # sizes scale with the frame
    font = max(0.4, 0.6 * unit)
    taken: list[Rect] = []
    if not view.active:
        title = ("AI NOT ACTIVE", font * 1.4, BLACK, INACTIVE_AMBER)
        reason = [(view.reason, font * 0.8, INACTIVE_AMBER, BLACK)] if view.reason else []
        # with its reason where that fits off the image and the text, else without, else smaller;
        # where nothing fits (a frame lit nearly edge to edge) the full label where it covers least
        _put(image, [_label([title, *reason], unit, dot=INACTIVE_AMBER), _label([title], unit, dot=INACTIVE_AMBER),
                     _label([(title[0], font * 0.9, BLACK, INACTIVE_AMBER)], unit, dot=INACTIVE_AMBER)],
             layout, taken)
        if options.debug:
            _put(image, _label(_debug_lines(view, font), unit), layout, taken, CORNERS[::-1])
        return image
    if options.heatmap and view.heatmap is not None and view.heat_box is not None:
        _blend_heatmap(image, view.heatmap, view.heat_box, options.opacity)
    if view.location and view.location.get("box") and len(view.location["box"]) == 4:
        x, y, bw, bh = (int(v) for v in view.location["box"])
        thick = max(2, int(round(2.5 * unit)))
        cv2.rectangle(image, (x, y), (x + bw, y + bh), BLACK, thick + 2, cv2.LINE_AA)  # holds on glare
        cv2.rectangle(image, (x, y), (x + bw, y + bh), BOX_COLOUR, thick, cv2.LINE_AA)
    light = BOX_COLOUR if view.event_id is not None else OK_GREEN
    _put(image, _label([("AI", font, WHITE, BLACK)], unit, dot=light), layout, taken)
    if options.debug:
        _put(image, _label(_debug_lines(view, font), unit), layout, taken, CORNERS[::-1])
    return image


def _debug_lines(view: View, font: float) -> list[tuple[str, float, tuple[int, int, int], tuple[int, int, int]]]:
    size = font * 0.75
    out = []
    if view.active:
        out.append((" | ".join(x for x in ((view.modality or "").upper(), view.backend or "") if x), size, WHITE, BLACK))
        if view.score is not None:
            above = view.threshold is not None and view.score >= view.threshold
            thr = f" / threshold {view.threshold:.3f}" if view.threshold is not None else ""
            out.append((f"score {view.score:.3f}{thr}", size, ALERT_RED if above else OK_GREEN, BLACK))
        if view.event_id is not None:
            out.append((f"event #{view.event_id}", size, BOX_COLOUR, BLACK))
    parts = []
    if view.display_latency_ms is not None:
        parts.append(f"display {view.display_latency_ms:.0f} ms")
    if view.active and view.result_age_ms is not None:
        parts.append(f"result {view.result_age_ms:.0f} ms old")
    if parts:
        out.append(("  ".join(parts), size, WHITE, BLACK))
    return out


def _label(lines: list[tuple[str, float, tuple[int, int, int], tuple[int, int, int]]], unit: float,
           dot: tuple[int, int, int] | None = None) -> np.ndarray:
    """A label drawn on its own small canvas: lines of (text, font scale, ink, background), a status
    dot before the first one. Pasted whole, it writes no pixel outside its rectangle."""
    thick = max(1, int(round(1.6 * unit)))
    pad = max(2, int(round(5 * unit)))
    sizes = [cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick) for text, scale, _, _ in lines]
    heights = [th + base + 2 * pad for (_, th), base in sizes]
    r = (heights[0] // 2 - pad // 2) if dot is not None and lines else 0
    dot_w = 2 * r + pad if dot is not None else 0
    width = max(tw + 2 * pad + (dot_w if i == 0 else 0) for i, ((tw, _), _) in enumerate(sizes)) if lines else 1
    canvas = np.zeros((max(1, sum(heights)), width, 3), np.uint8)
    y = 0
    for i, ((text, scale, ink, bg), ((tw, th), base), lh) in enumerate(zip(lines, sizes, heights)):
        x = pad
        if i == 0 and dot is not None:
            cv2.circle(canvas, (pad + r, y + lh // 2), r + 1, BLACK, -1, cv2.LINE_AA)
            cv2.circle(canvas, (pad + r, y + lh // 2), r, dot, -1, cv2.LINE_AA)
            x += dot_w
        if bg != BLACK:
            canvas[y:y + lh, x - pad // 2:x + tw + pad] = bg
        cv2.putText(canvas, text, (x, y + pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thick, cv2.LINE_AA)
        y += lh
    return canvas


def _put(image: np.ndarray, labels: np.ndarray | list[np.ndarray], layout: Layout, taken: list[Rect],
         corners: tuple[str, ...] = CORNERS) -> None:
    """Paste the first of ``labels`` (largest first) that has a free spot, else the first one where
    it covers least."""
    options = labels if isinstance(labels, list) else [labels]
    for label in options:
        rect = layout.place(label.shape[1], label.shape[0], taken, corners, free_only=True)
        if rect is not None:
            break
    else:
        label = options[0]
        rect = layout.place(label.shape[1], label.shape[0], taken, corners)
    assert rect is not None
    x, y, w, h = rect
    image[y:y + h, x:x + w] = label[:h, :w]


def _blend_heatmap(image: np.ndarray, grid: np.ndarray, box: tuple[int, int, int], opacity: float) -> None:
    """The grid over its crop square ``box`` (x0, y0, side): cell (i, j) of an n-grid covers source
    pixels x0 + j·side/n … x0 + (j+1)·side/n, the same crop → source mapping as the box
    (`realtime.scoring.preprocess.map_to_source`)."""
    h, w = image.shape[:2]
    x0, y0, side = box
    if side <= 0:
        return
    xa, ya, xb, yb = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if xb <= xa or yb <= ya:
        return
    # transparent below half the threshold (0.25 of vmax), full opacity from the threshold (0.5) up;
    # only the part of the box around grid cells above 0.25 is touched (most frames: none at all)
    gh, gw = grid.shape
    rows, cols = np.nonzero(grid > 0.25)
    if rows.size == 0:
        return
    cell_y, cell_x = side / gh, side / gw
    # one cell of margin: bilinear upsampling spreads a hot cell into its neighbours
    xa = max(xa, x0 + int((cols.min() - 1) * cell_x))
    xb = min(xb, x0 + int(np.ceil((cols.max() + 2) * cell_x)))
    ya = max(ya, y0 + int((rows.min() - 1) * cell_y))
    yb = min(yb, y0 + int(np.ceil((rows.max() + 2) * cell_y)))
    if xb <= xa or yb <= ya:
        return
    big = cv2.resize(grid, (side, side), interpolation=cv2.INTER_LINEAR)[ya - y0:yb - y0, xa - x0:xb - x0]
    alpha = (np.clip((big - 0.25) * (4.0 * opacity * 256), 0, opacity * 256)).astype(np.uint16)[..., None]
    colours = cv2.applyColorMap((np.clip(big, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    region = image[ya:yb, xa:xb].astype(np.uint16)
    image[ya:yb, xa:xb] = ((region * (256 - alpha) + colours.astype(np.uint16) * alpha) >> 8).astype(np.uint8)
