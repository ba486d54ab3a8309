"""Where the overlay may write: outside the lit field of view and away from the scope's own text.

An endoscope's video shows the lit image in a disc or octagon and puts its own text (date,
patient, scope model, a position box) in the black around it. `Layout.measure` finds both on
a small copy of a frame: the lit area with the monitor's field-of-view detector, the text as
bright pixels outside it (plus the overlay rectangles the detector cut out of the lit area),
each widened by a margin. `Layout.place` then puts a label of a given size in the first
free spot, trying the corners in turn and sliding along the frame's edges; where nothing is
free (a frame lit edge to edge), the spot that covers the least text, then the least image.

Text seen once stays blocked while the frame size is the same (``previous``): a clock's
digits change, their place does not, and labels do not jump around.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from realtime.scoring.preprocess import detect_field_of_view

_WORK = 320  # the layout is measured on a copy this long on its longer side
TEXT_LEVEL = 40  # brighter than this outside the lit area (largest channel): the scope's text or marks
LIT_LEVEL = 20  # the field-of-view detector's level
MARGIN = 0.012  # text and lit area widened by this fraction of the frame's longer side

Rect = tuple[int, int, int, int]  # x, y, w, h in frame pixels
CORNERS = ("top-right", "bottom-right", "top-left", "bottom-left")


@dataclass
class Layout:
    shape: tuple[int, int]  # (h, w) of the frame it was measured on
    scale: float  # work-grid pixels per frame pixel
    lit: np.ndarray  # bool work grid: the lit image (widened)
    text: np.ndarray  # bool work grid: the scope's text and marks (widened)

    def __post_init__(self) -> None:
        self._lit_ii = cv2.integral(self.lit.astype(np.uint8))
        self._text_ii = cv2.integral(self.text.astype(np.uint8))

    @classmethod
    def measure(cls, rgb: np.ndarray, previous: Layout | None = None) -> Layout:
        """The layout of an RGB uint8 frame (``previous``: the same display's last one, whose text is kept)."""
        h, w = rgb.shape[:2]
        scale = min(1.0, _WORK / max(h, w))
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        lum = small.max(axis=2)
        fov = detect_field_of_view(small, LIT_LEVEL)
        marks = np.zeros((sh, sw), bool)
        if fov is not None:
            lit = fov.source_mask(sh, sw)
            for x, y, rw, rh in fov.exclude:  # a position box or label inside the lit area
                marks[max(0, int(y)):max(0, math.ceil(y + rh)), max(0, int(x)):max(0, math.ceil(x + rw))] = True
        else:  # no plausible field of view (a dark frame, or lit edge to edge): whatever is lit
            lit = lum > LIT_LEVEL
        pad = max(1, round(MARGIN * max(sh, sw)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1, 2 * pad + 1))
        lit = cv2.dilate(lit.astype(np.uint8), kernel) > 0
        marks |= (lum > TEXT_LEVEL) & ~lit
        text = cv2.dilate(marks.astype(np.uint8), kernel) > 0
        if previous is not None and previous.shape == (h, w) and previous.text.shape == text.shape:
            text |= previous.text
        return cls((h, w), scale, lit, text)

    def _count(self, ii: np.ndarray, rect: Rect) -> int:
        x, y, rw, rh = rect
        s = self.scale
        gh, gw = self.lit.shape
        x0, y0 = min(gw, max(0, int(x * s))), min(gh, max(0, int(y * s)))
        x1, y1 = min(gw, max(0, math.ceil((x + rw) * s))), min(gh, max(0, math.ceil((y + rh) * s)))
        return int(ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0])

    def covers(self, rect: Rect) -> tuple[int, int]:
        """(text, lit) work-grid pixels under a rectangle of the frame."""
        return self._count(self._text_ii, rect), self._count(self._lit_ii, rect)

    def place(self, w: int, h: int, taken: list[Rect], corners: tuple[str, ...] = CORNERS,
              free_only: bool = False) -> Rect | None:
        """A w×h rectangle (frame pixels) clear of ``taken``, off the lit image and the text where one
        is free, else (unless ``free_only``: None) the one covering the least text, then the least
        image; it is added to ``taken``."""
        fh, fw = self.shape
        w, h = min(w, fw), min(h, fh)
        best: tuple[tuple[int, int], Rect] | None = None
        for rect in self._candidates(w, h, corners):
            if any(_overlap(rect, t) for t in taken):
                continue
            cover = self.covers(rect)
            if cover == (0, 0):
                best = (cover, rect)
                break
            if best is None or cover < best[0]:
                best = (cover, rect)
        if free_only and (best is None or best[0] != (0, 0)):
            return None
        rect = best[1] if best is not None else (0, 0, w, h)
        taken.append(rect)
        return rect

    def _candidates(self, w: int, h: int, corners: tuple[str, ...]):
        fh, fw = self.shape
        m = max(2, round(0.008 * max(fh, fw)))
        step = max(2, min(w, h) // 2)
        for corner in corners:
            right, bottom = "right" in corner, "bottom" in corner
            x_end = fw - w - m if right else m
            y_end = fh - h - m if bottom else m
            x_end, y_end = max(0, x_end), max(0, y_end)
            along_x = range(0, max(1, fw // 2 - w // 2), step)
            along_y = range(0, max(1, fh // 2 - h // 2), step)
            for k in range(max(len(along_x), len(along_y))):  # from the corner along both edges at once
                if k < len(along_y):
                    yield x_end, (y_end - along_y[k] if bottom else y_end + along_y[k]), w, h
                if k and k < len(along_x):
                    yield (x_end - along_x[k] if right else x_end + along_x[k]), y_end, w, h


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
