"""Real-data loader: an MVTec-like folder per modality, paired by file name.

Layout (docs/DATA.md)::

    ROOT/dataset.json                         optional metadata
    ROOT/wli/train/good/*.png                 normal images only
    ROOT/wli/test/good/*                      normal test images
    ROOT/wli/test/<kind>/*                    anomalous test images, one folder per kind
    ROOT/wli/ground_truth/<kind>/<stem>_mask.png   optional masks (0 normal, >0 anomaly)
    ROOT/nbi/...                              same structure

Either modality may be absent. A plain MVTec category folder can be used through
``scan_dataset(modality_dirs={"wli": path})``.

Every mistake in the layout raises ``DatasetError`` with the offending path and the fix;
questionable but usable content is reported in ``DatasetIndex.warnings``.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import cv2
import numpy as np

from engine.constants import IMAGE_SUFFIXES, MODALITIES
from engine.errors import DatasetError
from engine.progress import progress_bar

__all__ = [
    "IMAGE_SUFFIXES",
    "MODALITIES",
    "TestItem",
    "ModalitySplit",
    "DatasetIndex",
    "scan_dataset",
    "paired_train_names",
    "load_image",
    "load_mask",
    "load_images",
    "load_masks",
]

GOOD = "good"
MASK_SUFFIX = "_mask"
DOC = "docs/DATA.md"
# Files that operating systems and tools drop into folders; never worth a warning.
_JUNK = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
_LIST_MAX = 5


@dataclass
class TestItem:
    """One test image; ``label`` is 1 for any kind other than ``good``."""

    __test__ = False  # keep pytest from collecting this class

    path: Path
    kind: str
    label: int
    mask_path: Path | None = None


@dataclass
class ModalitySplit:
    """Train (normal only) and test images of one modality."""

    modality: str
    train: list[Path]
    test: list[TestItem]

    @property
    def kinds(self) -> list[str]:
        """Test kinds present, ``good`` first."""
        found = {t.kind for t in self.test}
        return sorted(found, key=lambda k: (k != GOOD, k))


@dataclass
class DatasetIndex:
    """Everything ``scan_dataset`` found; no pixel has been read yet."""

    root: Path
    modalities: dict[str, ModalitySplit]
    kinds_meta: dict[str, Any]
    synthetic: bool
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _listing(paths: Sequence[Any], limit: int = _LIST_MAX) -> str:
    """'a, b, c, and 7 more': a bounded list for error messages."""
    shown = ", ".join(str(p) for p in paths[:limit])
    extra = len(paths) - limit
    return f"{shown}, and {extra} more" if extra > 0 else shown


def _is_junk(p: Path) -> bool:
    return p.name.startswith(".") or p.name.lower() in _JUNK


def _images_in(folder: Path, warnings: list[str]) -> list[Path]:
    """Supported images directly inside ``folder``, sorted; the rest is counted in warnings.

    Two images with the same stem (a.png, a.jpg) are an error: names pair modalities and
    masks, so the pairing would be ambiguous.
    """
    images, skipped, subdirs = [], [], []
    for p in sorted(folder.iterdir()):
        if _is_junk(p):
            continue
        if p.is_dir():
            subdirs.append(p.name)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            skipped.append(p.name)
    if skipped:
        warnings.append(
            f"{folder}: ignored {len(skipped)} file(s) with unsupported extensions "
            f"({_listing(skipped)}); supported: {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    if subdirs:
        warnings.append(f"{folder}: ignored {len(subdirs)} sub-folder(s) ({_listing(subdirs)})")
    _check_unique_stems(images)
    return images


def _check_unique_stems(images: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise DatasetError(
                f"{p.parent}: two images share the name '{p.stem}' ({seen[p.stem].name} and "
                f"{p.name}); file names pair WLI/NBI images and masks, so keep only one or rename"
            )
        seen[p.stem] = p


def _read_meta(root: Path) -> dict[str, Any]:
    """dataset.json if present; a broken file is an error (it would silently mislabel)."""
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(
            f"{path} is not valid JSON ({exc}); fix or delete it (it is optional)"
        ) from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object; fix or delete it (it is optional)")
    fmt = meta.get("format", "cemd-dataset/1")
    if not str(fmt).startswith("cemd-dataset/"):
        raise DatasetError(f"{path}: unknown format '{fmt}', expected 'cemd-dataset/1' (see {DOC})")
    if not isinstance(meta.get("kinds", {}), dict):
        raise DatasetError(f"{path}: 'kinds' must be an object {{name: {{...}}}} (see {DOC})")
    return meta


# --------------------------------------------------------------------------- scanning


def _resolve_dirs(
    root: Path | None, modalities: Sequence[str] | None, modality_dirs: dict[str, Path] | None
) -> dict[str, Path]:
    """Which folder holds each modality; errors say what layout was expected."""
    if modality_dirs:
        dirs = {m: Path(p) for m, p in modality_dirs.items()}
    else:
        if root is None:
            raise DatasetError("no dataset given: pass a dataset root folder")
        dirs = {m: root / m for m in MODALITIES if (root / m).is_dir()}
        if not dirs and ((root / "train").is_dir() or (root / "test").is_dir()):
            raise DatasetError(
                f"{root} looks like a single MVTec-style folder (train/, test/) but a dataset "
                f"root holds wli/ and/or nbi/ folders: move it to {root}/wli/ or pass it as "
                f"the wli folder (see {DOC})"
            )
        if not dirs:
            raise DatasetError(
                f"{root} has neither a wli/ nor an nbi/ folder; expected "
                f"{root}/wli/train/good/*.png, {root}/wli/test/<kind>/*.png (and/or nbi/ alike), "
                f"see {DOC}. For a single MVTec-style folder (train/, test/) use it as the "
                "wli modality folder"
            )
    unknown = sorted(set(dirs) - set(MODALITIES))
    if unknown:
        raise DatasetError(f"unknown modality {_listing(unknown)}; use {' or '.join(MODALITIES)}")
    if modalities is not None:
        bad = [m for m in modalities if m not in MODALITIES]
        if bad:
            raise DatasetError(f"unknown modality {_listing(bad)}; use {' or '.join(MODALITIES)}")
        missing = [m for m in modalities if m not in dirs]
        if missing:
            where = root if root is not None else "the given folders"
            raise DatasetError(
                f"{where}: no {missing[0]}/ folder, but the {missing[0]} modality was requested; "
                f"add {missing[0]}/train/good and {missing[0]}/test/... (see {DOC}) "
                f"or leave {missing[0]} out"
            )
        dirs = {m: dirs[m] for m in modalities}
        if not dirs:
            raise DatasetError("no modality selected: pass wli, nbi or both")
    for m, d in dirs.items():
        if not d.is_dir():
            raise DatasetError(f"{d} (the {m} folder) does not exist or is not a folder")
    return dirs


def _scan_train(mod_dir: Path, require: bool, warnings: list[str]) -> list[Path]:
    train = mod_dir / "train"
    good = train / GOOD
    if train.is_dir():
        others = [p.name for p in sorted(train.iterdir()) if p.is_dir() and p.name != GOOD]
        if others:
            warnings.append(
                f"{train}: ignored folder(s) {_listing(others)}; training uses normal "
                f"images from {good} only"
            )
    images = _images_in(good, warnings) if good.is_dir() else []
    if require and not images:
        loose = train.is_dir() and any(
            p.suffix.lower() in IMAGE_SUFFIXES for p in train.iterdir() if p.is_file()
        )
        hint = f" (images found directly in {train}: move them into {good})" if loose else ""
        state = "is empty" if good.is_dir() else "does not exist"
        raise DatasetError(
            f"{good} {state}: training needs normal images there{hint}; see {DOC}"
        )
    return images


def _mask_files(folder: Path, warnings: list[str]) -> dict[str, Path]:
    """``<stem>_mask.<ext>`` files of one ground-truth kind folder, keyed by image stem."""
    masks: dict[str, Path] = {}
    odd = []
    for p in _images_in(folder, warnings):
        if p.stem.endswith(MASK_SUFFIX):
            masks[p.stem[: -len(MASK_SUFFIX)]] = p
        else:
            odd.append(p.name)
    if odd:
        warnings.append(
            f"{folder}: ignored {len(odd)} file(s) not named <image name>{MASK_SUFFIX}.png "
            f"({_listing(odd)})"
        )
    return masks


def _attach_masks(
    kind: str, images: list[Path], masks: dict[str, Path], gt_dir: Path, warnings: list[str]
) -> list[TestItem]:
    """Pair test images of one kind with their masks, enforcing all-or-none."""
    label = 0 if kind == GOOD else 1
    if not label:
        masked = [p for p in images if p.stem in masks]
        if masked:
            raise DatasetError(
                f"{masked[0]} is in test/{GOOD}/ but has a mask {masks[masked[0].stem]} "
                f"({len(masked)} such image(s)): mislabelled? Move an anomalous image to "
                f"test/<kind>/ (and its mask to ground_truth/<kind>/), or delete the mask"
            )
    stems = {p.stem for p in images}
    orphans = sorted(m.name for s, m in masks.items() if s not in stems)
    if orphans:
        warnings.append(
            f"{gt_dir / kind}: {len(orphans)} mask(s) match no image in test/{kind}/ "
            f"({_listing(orphans)}); they are ignored"
        )
    missing = [p for p in images if p.stem not in masks]
    matched = len(images) - len(missing)
    if label and matched and missing:
        raise DatasetError(
            f"{gt_dir / kind} has masks for some images of test/{kind}/ but not for "
            f"{len(missing)}: {_listing([str(p) for p in missing])}; add "
            f"<name>{MASK_SUFFIX}.png for each (all zero if no anomaly is visible) "
            f"or remove the folder to skip pixel metrics for '{kind}'"
        )
    if label and not matched:
        warnings.append(
            f"{images[0].parent}: no masks in {gt_dir / kind}; pixel metrics skip '{kind}'"
        )
    return [TestItem(p, kind, label, masks.get(p.stem) if label else None) for p in images]


def _scan_test(mod_dir: Path, require: bool, warnings: list[str]) -> list[TestItem]:
    test, gt = mod_dir / "test", mod_dir / "ground_truth"
    kinds: dict[str, list[Path]] = {}
    if test.is_dir():
        loose = [p.name for p in sorted(test.iterdir()) if p.is_file() and not _is_junk(p)]
        if loose:
            warnings.append(
                f"{test}: ignored {len(loose)} file(s) outside a kind folder ({_listing(loose)}); "
                f"put normal ones in {test / GOOD} and anomalous ones in {test}/<kind>/"
            )
        for d in sorted(p for p in test.iterdir() if p.is_dir() and not _is_junk(p)):
            kinds[d.name] = _images_in(d, warnings)
            if not kinds[d.name]:
                raise DatasetError(
                    f"{d} holds no images; add images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                    "or delete the folder"
                )
    if require and not kinds:
        state = "has no kind folders" if test.is_dir() else "does not exist"
        raise DatasetError(
            f"{test} {state}: evaluation needs {test / GOOD}/ and {test}/<kind>/ "
            f"folders of images (see {DOC}), or evaluate without this modality"
        )
    gt_kinds = (
        {p.name: p for p in gt.iterdir() if p.is_dir() and not _is_junk(p)} if gt.is_dir() else {}
    )
    orphan_dirs = sorted(set(gt_kinds) - set(kinds))
    if orphan_dirs:
        first = gt_kinds[orphan_dirs[0]]
        raise DatasetError(
            f"{first} holds masks for kind '{orphan_dirs[0]}' but {test / orphan_dirs[0]} has no "
            f"images; name the mask folder like its test folder or delete it"
        )
    items: list[TestItem] = []
    for kind, images in kinds.items():
        masks = _mask_files(gt_kinds[kind], warnings) if kind in gt_kinds else {}
        items.extend(_attach_masks(kind, images, masks, gt, warnings))
    labels = {t.label for t in items}
    if require and labels != {0, 1}:
        need = f"{test / GOOD}/" if 0 not in labels else f"an anomaly folder {test}/<kind>/"
        warnings.append(f"{test}: no {need}; image AUROC needs normal and anomalous test images")
    return items


def scan_dataset(
    root: str | Path | None = None,
    modalities: Sequence[str] | None = None,
    *,
    modality_dirs: dict[str, str | Path] | None = None,
    require_train: bool = False,
    require_test: bool = False,
) -> DatasetIndex:
    """Index a dataset folder (file names only; images are read later).

    ``modalities`` selects which must be present (default: whichever exists).
    ``modality_dirs`` maps a modality straight to an MVTec-style folder, bypassing ROOT/<m>/.
    ``require_train``/``require_test`` turn an empty train/good or test/ into an error.
    """
    root_path = Path(root).expanduser() if root is not None else None
    if root_path is not None and not root_path.is_dir():
        state = "is not a folder" if root_path.exists() else "does not exist"
        raise DatasetError(f"dataset folder {root_path} {state}; check the path (layout: {DOC})")
    dirs = _resolve_dirs(
        root_path, modalities, {m: Path(p).expanduser() for m, p in (modality_dirs or {}).items()}
    )
    meta = _read_meta(root_path) if root_path is not None else {}
    warnings: list[str] = []
    splits = {
        m: ModalitySplit(
            m, _scan_train(d, require_train, warnings), _scan_test(d, require_test, warnings)
        )
        for m, d in dirs.items()
    }
    return DatasetIndex(
        root=root_path if root_path is not None else next(iter(dirs.values())),
        modalities=splits,
        kinds_meta=dict(meta.get("kinds", {})),
        synthetic=bool(meta.get("synthetic", False)),
        warnings=warnings,
        meta=meta,
    )


def paired_train_names(index: DatasetIndex, paired: bool | Literal["auto"] = "auto") -> list[str]:
    """File stems present in both wli/train/good and nbi/train/good (sorted).

    ``paired=True``: every training image must have its partner, else an error.
    ``"auto"``: the intersection, possibly empty. ``False``: no pairing, always empty.
    """
    if paired is False:
        return []
    if paired not in (True, "auto"):
        raise ValueError(f"paired must be True, False or 'auto', got {paired!r}")
    wli, nbi = index.modalities.get("wli"), index.modalities.get("nbi")
    if wli is None or nbi is None:
        if paired == "auto":
            return []
        have = next(iter(index.modalities), "none")
        raise DatasetError(
            f"{index.root}: paired training needs both wli/ and nbi/, found only {have}/; "
            "add the other modality or train students only with --stage students / unpaired"
        )
    w = {p.stem for p in wli.train}
    n = {p.stem for p in nbi.train}
    common = sorted(w & n)
    if paired is True:
        only_w, only_n = sorted(w - n), sorted(n - w)
        if only_w or only_n:
            parts = []
            if only_w:
                parts.append(f"{len(only_w)} only in wli/train/good ({_listing(only_w)})")
            if only_n:
                parts.append(f"{len(only_n)} only in nbi/train/good ({_listing(only_n)})")
            raise DatasetError(
                f"{index.root}: training images are not paired: {'; '.join(parts)}. Rename so "
                "the same scene has the same file name in wli/ and nbi/, or train students "
                "only with --stage students / unpaired"
            )
    return common


# --------------------------------------------------------------------------- loading


def _read_bytes(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise DatasetError(f"{path} is empty (0 bytes); replace or delete it")
    # OpenCV 4.x may return a half-grey image for a JPEG cut short; a JPEG ends with EOI.
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < 0:
        raise DatasetError(f"{path} is a truncated JPEG; re-export or delete it")
    return np.frombuffer(data, np.uint8)


def _decode(path: Path, flags: int) -> np.ndarray:
    """Decode via imdecode (also works for non-ASCII paths); errors name the file."""
    buf = _read_bytes(path)
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise DatasetError(
            f"{path} is not a readable image (truncated, corrupt or not an image); "
            "re-export or delete it"
        )
    return img


def _resize(img: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if interpolation is None:  # AREA avoids aliasing when shrinking; it is blocky when growing
        interpolation = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interpolation)


def _check_size(size: int) -> int:
    if int(size) <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    return int(size)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 size x size (aspect ratio not kept; grey/RGBA/16-bit become 8-bit RGB)."""
    size = _check_size(size)
    img = _decode(Path(path), cv2.IMREAD_COLOR)  # 3-channel 8-bit BGR whatever the file holds
    return np.ascontiguousarray(cv2.cvtColor(_resize(img, size), cv2.COLOR_BGR2RGB))


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """Bool size x size: any pixel > 0 is anomalous (any channel, any bit depth)."""
    size = _check_size(size)
    raw = _decode(Path(path), cv2.IMREAD_UNCHANGED)  # keep 16-bit values 1..255 nonzero
    if raw.ndim == 3:
        raw = raw[..., :3].max(axis=2)  # colour masks; ignore an alpha channel
    binary = (raw > 0).astype(np.uint8)
    return _resize(binary, size, cv2.INTER_NEAREST).astype(bool)


def _run_parallel(
    n: int, fill: Callable[[int], None], workers: int, progress: str | None
) -> None:
    """Call ``fill(i)`` for i in range(n) on a thread pool, with an optional progress bar.

    Results are awaited in order, so the first bad file in the list is the one reported.
    """
    bar = progress_bar(label=progress) if progress else None
    task = bar.add_task("", total=n) if bar else None
    with bar or contextlib.nullcontext():
        if max(1, int(workers)) == 1 or n <= 1:
            for i in range(n):
                fill(i)
                if bar:
                    bar.advance(task)
            return
        with ThreadPoolExecutor(max_workers=int(workers)) as pool:
            futures = [pool.submit(fill, i) for i in range(n)]
            try:
                for f in futures:
                    f.result()
                    if bar:
                        bar.advance(task)
            except BaseException:
                for f in futures:  # stop queued reads; running ones finish
                    f.cancel()
                raise


def load_images(
    paths: Sequence[str | Path], size: int, progress: str | None = None, workers: int = 2
) -> np.ndarray:
    """Load many images into one N x size x size x 3 uint8 array (threads: cv2 drops the GIL)."""
    size = _check_size(size)
    out = np.empty((len(paths), size, size, 3), np.uint8)

    def fill(i: int) -> None:
        out[i] = load_image(paths[i], size)

    _run_parallel(len(paths), fill, workers, progress)
    return out


def load_masks(items: Iterable[TestItem], size: int, workers: int = 2) -> np.ndarray:
    """N x size x size bool masks; all False for good images and images without a mask."""
    size = _check_size(size)
    items = list(items)
    out = np.zeros((len(items), size, size), bool)

    def fill(i: int) -> None:
        if items[i].label and items[i].mask_path is not None:
            out[i] = load_mask(items[i].mask_path, size)

    _run_parallel(len(items), fill, workers, None)
    return out
