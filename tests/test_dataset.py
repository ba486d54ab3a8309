"""Dataset scanning, pairing and image loading on tiny datasets built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.data.dataset import (
    DatasetIndex,
    TestItem,
    load_image,
    load_images,
    load_mask,
    load_masks,
    paired_train_names,
    scan_dataset,
)
from engine.errors import CemdError, DatasetError

RNG = np.random.default_rng(0)


def write_image(path: Path, h: int = 40, w: int = 48, channels: int = 3,
                dtype: type = np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hi = 65535 if dtype == np.uint16 else 255
    shape = (h, w) if channels == 1 else (h, w, channels)
    img = (RNG.random(shape) * hi).astype(dtype)
    assert cv2.imwrite(str(path), img), path
    return path


def write_mask(path: Path, h: int = 40, w: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    m[h // 4: h // 2, w // 4: w // 2] = 255
    assert cv2.imwrite(str(path), m)
    return path


def make_modality(root: Path, train: list[str], good: list[str],
                  kinds: dict[str, list[str]], masks: bool = True) -> None:
    """root/train/good, root/test/good, root/test/<kind>, root/ground_truth/<kind>."""
    for name in train:
        write_image(root / "train" / "good" / f"{name}.png")
    for name in good:
        write_image(root / "test" / "good" / f"{name}.png")
    for kind, names in kinds.items():
        for name in names:
            write_image(root / "test" / kind / f"{name}.png")
            if masks:
                write_mask(root / "ground_truth" / kind / f"{name}_mask.png")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    make_modality(root / "wli", ["a", "b", "c"], ["g1", "g2"], {"polyp": ["p1", "p2"]})
    make_modality(root / "nbi", ["a", "b", "c"], ["g1"], {"polyp": ["p1"], "bleeding": ["x"]})
    (root / "dataset.json").write_text(json.dumps({
        "format": "cemd-dataset/1", "synthetic": True, "paired": True,
        "kinds": {"polyp": {"visible_in": ["wli", "nbi"]}, "bleeding": {"visible_in": ["nbi"]}},
    }))
    return root


# --------------------------------------------------------------------------- scanning


def test_scan_full_dataset(dataset: Path) -> None:
    index = scan_dataset(dataset, require_train=True, require_test=True)
    assert isinstance(index, DatasetIndex)
    assert set(index.modalities) == {"wli", "nbi"}
    assert index.synthetic is True
    assert index.kinds_meta["bleeding"]["visible_in"] == ["nbi"]
    wli = index.modalities["wli"]
    assert [p.name for p in wli.train] == ["a.png", "b.png", "c.png"]
    assert wli.kinds == ["good", "polyp"]
    by_name = {t.path.name: t for t in wli.test}
    assert by_name["g1.png"] == TestItem(dataset / "wli/test/good/g1.png", "good", 0, None)
    p1 = by_name["p1.png"]
    assert (p1.kind, p1.label) == ("polyp", 1)
    assert p1.mask_path == dataset / "wli/ground_truth/polyp/p1_mask.png"
    assert index.modalities["nbi"].kinds == ["good", "bleeding", "polyp"]
    assert index.warnings == []


def test_single_modality_and_selection(dataset: Path, tmp_path: Path) -> None:
    only = tmp_path / "only_wli"
    make_modality(only / "wli", ["a"], ["g"], {"polyp": ["p"]})
    index = scan_dataset(only)
    assert list(index.modalities) == ["wli"] and index.synthetic is False
    assert list(scan_dataset(dataset, ["nbi"]).modalities) == ["nbi"]
    with pytest.raises(DatasetError, match="no nbi/ folder"):
        scan_dataset(only, ["nbi"])


def test_mvtec_category_via_modality_dirs(tmp_path: Path) -> None:
    cat = tmp_path / "mvtec" / "bottle"
    make_modality(cat, ["000", "001"], ["000"], {"broken_large": ["000"], "contamination": ["000"]})
    index = scan_dataset(modality_dirs={"wli": cat}, require_train=True, require_test=True)
    split = index.modalities["wli"]
    assert len(split.train) == 2 and split.kinds == ["good", "broken_large", "contamination"]
    assert all(t.mask_path is not None for t in split.test if t.label)


def test_root_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as e:
        scan_dataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither a wli/ nor an nbi/") as e:
        scan_dataset(tmp_path / "empty")
    assert "docs/DATA.md" in str(e.value) and str(tmp_path / "empty") in str(e.value)
    write_image(tmp_path / "cat" / "train" / "good" / "a.png")
    with pytest.raises(DatasetError, match="looks like a single MVTec-style folder"):
        scan_dataset(tmp_path / "cat")
    assert issubclass(DatasetError, CemdError)


def test_train_required(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_modality(root / "wli", [], ["g"], {"polyp": ["p"]})
    assert scan_dataset(root).modalities["wli"].train == []  # fine for evaluation
    with pytest.raises(DatasetError, match="does not exist") as e:
        scan_dataset(root, require_train=True)
    assert str(root / "wli" / "train" / "good") in str(e.value)
    (root / "wli" / "train" / "good").mkdir(parents=True)
    write_image(root / "wli" / "train" / "loose.png")
    with pytest.raises(DatasetError, match="is empty") as e:
        scan_dataset(root, require_train=True)
    assert "move them into" in str(e.value)


def test_test_required(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_modality(root / "wli", ["a"], [], {})
    assert scan_dataset(root, require_train=True).modalities["wli"].test == []
    with pytest.raises(DatasetError, match="does not exist") as e:
        scan_dataset(root, require_test=True)
    assert str(root / "wli" / "test") in str(e.value)
    (root / "wli" / "test").mkdir()
    with pytest.raises(DatasetError, match="no kind folders"):
        scan_dataset(root, require_test=True)


def test_only_good_test_images_warns(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_modality(root / "wli", ["a"], ["g"], {})
    index = scan_dataset(root, require_test=True)
    assert any("image AUROC needs" in w for w in index.warnings)


def test_empty_kind_folder(dataset: Path) -> None:
    empty = dataset / "wli" / "test" / "ulcer"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no images") as e:
        scan_dataset(dataset)
    assert str(empty) in str(e.value)


def test_missing_masks_warn_or_error(dataset: Path) -> None:
    # A kind without any mask: warning only.
    write_image(dataset / "wli" / "test" / "ulcer" / "u1.png")
    index = scan_dataset(dataset)
    assert any("ulcer" in w and "no masks" in w for w in index.warnings)
    ulcer = [t for t in index.modalities["wli"].test if t.kind == "ulcer"]
    assert ulcer[0].label == 1 and ulcer[0].mask_path is None
    # Some masks but not all: error naming the file without one.
    write_image(dataset / "wli" / "test" / "polyp" / "p3.png")
    with pytest.raises(DatasetError, match="not for 1") as e:
        scan_dataset(dataset)
    assert str(dataset / "wli" / "test" / "polyp" / "p3.png") in str(e.value)


def test_unsupported_files_counted(dataset: Path) -> None:
    (dataset / "wli" / "train" / "good" / "readme.txt").write_text("x")
    (dataset / "wli" / "train" / "good" / "clip.gif").write_bytes(b"GIF89a")
    (dataset / "wli" / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    index = scan_dataset(dataset)
    assert len(index.modalities["wli"].train) == 3
    msg = [w for w in index.warnings if "unsupported" in w]
    assert len(msg) == 1 and "ignored 2 file(s)" in msg[0] and "readme.txt" in msg[0]


def test_good_image_with_mask_is_error(dataset: Path) -> None:
    mask = write_mask(dataset / "wli" / "ground_truth" / "good" / "g1_mask.png")
    with pytest.raises(DatasetError, match="mislabelled") as e:
        scan_dataset(dataset)
    assert str(mask) in str(e.value) and "g1.png" in str(e.value)


def test_mask_folder_without_images_is_error(dataset: Path) -> None:
    orphan = dataset / "nbi" / "ground_truth" / "ulcer"
    write_mask(orphan / "u_mask.png")
    with pytest.raises(DatasetError, match="has no images") as e:
        scan_dataset(dataset)
    assert str(orphan) in str(e.value)


def test_duplicate_stems_is_error(dataset: Path) -> None:
    write_image(dataset / "wli" / "train" / "good" / "a.jpg")
    with pytest.raises(DatasetError, match="share the name 'a'") as e:
        scan_dataset(dataset)
    assert str(dataset / "wli" / "train" / "good") in str(e.value)


def test_broken_dataset_json(dataset: Path) -> None:
    (dataset / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON") as e:
        scan_dataset(dataset)
    assert str(dataset / "dataset.json") in str(e.value)


# --------------------------------------------------------------------------- pairing


def test_paired_names(dataset: Path, tmp_path: Path) -> None:
    index = scan_dataset(dataset)
    assert paired_train_names(index, paired=True) == ["a", "b", "c"]
    write_image(dataset / "wli" / "train" / "good" / "only_w.png")
    write_image(dataset / "nbi" / "train" / "good" / "only_n1.png")
    write_image(dataset / "nbi" / "train" / "good" / "only_n2.png")
    index = scan_dataset(dataset)
    assert paired_train_names(index, paired="auto") == ["a", "b", "c"]
    assert paired_train_names(index, paired=False) == []
    with pytest.raises(DatasetError) as e:
        paired_train_names(index, paired=True)
    msg = str(e.value)
    assert "1 only in wli/train/good (only_w)" in msg
    assert "2 only in nbi/train/good (only_n1, only_n2)" in msg
    assert "--stage students" in msg and "same file name" in msg
    # single modality: auto -> nothing to pair; required -> error
    only = tmp_path / "only"
    make_modality(only / "wli", ["a"], ["g"], {})
    single = scan_dataset(only)
    assert paired_train_names(single) == []
    with pytest.raises(DatasetError, match="needs both wli/ and nbi/"):
        paired_train_names(single, paired=True)


def test_pairing_lists_at_most_five(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_modality(root / "wli", [f"w{i}" for i in range(8)], [], {})
    make_modality(root / "nbi", ["n0"], [], {})
    with pytest.raises(DatasetError, match=r"8 only in wli/train/good \(w0, .*w4, and 3 more\)"):
        paired_train_names(scan_dataset(root), paired=True)


# --------------------------------------------------------------------------- loading


def test_load_image_formats(tmp_path: Path) -> None:
    files = {
        "rgb.png": write_image(tmp_path / "rgb.png", 50, 70),
        "photo.jpg": write_image(tmp_path / "photo.jpg", 30, 20),
        "gray.png": write_image(tmp_path / "gray.png", 64, 64, channels=1),
        "deep.png": write_image(tmp_path / "deep.png", 33, 47, channels=1, dtype=np.uint16),
        "rgba.png": write_image(tmp_path / "rgba.png", 40, 40, channels=4),
        "deep3.tif": write_image(tmp_path / "deep3.tif", 20, 30, dtype=np.uint16),
    }
    for name, path in files.items():
        img = load_image(path, 32)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8, name
        assert img.std() > 10, f"{name} loaded as a flat image"
    gray = load_image(files["gray.png"], 64)
    assert (gray[..., 0] == gray[..., 1]).all()


def test_load_image_rgb_order_and_resize(tmp_path: Path) -> None:
    bgr = np.zeros((10, 10, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), bgr)
    img = load_image(path, 20)
    assert (img[..., 0] == 255).all() and (img[..., 1:] == 0).all()


def test_truncated_and_fake_images(tmp_path: Path) -> None:
    good = write_image(tmp_path / "full.png", 64, 64)
    cut = tmp_path / "cut.png"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as e:
        load_image(cut, 32)
    assert str(cut) in str(e.value)
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is not an image")
    with pytest.raises(DatasetError, match="fake.jpg"):
        load_image(fake, 32)
    jpg = write_image(tmp_path / "full.jpg", 64, 64)
    cut_jpg = tmp_path / "cut.jpg"
    cut_jpg.write_bytes(jpg.read_bytes()[:400])
    with pytest.raises(DatasetError, match="cut.jpg"):
        load_image(cut_jpg, 32)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        load_image(empty, 32)
    with pytest.raises(DatasetError, match="missing.png"):
        load_image(tmp_path / "missing.png", 32)


def test_load_images_and_masks(dataset: Path) -> None:
    index = scan_dataset(dataset)
    wli = index.modalities["wli"]
    batch = load_images(wli.train, 24, progress="wli train", workers=2)
    assert batch.shape == (3, 24, 24, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[1], load_image(wli.train[1], 24))
    masks = load_masks(wli.test, 40)
    assert masks.shape == (len(wli.test), 40, 40) and masks.dtype == bool
    for item, m in zip(wli.test, masks):
        assert m.any() == (item.label == 1)
    one = load_mask(wli.test[-1].mask_path, 40)
    assert one[15, 15] and not one[0, 0]  # the written square, resized with nearest


def test_load_images_reports_bad_file(dataset: Path) -> None:
    bad = dataset / "wli" / "train" / "good" / "b.png"
    bad.write_bytes(bad.read_bytes()[:50])
    paths = scan_dataset(dataset).modalities["wli"].train
    with pytest.raises(DatasetError) as e:
        load_images(paths, 16, workers=2)
    assert str(bad) in str(e.value)


def test_mask_16bit_and_colour(tmp_path: Path) -> None:
    m16 = np.zeros((20, 20), np.uint16)
    m16[5:10, 5:10] = 1  # would vanish in an 8-bit conversion (1 >> 8 == 0)
    cv2.imwrite(str(tmp_path / "m16.png"), m16)
    assert load_mask(tmp_path / "m16.png", 20)[5:10, 5:10].all()
    col = np.zeros((20, 20, 3), np.uint8)
    col[0:4, 0:4, 2] = 200
    cv2.imwrite(str(tmp_path / "col.png"), col)
    m = load_mask(tmp_path / "col.png", 10)
    assert m[0:2, 0:2].all() and m.sum() == 4
