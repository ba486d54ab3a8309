"""Field of view on real frames: lit pixels kept and burnt-in text left out, old circle detector vs new.

    python -m bench.fov_real --images ../shared/real/kvasir-dev/full/test/images --json runs/fov_real.json \\
        --overlay-dir runs/fov_real

Both detectors run on every image: ``detect_disc`` (the circle fit the monitor used until
2026-12) and ``detect_field_of_view`` (disc, or convex hull minus overlays). What each one
*keeps* is what the monitor's crop keeps: ``FieldOfView.source_mask`` maps the crop mask of a
256² branch input back onto the source pixels (a frame with no detection gets the
preprocessor's fallback, the centred disc). The reference, per image, at its own resolution:

- *lit*: brightest channel > 20 (the detectors' lit level);
- *banner*: the bounding box of the largest blob (≥ 100 px) of saturated blue pixels
  (B − max(R, G) > 60: the scope's status banner; white-light mucosa is never that blue). A
  colour rule for this WLI-only reference, never used by the product;
- *lit field of view*: the convex hull of the largest 8-connected blob of *lit* outside the
  banner after a 5×5 elliptic opening (it removes text strokes, 1–2 px wide at 256²). Every
  field of view of the 100 test images is an octagon, convex, often with the position box
  blacked out in its lower-left corner (that notch is black, so it holds no lit pixels);
  ``lit pixels`` are the lit pixels inside the hull, outside the banner;
- *text*: lit pixels more than 3 px outside the hull (burnt-in text and markers on the black
  border), outside the banner.

This reference is built like the new detector's hull, but from the full-resolution image with
its own opening, so it measures what the detector's 160-px work copy and margins lose and add,
what the old circle cuts off, and whether the banner is cut out; it does not test the convex
assumption itself (the contact sheet does).

Reported per image and in summary: the share of lit pixels kept (coverage), text pixels kept,
whether all text is left out, banner pixels kept, the kept black border, and the detection time;
and where the overlay display's labels land (`Layout`: status light, AI NOT ACTIVE, debug
numbers): the images where they cover any text, banner or field-of-view pixel. The reference
was checked by eye on the contact sheet (``--overlay-dir``: ``sheet.png``, green = the lit field
of view's hull, red = old circle, yellow = new outline, magenta = text kept by the new mask,
cyan = lit pixels the new mask drops). Real data (Kvasir-SEG, Jha et al., MMM 2020, research
and education use only): outputs go to runs/, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.provenance import provenance
from realtime.clients.layout import Layout
from realtime.clients.overlay import OverlayOptions, View, draw_overlay
from realtime.scoring.preprocess import FieldOfView, default_field_of_view, detect_disc, detect_field_of_view

CITATION = "Kvasir-SEG (Jha et al., MMM 2020), research and education use only"
LIT_LEVEL = 20
INPUT_SIZE = 256
DETECTORS = {"old": detect_disc, "new": detect_field_of_view}


def reference(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lit pixels of the field of view, its outline filled, text pixels, banner pixels), h×w bool each."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    lit = rgb.max(axis=2) > LIT_LEVEL
    blue = ((b - np.maximum(r, g)) > 60).astype(np.uint8)
    banner = np.zeros(lit.shape, bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(blue, connectivity=8)
    if n > 1 and stats[1:, cv2.CC_STAT_AREA].max() >= 100:
        x, y, w, h = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])), :4]
        banner[y:y + h, x:x + w] = True  # its bounding box: the banner with its text
    core = cv2.morphologyEx((lit & ~banner).astype(np.uint8), cv2.MORPH_OPEN,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(core, connectivity=8)
    if n < 2:
        empty = np.zeros(lit.shape, bool)
        return empty, empty, lit & ~banner, banner
    blob = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    pts = cv2.findNonZero(blob)
    hull = cv2.convexHull(pts)
    filled = np.zeros_like(blob)
    cv2.fillPoly(filled, [hull], 1)
    region = filled > 0
    near = cv2.dilate(filled, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) > 0
    return lit & region & ~banner, region, lit & ~near & ~banner, banner


def detect(rgb: np.ndarray, name: str) -> tuple[FieldOfView, bool, float]:
    """(the field of view the preprocessor would use, whether detection found one, ms)."""
    t = time.perf_counter()
    fov = DETECTORS[name](rgb)
    ms = (time.perf_counter() - t) * 1e3
    return (fov if fov is not None else default_field_of_view(*rgb.shape[:2])), fov is not None, ms


def score(kept: np.ndarray, lit_fov: np.ndarray, region: np.ndarray, text: np.ndarray,
          banner: np.ndarray) -> dict[str, Any]:
    n_lit, n_text = int(lit_fov.sum()), int(text.sum())
    return {"coverage": round(float((kept & lit_fov).sum() / max(1, n_lit)), 5),
            "text_kept": int((kept & text).sum()),
            "all_text_out": bool(n_text == 0 or not (kept & text).any()),
            "banner_kept": int((kept & banner).sum()),
            "border_kept": int((kept & ~region & ~text & ~banner).sum())}


LABEL_VIEWS = [
    (View(active=True, score=0.5, threshold=0.3, modality="wli", backend="onnxruntime", event_id=7,
          result_age_ms=41, display_latency_ms=12), OverlayOptions()),
    (View(active=False, reason="no results for 1.2 s", display_latency_ms=12), OverlayOptions()),
    (View(active=True, score=0.5, threshold=0.3, modality="wli", backend="onnxruntime", event_id=7,
          result_age_ms=41, display_latency_ms=12), OverlayOptions(debug=True)),
    (View(active=False, reason="no results for 1.2 s", display_latency_ms=12), OverlayOptions(debug=True)),
]


LABEL_WIDTH = 640  # labels are measured on the frame scaled to this width: the smallest display the overlay targets


def labels(rgb: np.ndarray, region: np.ndarray, text: np.ndarray, banner: np.ndarray) -> dict[str, Any]:
    """The overlay's own labels (status light, AI NOT ACTIVE, the debug numbers; not the lesion box,
    which belongs on the image) placed by `Layout` on this frame scaled to LABEL_WIDTH: the
    reference text, banner and field-of-view pixels they cover (counted at that size)."""
    h, w = rgb.shape[:2]
    size = (LABEL_WIDTH, max(1, round(h * LABEL_WIDTH / w)))
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC if w < LABEL_WIDTH else cv2.INTER_AREA)
    region, text, banner = (cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
                            for m in (region, text, banner))
    t = time.perf_counter()
    layout = Layout.measure(rgb)
    ms = (time.perf_counter() - t) * 1e3
    written = np.zeros(rgb.shape[:2], bool)
    calm = np.zeros(rgb.shape[:2], bool)  # the default look's labels only (no debug numbers)
    for view, opts in LABEL_VIEWS:
        changed = (draw_overlay(rgb.copy(), view, opts, layout) != rgb).any(axis=2)
        written |= changed
        if not opts.debug:
            calm |= changed
    return {"text_px": int((written & text).sum()), "banner_px": int((written & banner).sum()),
            "fov_px": int((written & region).sum()), "fov_px_default_look": int((calm & region).sum()),
            "ms": round(ms, 3)}


def tile(rgb: np.ndarray, fovs: dict[str, FieldOfView], kept: np.ndarray, lit_fov: np.ndarray, region: np.ndarray,
         text: np.ndarray, size: int) -> np.ndarray:
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    img[kept & text] = (255, 0, 255)
    img[~kept & lit_fov] = (255, 255, 0)
    f = size / max(img.shape[:2])
    img = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, [np.round(c * f).astype(np.int32) for c in contours], -1, (0, 200, 0), 1)
    old = fovs["old"]
    cv2.circle(img, (int(round(old.cx * f)), int(round(old.cy * f))), int(round(old.radius * f)), (0, 0, 255), 1)
    new = fovs["new"]
    if new.outline is not None:
        cv2.polylines(img, [np.round(np.asarray(new.outline) * f).astype(np.int32)], True, (0, 255, 255), 1)
    else:
        cv2.circle(img, (int(round(new.cx * f)), int(round(new.cy * f))), int(round(new.radius * f)), (0, 255, 255), 1)
    for x, y, w, h in new.exclude:
        cv2.rectangle(img, (int(x * f), int(y * f)), (int((x + w) * f), int((y + h) * f)), (255, 0, 255), 1)
    out = np.zeros((size, size, 3), np.uint8)
    out[:img.shape[0], :img.shape[1]] = img
    return out


def summarise(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    cov = np.array([r[name]["coverage"] for r in rows])
    with_text = [r for r in rows if r["text_px"] > 0]
    return {"coverage_mean": round(float(cov.mean()), 5), "coverage_median": round(float(np.median(cov)), 5),
            "coverage_min": round(float(cov.min()), 5), "coverage_p5": round(float(np.percentile(cov, 5)), 5),
            "images_coverage_ge_0.97": int((cov >= 0.97).sum()), "images_coverage_ge_0.99": int((cov >= 0.99).sum()),
            "text_px_kept": int(sum(r[name]["text_kept"] for r in rows)),
            "images_with_text": len(with_text),
            "images_all_text_out": int(sum(r[name]["all_text_out"] for r in with_text)),
            "fraction_all_text_out": round(sum(r[name]["all_text_out"] for r in with_text) / max(1, len(with_text)), 4),
            "banner_px": int(sum(r["banner_px"] for r in rows)),
            "banner_px_kept": int(sum(r[name]["banner_kept"] for r in rows)),
            "border_px_kept": int(sum(r[name]["border_kept"] for r in rows)),
            "detected": int(sum(r[name]["detected"] for r in rows)),
            "shapes": {s: sum(r[name]["shape"] == s for r in rows) for s in ("disc", "polygon")},
            "overlays_cut": int(sum(r[name]["overlays"] for r in rows)),
            "detect_ms_median": round(float(np.median([r[name]["ms"] for r in rows])), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, required=True, help="folder of real frames (.png/.jpg)")
    p.add_argument("--json", type=Path)
    p.add_argument("--overlay-dir", type=Path, help="write a contact sheet, DIR/sheet.png")
    p.add_argument("--tile", type=int, default=192)
    args = p.parse_args(argv)
    paths = sorted(q for q in args.images.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not paths:
        p.error(f"no images in {args.images}")
    rows, tiles = [], []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"skipped (unreadable): {path.name}")
            continue
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        h, w = rgb.shape[:2]
        lit_fov, region, text, banner = reference(rgb)
        row: dict[str, Any] = {"image": path.name, "size": [w, h], "lit_px": int(lit_fov.sum()),
                               "text_px": int(text.sum()), "banner_px": int(banner.sum())}
        fovs, kept_new = {}, None
        for name in DETECTORS:
            detect(rgb, name)  # warm
            fov, found, ms = detect(rgb, name)
            kept = fov.source_mask(h, w, INPUT_SIZE)
            fovs[name] = fov
            kept_new = kept if name == "new" else kept_new
            row[name] = {"detected": found, "shape": fov.shape, "overlays": len(fov.exclude), "ms": round(ms, 3)}
            row[name] |= score(kept, lit_fov, region, text, banner)
        row["labels"] = labels(rgb, region, text, banner)
        rows.append(row)
        print(f"{path.name}: lit {row['lit_px']}, text {row['text_px']} | " + " | ".join(
            f"{n} {row[n]['shape']} cov {row[n]['coverage']:.4f} text kept {row[n]['text_kept']}" for n in DETECTORS))
        if args.overlay_dir:
            t = tile(rgb, fovs, kept_new, lit_fov, region, text, args.tile)
            cv2.putText(t, str(len(rows) - 1), (3, args.tile - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1)
            tiles.append(t)
    summary: dict[str, Any] = {n: summarise(rows, n) for n in DETECTORS}
    summary["labels"] = {f"images_over_{k}": int(sum(r["labels"][f"{k}_px"] > 0 for r in rows))
                         for k in ("text", "banner", "fov")}
    summary["labels"]["images_over_fov_default_look"] = int(sum(r["labels"]["fov_px_default_look"] > 0 for r in rows))
    summary["labels"]["layout_ms_median"] = round(float(np.median([r["labels"]["ms"] for r in rows])), 3)
    print(f"overlay labels over the scope's text in {summary['labels']['images_over_text']}/{len(rows)} images, "
          f"over its banner in {summary['labels']['images_over_banner']}, over the field of view in "
          f"{summary['labels']['images_over_fov']} ({summary['labels']['images_over_fov_default_look']} in the default "
          f"look); layout {summary['labels']['layout_ms_median']} ms")
    for n, s in ((n, summary[n]) for n in DETECTORS):
        print(f"{n}: coverage mean {s['coverage_mean']:.4f} median {s['coverage_median']:.4f}"
              f" min {s['coverage_min']:.4f}; ≥97 % in {s['images_coverage_ge_0.97']}/{len(rows)};"
              f" text px kept {s['text_px_kept']};"
              f" all text out in {s['images_all_text_out']}/{s['images_with_text']} images with text;"
              f" shapes {s['shapes']}, overlays cut {s['overlays_cut']}, detect {s['detect_ms_median']} ms")
    if args.overlay_dir:
        args.overlay_dir.mkdir(parents=True, exist_ok=True)
        cols = 10
        while len(tiles) % cols:
            tiles.append(np.zeros_like(tiles[0]))
        sheet = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
        cv2.imwrite(str(args.overlay_dir / "sheet.png"), sheet)
        print(f"contact sheet: {args.overlay_dir / 'sheet.png'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"provenance": provenance(), "data": CITATION, "synthetic": False,
                                         "images": str(args.images), "input_size": INPUT_SIZE, "lit_level": LIT_LEVEL,
                                         "summary": summary, "per_image": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
