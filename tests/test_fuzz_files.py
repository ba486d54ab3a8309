"""Seeded, bounded fuzzing of the product's file doors (issue 29, "hostile input on every door").

Every door reads a file a user hands it: the monitor's TOML config (``realtime.config``), an
events JSON (``calibration.events``), a model bundle's JSON files (``engine.deploy.bundle``:
bundle.json, calibration.json, colour.json; ``engine.model.config``: the model/train settings).
For every generated case the loader either accepts (and what it returns is valid) or raises a
``CemdError`` whose message is one short, non-empty line; never another exception, never a hang.
Cases are mutations of a valid document (a dropped key, a value of another type, NaN, huge
numbers, unknown keys, deep nesting), broken text (truncated, random or non-UTF-8 bytes) and
broken paths (a directory, /dev/null, a missing file).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from engine.errors import CemdError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
MAX_MESSAGE = 300

DEEP = 100_000  # nesting depth that overflows a recursive parser


def _hostile_values(rng: random.Random) -> list[Any]:
    nested: Any = 1
    for _ in range(60):
        nested = [nested]
    return [True, False, None, "", "x", "wli", "nbi", "ünïcødé ∑ 🩺", "30", "1e3", "x" * 3000,
            [], {}, [1, 2], [1, 2, 3], ["wli"], {"a": 1}, 0, 1, -1, 2, 7, 10**400, 2**63, -(2**63), 10**18,
            float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e308, -1e308, 5e-324, 0.5, 1.5, 256.0,
            rng.randint(-10**6, 10**6), rng.uniform(-1e3, 1e3), nested]


# --------------------------------------------------------------------------------------------
# structured mutations of a JSON-like document


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def mutate(doc: Any, rng: random.Random, values: list[Any], max_depth: int | None = None) -> tuple[Any, str]:
    """A copy of ``doc`` with 1–3 random structural mutations, and what was done."""
    doc = copy.deepcopy(doc)
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        paths = [p for p in _paths(doc) if max_depth is None or len(p) <= max_depth]
        path = rng.choice(paths)
        op = rng.choice(("replace", "replace", "replace", "drop", "unknown", "wrap"))
        if not path:
            if op == "unknown" and isinstance(doc, dict):
                doc[rng.choice(("zzz", "Fps", "", "ü"))] = rng.choice(values)
                done.append("unknown key at top")
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if op == "drop":
            del parent[key]
        elif op == "unknown" and isinstance(parent, dict):
            parent[rng.choice(("zzz", "colour_scor", "", "ü∑"))] = rng.choice(values)
        elif op == "wrap":
            parent[key] = [parent[key]] if rng.random() < 0.5 else {"v": parent[key]}
        else:
            parent[key] = copy.deepcopy(rng.choice(values))
        done.append(f"{op} {'/'.join(map(str, path))}")
    return doc, "; ".join(done)


def json_text(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False)  # NaN and Infinity as Python writes them


def text_mutations(valid: str, rng: random.Random) -> list[tuple[str, bytes]]:
    """Broken files: truncated, random bytes, non-UTF-8, deep nesting, huge numbers."""
    raw = valid.encode()
    out = [("empty", b""), ("spaces", b"  \n\t "), ("bom", b"\xef\xbb\xbf" + raw), ("nul", b"\x00" * 64),
           ("latin-1", valid.replace("e", "é").encode("latin-1", "replace")),
           ("invalid utf-8", raw[: len(raw) // 2] + b"\xff\xfe\xc3(" + raw[len(raw) // 2:])]
    for i in range(8):
        out.append((f"truncated {i}", raw[: rng.randrange(1, max(2, len(raw)))]))
    for i in range(6):
        out.append((f"random bytes {i}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))))
    for i in range(4):
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append((f"flipped bytes {i}", bytes(b)))
    return out


# --------------------------------------------------------------------------------------------
# the contract


class Tally:
    def __init__(self, door: str, tmp: Path | None = None) -> None:
        self.door, self.accepted, self.refused, self.failures = door, 0, 0, []
        self.tmp = str(tmp) if tmp is not None else None

    def _bad_message(self, msg: str) -> bool:
        """Not one short line (the pytest folder, long on some machines, counts as a short path)."""
        short = msg.replace(self.tmp, "/tmp/x") if self.tmp else msg
        return not msg.strip() or "\n" in msg or "\r" in msg or len(short) >= MAX_MESSAGE

    def case(self, what: str, load: Callable[[], Any], check: Callable[[Any], None] | None = None) -> None:
        try:
            obj = load()
        except CemdError as exc:
            msg = str(exc)
            if self._bad_message(msg):
                self.failures.append(f"{what}: refusal message is not one short line ({len(msg)} chars): {msg[:400]!r}")
            self.refused += 1
            return
        except BaseException as exc:  # noqa: BLE001  (anything else is the bug)
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        try:
            if check is not None:
                check(obj)
        except CemdError as exc:  # a consumer refusing what the loader accepted: fine if it says why
            msg = str(exc)
            if self._bad_message(msg):
                self.failures.append(f"{what}: consumer refusal not one short line: {msg[:400]!r}")
            self.refused += 1
            return
        except Exception as exc:  # noqa: BLE001
            self.failures.append(f"{what}: accepted, but then {type(exc).__name__}: {str(exc)[:200]}")
            return
        self.accepted += 1

    def finish(self, minimum: int) -> None:
        n = self.accepted + self.refused + len(self.failures)
        print(f"fuzz door={self.door} cases={n} accepted={self.accepted} refused={self.refused}")
        assert not self.failures, f"{len(self.failures)} cases broke the contract:\n" + "\n".join(self.failures[:25])
        assert n >= minimum
        assert self.accepted >= 5 and self.refused >= 5, (self.accepted, self.refused)


def file_writer(folder: Path, prefix: str, suffix: str) -> Callable[[bytes | str], Path]:
    """A function that writes its bytes (or text, lone surrogates kept) to a new file in ``folder``."""
    count = iter(range(1, 1 << 30))

    def write(data: bytes | str) -> Path:
        path = folder / f"{prefix}{next(count)}{suffix}"
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        return path

    return write


def path_cases(tally: Tally, tmp_path: Path, load: Callable[[Path], Any]) -> None:
    """A missing file, a directory, /dev/null, an unreadable file."""
    (tmp_path / "a-dir").mkdir(exist_ok=True)
    tally.case("missing file", lambda: load(tmp_path / "missing.file"))
    tally.case("directory", lambda: load(tmp_path / "a-dir"))
    if Path("/dev/null").exists():
        tally.case("/dev/null", lambda: load(Path("/dev/null")))
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = tmp_path / "locked.file"
        locked.write_text("{}")
        locked.chmod(0)
        tally.case("unreadable file", lambda: load(locked))
        locked.chmod(0o600)


def _finite(x: Any, what: str) -> None:
    if isinstance(x, float):
        assert math.isfinite(x), f"{what} accepted as {x}"


# --------------------------------------------------------------------------------------------
# door 1: the monitor's TOML config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(doc: dict[str, Any]) -> str:
    lines = []
    for name, section in doc.items():
        if not isinstance(section, dict):
            lines.insert(0, f"{json.dumps(name)} = {_toml_value(section)}")
            continue
        lines.append(f"[{json.dumps(name)}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in section.items() if v is not None]
    return "\n".join(lines) + "\n"


def _check_config(cfg: Any) -> None:
    from realtime.config import SECTIONS, MonitorConfig

    cfg.validate()
    defaults = MonitorConfig()
    for name in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, name)):
            v, d = getattr(getattr(cfg, name), f.name), getattr(getattr(defaults, name), f.name)
            _finite(v, f"[{name}] {f.name}")
            if isinstance(d, bool):
                assert isinstance(v, bool), f"[{name}] {f.name} = {v!r}"
            elif isinstance(d, (int, float)) and v is not None:
                assert not isinstance(v, bool) and isinstance(v, (int, float)), f"[{name}] {f.name} = {v!r}"
            if isinstance(v, int) and not isinstance(v, bool):
                assert abs(v) < 2**63, f"[{name}] {f.name} = {v}"


def test_fuzz_config_door(tmp_path: Path) -> None:
    import tomllib

    from realtime.config import example_config, load_config

    rng = random.Random(2901)
    values = _hostile_values(rng)
    valid_text = example_config()
    base = tomllib.loads(valid_text)
    # options without a default are commented out in the example: give the doc a value for each
    base["alerts"]["n_of_m"] = [3, 5]
    base["publish"]["sndbuf"] = 65536
    base["run"]["max_seconds"] = 30.0
    base["run"]["overlay_max_width"] = 960
    base["display"]["cue"] = "bell"
    tally = Tally("config", tmp_path)
    write = file_writer(tmp_path, "c", ".toml")

    tally.case("valid example", lambda: load_config(write(valid_text)), _check_config)
    tally.case("valid full", lambda: load_config(write(to_toml(base))), _check_config)
    tally.case("no file", lambda: load_config(None), _check_config)
    for section in base:  # every key of every section, each with every hostile value would be too many: sample
        for key in base[section]:
            for v in rng.sample(values, 4):
                doc = copy.deepcopy(base)
                doc[section][key] = v
                tally.case(f"[{section}] {key} = {str(v)[:40]!r}", lambda d=doc: load_config(write(to_toml(d))),
                           _check_config)
    for i in range(120):
        doc, what = mutate(base, rng, values)
        tally.case(f"mutation {i}: {what}", lambda d=doc: load_config(write(to_toml(d))), _check_config)
    for what, data in text_mutations(valid_text, rng):
        tally.case(what, lambda d=data: load_config(write(d)), _check_config)
    for what, text in [("deep arrays", "[run]\nrun_dir = " + "[" * DEEP + "]" * DEEP),
                       ("deep inline tables", "[run]\nrun_dir = " + "{a = " * DEEP + "1" + "}" * DEEP),
                       ("deep open array", "[run]\nrun_dir = " + "[" * DEEP),
                       ("huge int text", "[publish]\nsndhwm = 1" + "0" * 5000),
                       ("huge float", "[alerts]\nhold_ms = 1e400"),
                       ("dotted section", "[alerts.sub]\nx = 1"),
                       ("array of tables", "[[alerts]]\nhold_ms = 1.0"),
                       ("top-level key", "hold_ms = 1.0"),
                       ("datetime", "[alerts]\nhold_ms = 1979-05-27T07:32:00Z"),
                       ("long string", "[run]\nrun_dir = \"" + "x" * 100_000 + "\""),
                       ("long unknown key", "[run]\n" + "k" * 5000 + " = 1"),
                       ("long unknown section", "[" + "s" * 5000 + "]"),
                       ("nul in cue", "[display]\ncue = \"a\\u0000b\"")]:
        tally.case(what, lambda t=text: load_config(write(t)), _check_config)
    path_cases(tally, tmp_path, load_config)
    tally.finish(minimum=250)


# --------------------------------------------------------------------------------------------
# door 2: an events JSON and what consumes it

VALID_EVENTS = {
    "fps": 30.0, "frames": 300, "width": 640, "height": 480, "synthetic": True,
    "lesions": [{"start_frame": 10, "end_frame": 50, "kind": "depressed_neoplasia", "visible_in": ["wli", "nbi"], "id": 0},
                {"start_frame": 140, "end_frame": 190, "kind": "flat", "visible_in": ["nbi"], "id": 1},
                {"start_frame": 250, "end_frame": 260}],
    "modality": [{"start_frame": 0, "end_frame": 149, "modality": "wli"},
                 {"start_frame": 150, "end_frame": 299, "modality": "nbi"}],
}


def _check_events(ev: dict[str, Any]) -> None:
    from calibration.events import check_fits, event_metrics, lesion_events, lesion_mask, truth_modality

    assert isinstance(ev["fps"], float) and math.isfinite(ev["fps"]) and 0 < ev["fps"] <= 1000
    frames = ev["frames"]
    assert isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1
    for key in ("width", "height"):
        v = ev.get(key)
        assert v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), f"{key} = {v!r}"
    check_fits(ev, frames, ev["fps"], 640, 480)
    n = min(frames, 2000)
    routed = np.array(["wli", "nbi"] * (n // 2 + 1))[:n]
    mask = lesion_mask(ev, n)
    shown = truth_modality(ev, routed)
    lesion_events(ev, shown)
    assert mask.dtype == bool
    alerts = [{"event": "start", "event_id": 1, "frame_id": 12, "modality": "wli", "peak_score": 1.0},
              {"event": "end", "event_id": 1, "frame_id": 20, "end_frame_id": 20, "modality": "wli", "peak_score": 2.0}]
    score = np.linspace(0, 1, n)
    json.dumps(event_metrics(np.arange(n) * 1000 / ev["fps"], routed, score, alerts, ev, ev["fps"]))


def test_fuzz_events_door(tmp_path: Path) -> None:
    from calibration.events import load_events

    rng = random.Random(2902)
    values = _hostile_values(rng)
    tally = Tally("events", tmp_path)
    write = file_writer(tmp_path, "e", ".json")

    valid = json_text(VALID_EVENTS)
    tally.case("valid", lambda: load_events(write(valid)), _check_events)
    tally.case("valid minimal", lambda: load_events(write('{"fps": 25, "frames": 1, "lesions": []}')), _check_events)
    for key in ("fps", "frames", "width", "height", "lesions", "modality"):
        for v in values:
            doc = copy.deepcopy(VALID_EVENTS)
            doc[key] = v
            tally.case(f"{key} = {str(v)[:40]!r}", lambda d=doc: load_events(write(json_text(d))), _check_events)
    for i in range(220):
        doc, what = mutate(VALID_EVENTS, rng, values)
        tally.case(f"mutation {i}: {what}", lambda d=doc: load_events(write(json_text(d))), _check_events)
    for what, data in text_mutations(valid, rng):
        tally.case(what, lambda d=data: load_events(write(d)), _check_events)
    for what, text in [("deep arrays", "[" * DEEP + "]" * DEEP),
                       ("deep objects", '{"a":' * DEEP + "1" + "}" * DEEP),
                       ("deep lesions", '{"fps": 30, "frames": 10, "lesions": ' + "[" * DEEP + "]" * DEEP + "}"),
                       ("huge int text", '{"fps": 30, "frames": 1' + "0" * 5000 + ', "lesions": []}'),
                       ("huge float text", '{"fps": 1e400, "frames": 10, "lesions": []}'),
                       ("lone surrogate", '{"fps": 30, "frames": 10, "lesions": [], "kind": "\\ud800"}'),
                       ("duplicate keys", '{"fps": 30, "fps": "x", "frames": 10, "lesions": []}'),
                       ("a list", "[1, 2, 3]"), ("a string", '"events"'), ("null", "null")]:
        tally.case(what, lambda t=text: load_events(write(t)), _check_events)
    path_cases(tally, tmp_path, load_events)
    tally.finish(minimum=300)


# --------------------------------------------------------------------------------------------
# door 3: a model bundle's JSON files, and the model/train settings in them


@pytest.fixture(scope="module")
def demo_bundle():
    from engine.deploy.bundle import load_bundle

    return load_bundle(DEMO)


def _bundle_copy(dst: Path, meta_text: str | bytes) -> Path:
    """A bundle folder whose weights link to the demo's and whose bundle.json is ``meta_text``."""
    dst.mkdir(parents=True)
    for f in DEMO.iterdir():
        if f.is_file() and f.name not in ("bundle.json", "calibration.json"):
            (dst / f.name).symlink_to(f)
    (dst / "bundle.json").write_bytes(meta_text if isinstance(meta_text, bytes) else meta_text.encode())
    return dst


def _check_bundle(bundle: Any) -> None:
    from realtime.scoring.alerts import Thresholds

    for f in dataclasses.fields(bundle.model):
        v = getattr(bundle.model, f.name)
        _finite(v, f"model.{f.name}")
    assert bundle.students, "a bundle without a branch was accepted"
    t = Thresholds.for_bundle(bundle)
    assert all(math.isfinite(v) for v in t.values.values())


def test_fuzz_bundle_json_door(tmp_path: Path, demo_bundle: Any) -> None:
    """bundle.json: the whole load_bundle, weights linked to the demo's."""
    from engine.deploy.bundle import load_bundle

    rng = random.Random(2903)
    values = _hostile_values(rng)
    base = json.loads((DEMO / "bundle.json").read_text())
    valid = json_text(base)
    tally = Tally("bundle.json", tmp_path)
    n = 0

    def case(what: str, text: str | bytes) -> None:
        nonlocal n
        n += 1
        folder = _bundle_copy(tmp_path / f"b{n}", text)
        tally.case(what, lambda: load_bundle(folder), _check_bundle)

    case("valid", valid)
    for key in ("format", "model", "train", "files", "encoder", "student_width", "score_stats", "colour_skipped"):
        for v in rng.sample(values, 3):
            doc = copy.deepcopy(base)
            doc[key] = v
            case(f"{key} = {str(v)[:40]!r}", json_text(doc))
    for i in range(45):
        doc, what = mutate(base, rng, values, max_depth=3)
        if "format" in doc and rng.random() < 0.9:
            doc["format"] = base["format"]  # else most cases stop at the format check
        case(f"mutation {i}: {what}", json_text(doc))
    for what, data in text_mutations(valid, rng)[:12]:
        case(what, data)
    for what, text in [("deep arrays", "[" * DEEP + "]" * DEEP),
                       ("deep model", valid.replace('"model": {', '"model": {"x": ' + "[" * DEEP + "]" * DEEP + ", ", 1)),
                       ("huge int", valid.replace('"student_width": 96', '"student_width": 1' + "0" * 5000, 1)),
                       ("a list", "[]"), ("null", "null")]:
        case(what, text)
    path_cases(tally, tmp_path, lambda p: load_bundle(p))
    tally.finish(minimum=80)


def test_fuzz_model_config_door() -> None:
    """The model and train settings (engine.model.config.from_dict + validate), as a bundle.json holds them."""
    from engine.model.config import ModelConfig, TrainConfig, from_dict

    rng = random.Random(2904)
    values = _hostile_values(rng) + [[0], [1, 2], ["wli", "nbi"], ["nbi"], [2, 2], ["x"], "efficientnet_lite0", 8,
                                     32, 255, 512, 0.1, 1e-9]
    meta = json.loads((DEMO / "bundle.json").read_text())
    tally = Tally("model-config")

    def load(cls: type, data: Any) -> Any:
        obj = from_dict(cls, data, "bundle.json model")
        if cls is ModelConfig:
            obj.validate()
        return obj

    def check(obj: Any) -> None:
        defaults = type(obj)()
        for f in dataclasses.fields(obj):
            v, d = getattr(obj, f.name), getattr(defaults, f.name)
            _finite(v, f.name)
            if isinstance(d, bool):
                assert isinstance(v, bool), f"{f.name} = {v!r}"
            elif isinstance(d, (int, float)):
                assert isinstance(v, type(d)) and not isinstance(v, bool), f"{f.name} = {v!r}"
                assert abs(v) < 2**63, f"{f.name} = {v}"
            elif isinstance(d, (str, tuple)):
                assert isinstance(v, type(d)), f"{f.name} = {v!r}"

    for cls, base in ((ModelConfig, meta["model"]), (TrainConfig, meta["train"])):
        tally.case(f"{cls.__name__} valid", lambda c=cls, b=base: load(c, b), check)
        tally.case(f"{cls.__name__} defaults", lambda c=cls: load(c, {}), check)
        for key in base:
            for v in rng.sample(values, 5):
                doc = dict(base, **{key: copy.deepcopy(v)})
                tally.case(f"{cls.__name__}.{key} = {str(v)[:40]!r}", lambda c=cls, d=doc: load(c, d), check)
        for i in range(60):
            doc, what = mutate(base, rng, values)
            tally.case(f"{cls.__name__} mutation {i}: {what}", lambda c=cls, d=doc: load(c, d), check)
        for v in (None, [], "model", 3, [["a", 1]]):
            tally.case(f"{cls.__name__} from {v!r}", lambda c=cls, d=v: load(c, d), check)
    tally.finish(minimum=250)


def test_fuzz_calibration_and_colour_door(tmp_path: Path, demo_bundle: Any) -> None:
    """calibration.json (Bundle.calibration → the thresholds) and colour.json (the colour map's statistics)."""
    from engine.deploy.bundle import _load_colour
    from engine.model.backbone import file_sha256
    from realtime.scoring.alerts import Thresholds

    rng = random.Random(2905)
    values = _hostile_values(rng)
    tally = Tally("calibration+colour", tmp_path)
    n = 0

    def folder_with(name: str, data: str | bytes) -> Path:
        nonlocal n
        n += 1
        folder = tmp_path / f"k{n}"
        folder.mkdir()
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        return folder

    def thresholds(folder: Path) -> Any:
        return Thresholds.for_bundle(dataclasses.replace(demo_bundle, path=folder))

    def check_thresholds(t: Any) -> None:
        assert set(t.values) == set(demo_bundle.modalities)
        assert all(isinstance(v, float) and math.isfinite(v) for v in t.values.values())
        assert t.n_of_m is None or (len(t.n_of_m) == 2 and all(isinstance(v, int) for v in t.n_of_m))

    cal = json.loads((DEMO / "calibration.json").read_text())
    valid = json_text(cal)
    tally.case("calibration valid", lambda: thresholds(folder_with("calibration.json", valid)), check_thresholds)
    for i in range(150):
        doc, what = mutate(cal, rng, values, max_depth=4)
        tally.case(f"calibration mutation {i}: {what}",
                   lambda d=doc: thresholds(folder_with("calibration.json", json_text(d))), check_thresholds)
    for what, data in text_mutations(valid, rng) + [("deep", "[" * DEEP + "]" * DEEP),
                                                    ("huge int", '{"n_of_m": [1' + "0" * 5000 + ", 2]}"),
                                                    ("a list", "[]"), ("a number", "3")]:
        tally.case(f"calibration {what}", lambda d=data: thresholds(folder_with("calibration.json", d)),
                   check_thresholds)
    (tmp_path / "dir-cal" / "calibration.json").mkdir(parents=True)
    tally.case("calibration is a directory", lambda: thresholds(tmp_path / "dir-cal"), check_thresholds)

    colour = json.loads((DEMO / "colour.json").read_text())
    model = demo_bundle.model

    def load_colour(data: str | bytes) -> Any:
        path = folder_with("colour.json", data) / "colour.json"
        return _load_colour(path, file_sha256(path), model)

    def check_colour(stats: Any) -> None:
        assert isinstance(stats, dict) and stats
        for s in stats.values():
            vec = np.asarray(s["mean"], dtype=np.float64)
            mat = np.asarray(s["inv_cov"], dtype=np.float64)
            assert vec.shape == (2,) and mat.shape == (2, 2) and np.isfinite(vec).all() and np.isfinite(mat).all()
            assert isinstance(s["weight"], (int, float)) and math.isfinite(s["weight"]) and s["weight"] > 0

    valid_colour = json_text(colour)
    tally.case("colour valid", lambda: load_colour(valid_colour), check_colour)
    for i in range(150):
        doc, what = mutate(colour, rng, values, max_depth=5)
        tally.case(f"colour mutation {i}: {what}", lambda d=doc: load_colour(json_text(d)), check_colour)
    for what, data in text_mutations(valid_colour, rng)[:10] + [("deep", "[" * DEEP + "]" * DEEP), ("a list", "[]")]:
        tally.case(f"colour {what}", lambda d=data: load_colour(d), check_colour)
    tally.finish(minimum=300)


# --------------------------------------------------------------------------------------------
# the real command line: a bad file is one line on stderr and exit status 2


def _cemd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "realtime.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("door", ["config", "events", "bundle"])
def test_cli_refuses_bad_file_in_one_line(tmp_path: Path, door: str) -> None:
    if door == "config":
        bad = tmp_path / "bad.toml"
        bad.write_text("[run]\nrun_dir = " + "[" * DEEP)
        args = ["run", "--config", str(bad), "--dashboard", "off"]
    elif door == "events":
        bad = tmp_path / "bad.json"
        bad.write_bytes(b'{"fps": 30, "frames": \xff\xfe, "lesions": []}')
        args = ["evaluate-video", "--bundle", str(DEMO), "--video", str(tmp_path / "v.mp4"), "--events", str(bad),
                "--json", str(tmp_path / "out.json"), "--no-progress"]
    else:
        meta = json.loads((DEMO / "bundle.json").read_text())
        meta["model"]["backbone"] = ["efficientnet_lite0"]
        bad = _bundle_copy(tmp_path / "bundle", json.dumps(meta))
        args = ["export", "--bundle", str(bad), "--backend", "onnx"]
    r = _cemd(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert str(bad.name) in lines[0] or str(bad) in lines[0]
