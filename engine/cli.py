"""`cemd` subcommands of the engine: synth, synth-video, train, evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from engine.model.config import COLOUR_STRIDES, SCORE_REDUCTIONS, ModelConfig, TrainConfig


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a bundle (stage 1 teacher on paired images, stage 2 students on unpaired images)",
        description="Train the CEMD teacher and the WLI/NBI student branches into a bundle directory.",
    )
    _add_train_stages(p)
    _add_train_inputs(p)
    _add_train_memory(p)
    _add_train_colour(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true")
    _add_train_ablation(p)
    p.set_defaults(func=_run_train)


def _add_train_stages(p: argparse.ArgumentParser) -> None:
    """`cemd train` options: data, bundle, stage, epochs and early stopping."""
    p.add_argument("--data", type=Path, required=True, help="dataset root (layout: docs/DATA.md)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--stage", choices=("teacher", "students", "memory", "colour", "all"), default="all",
                   help="memory / colour: only fit the memory map / the colour outlier map of an existing bundle "
                        "(seconds; docs/MODEL.md)")
    p.add_argument("--epochs", type=int, help="maximum epochs for both stages (overrides the two below)")
    p.add_argument("--teacher-epochs", type=int, default=TrainConfig.teacher_epochs,
                   help="maximum stage-1 epochs (default %(default)s; early stopping usually ends it sooner)")
    p.add_argument("--student-epochs", type=int, default=TrainConfig.student_epochs,
                   help="maximum epochs per student (default %(default)s)")
    p.add_argument("--teacher-one-modality", action="store_true",
                   help="train the stage-1 teacher even when the data has one modality (default: skipped there, "
                        "the teacher is the frozen encoder; docs/MODEL.md#training)")
    p.add_argument("--patience", type=int, default=TrainConfig.patience, metavar="N",
                   help="early stopping: end a stage once its held-out loss has not improved by --min-delta "
                        "for N epochs, keeping its best epoch (default %(default)s; docs/MODEL.md#training)")
    p.add_argument("--min-delta", type=float, default=TrainConfig.min_delta, metavar="R",
                   help="relative improvement of the held-out loss that counts (default %(default)g = "
                        f"{TrainConfig.min_delta * 100:g}%%)")
    p.add_argument("--no-early-stopping", action="store_true",
                   help="run every epoch under the fixed-length one-cycle schedule and keep the last")


def _add_train_inputs(p: argparse.ArgumentParser) -> None:
    """`cemd train` options: batch, seed, device, modalities, input size and synthetic anomalies."""
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--modalities", default="wli,nbi", help="comma list of modalities to train")
    p.add_argument("--input-size", type=int, default=ModelConfig.input_size)
    p.add_argument("--paired-fraction", type=float, default=TrainConfig.paired_fraction)
    p.add_argument("--synthetic-anomalies", type=float, default=TrainConfig.synthetic_anomalies, metavar="P",
                   help="denoising students: share (0–1) of stage-2 samples shown with a generic synthetic anomaly, "
                        "the target staying the clean image's teacher features (default 0 = off; docs/MODEL.md)")
    p.add_argument("--synthetic-copies", type=int, default=TrainConfig.synthetic_copies, metavar="K",
                   help="anomalous copies made (and encoded) per training image (default %(default)s)")


def _add_train_memory(p: argparse.ArgumentParser) -> None:
    """`cemd train` options of the memory map."""
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--memory-score", dest="memory_score", action="store_true", default=None,
                     help="add the memory map (distance of each patch to its nearest normal training patch) to the "
                          f"distillation map{' (the default)' if ModelConfig.memory_score else ''}; docs/MODEL.md")
    mem.add_argument("--no-memory-score", dest="memory_score", action="store_false",
                     help=f"distillation map without the memory map{'' if ModelConfig.memory_score else ' (the default)'}")
    p.add_argument("--memory-gain", type=float, default=ModelConfig.memory_gain, metavar="G",
                   help="weight of the memory map relative to the distillation map's normal spread (default %(default)g)")
    p.add_argument("--memory-bank", type=int, default=ModelConfig.memory_bank, metavar="N",
                   help="normal patches kept in the memory, drawn at random (default %(default)s; the map's cost "
                        "per frame grows with it)")


def _add_train_colour(p: argparse.ArgumentParser) -> None:
    """`cemd train` options of the colour outlier map."""
    p.add_argument("--colour-score", action="store_true",
                   help="also fit the hand-made colour outlier map after the students and add it to the distillation "
                        "map (off by default: it did not raise AUROC on real colonoscopy, docs/RESULTS.md)")
    p.add_argument("--no-colour-score", action="store_true",
                   help="distillation map only (the default; kept for scripts that pass it)")
    p.add_argument("--colour-gain", type=float, default=ModelConfig.colour_gain, metavar="G",
                   help="weight of the colour map relative to the distillation map's normal spread (default %(default)s)")
    p.add_argument("--colour-stride", type=int, choices=COLOUR_STRIDES, default=ModelConfig.colour_stride, metavar="K",
                   help=f"compute the colour map at 1/K of the input size and upsample it "
                        f"({', '.join(map(str, COLOUR_STRIDES))}; default %(default)s)")
    p.add_argument("--colour-background", type=float, default=ModelConfig.colour_background, metavar="S",
                   help="σ in input pixels of the local colour background each pixel is compared with "
                        "(0 = the frame's median colour; default %(default)g)")
    p.add_argument("--colour-brownish", default=",".join(ModelConfig.colour_brownish) or "none", metavar="MODS",
                   help="modalities whose colour map scores only browner-than-normal deviations, comma-separated, "
                        "or 'none' (the others score any direction; default %(default)s)")
    p.add_argument("--colour-vessel-cut", type=float, default=ModelConfig.colour_vessel_cut, metavar="K",
                   help="in brownish modalities, leave pixels more than K normal standard deviations less brown "
                        "than a first background (vessels) out of the local background (0 = off; default %(default)g)")


def _add_train_ablation(p: argparse.ArgumentParser) -> None:
    """`cemd train` ablation switches, in their own --help group."""
    abl = p.add_argument_group("ablation switches (defaults = CEMD as reconstructed in docs/MODEL.md)")
    abl.add_argument("--no-teacher-training", action="store_true", help="plain reverse distillation: teacher = frozen encoder")
    abl.add_argument("--no-fusion", action="store_true", help="no cross attention between modalities in stage 1")
    abl.add_argument("--mask-mode", choices=("complementary", "independent"), default=ModelConfig.mask_mode)
    abl.add_argument("--student-loss", choices=("global", "pixel"), default=ModelConfig.student_loss)
    abl.add_argument("--hard-mining", action="store_true", help="hard-mining global cosine (ReContrast)")
    abl.add_argument("--score-reduction", choices=SCORE_REDUCTIONS, default=ModelConfig.score_reduction)
    abl.add_argument("--score-scales", default=",".join(map(str, ModelConfig.score_scales)),
                     help="encoder scales summed into the anomaly map: 0 = stride 4, 1 = stride 8, 2 = stride 16 "
                          "(RD4AD: 0,1,2)")


def _int_tuple(text: str, option: str) -> tuple[int, ...]:
    from engine.errors import CemdError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CemdError(f"{option} takes comma-separated integers such as 1,2; got {text!r}") from None


def _modality_tuple(text: str, option: str) -> tuple[str, ...]:
    from engine.errors import CemdError
    from engine.model.config import MODALITIES

    if text.strip().lower() == "none":
        return ()
    mods = tuple(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods:
        raise CemdError(f"{option} takes modalities from {', '.join(MODALITIES)} separated by commas, or 'none'; "
                        f"got {text!r}")
    return mods


def _run_train(args: argparse.Namespace) -> int:
    from engine.errors import CemdError
    from engine.train.trainer import Trainer

    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    if args.stage == "memory" and args.memory_score is False:
        raise CemdError("--stage memory fits the memory map; it cannot be combined with --no-memory-score")
    if not args.memory_gain > 0:
        raise CemdError(f"--memory-gain must be > 0, got {args.memory_gain}")
    if args.memory_bank < 1:
        raise CemdError(f"--memory-bank must be at least 1 patch, got {args.memory_bank}")
    model = ModelConfig(
        input_size=args.input_size,
        modalities=modalities,
        teacher_training=not args.no_teacher_training,
        fusion=not args.no_fusion,
        mask_mode=args.mask_mode,
        student_loss=args.student_loss,
        hard_mining=args.hard_mining,
        score_reduction=args.score_reduction,
        score_scales=_int_tuple(args.score_scales, "--score-scales"),
        colour_score=args.colour_score and not args.no_colour_score,
        colour_gain=args.colour_gain,
        colour_stride=args.colour_stride,
        colour_background=args.colour_background,
        colour_brownish=_modality_tuple(args.colour_brownish, "--colour-brownish"),
        colour_vessel_cut=args.colour_vessel_cut,
        memory_score=(ModelConfig.memory_score if args.memory_score is None else args.memory_score)
        or args.stage == "memory",
        memory_gain=args.memory_gain,
        memory_bank=args.memory_bank,
    )
    model.validate()
    if args.epochs is not None and args.epochs < 1 or args.batch_size < 2:
        raise CemdError("--epochs must be ≥ 1 and --batch-size ≥ 2")
    if not 0 < args.paired_fraction <= 1:
        raise CemdError("--paired-fraction must be in (0, 1]")
    if not 0 <= args.synthetic_anomalies <= 1:
        raise CemdError(f"--synthetic-anomalies is a share of the samples, 0 to 1; got {args.synthetic_anomalies}")
    if args.stage == "colour" and args.no_colour_score:
        raise CemdError("--stage colour fits the colour map; it cannot be combined with --no-colour-score")
    if not args.colour_gain > 0:
        raise CemdError(f"--colour-gain must be > 0, got {args.colour_gain}")
    if args.synthetic_copies < 1:
        raise CemdError(f"--synthetic-copies must be ≥ 1, got {args.synthetic_copies}")
    Trainer(args.data, args.out, model, train_config(args), stage=args.stage, resume=args.resume,
            progress=not args.no_progress).run()
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `cemd train` options."""
    from engine.errors import CemdError

    if args.patience < 1:
        raise CemdError(f"--patience must be ≥ 1 epoch, got {args.patience}")
    if not 0 <= args.min_delta < 1:
        raise CemdError(f"--min-delta is a relative improvement, 0 to below 1; got {args.min_delta}")
    return TrainConfig(
        seed=args.seed,
        teacher_epochs=args.epochs or args.teacher_epochs,
        student_epochs=args.epochs or args.student_epochs,
        batch_size=args.batch_size,
        paired_fraction=args.paired_fraction,
        synthetic_anomalies=args.synthetic_anomalies,
        synthetic_copies=args.synthetic_copies,
        early_stopping=not args.no_early_stopping,
        patience=args.patience,
        min_delta=args.min_delta,
        teacher_one_modality=args.teacher_one_modality,
        device=args.device,
        threads=args.threads,
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="image/pixel AUROC, AP, F1-max per modality and lesion kind",
                       description="Evaluate a bundle on a dataset's test split (layout: docs/DATA.md).")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True, help="where to write the metrics JSON")
    p.add_argument("--plots", type=Path, help="folder for ROC curves and heat-map examples (PNG)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from engine.eval.evaluate import evaluate_bundle

    evaluate_bundle(args.bundle, args.data, args.json, args.plots, progress=not args.no_progress)
    Console().print(f"metrics written to {args.json}" + (f", plots to {args.plots}" if args.plots else ""))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="evaluate the shipped demo bundle on freshly rendered synthetic data",
                       description="The embedded default: models/demo on a synthetic WLI/NBI test set.")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default runs/demo-TIMESTAMP)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle to evaluate (default models/demo)")
    p.add_argument("--test", type=int, default=25, help="test images per lesion kind and normal (default 25)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from engine.eval.demo import DEMO_BUNDLE, run_demo

    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_demo(run_dir, args.bundle or DEMO_BUNDLE, n_test=args.test)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="compile the student branches (tensorrt, aoti, onnx …) and store them beside the "
                                      "bundle",
                       description="Compile each student branch, check it against eager PyTorch on probe frames and "
                                   "store it in BUNDLE/compiled/, so the monitor starts without compiling. --backend onnx "
                                   "writes the ONNX graph (the hand-off file for any runtime), checked with onnx.checker "
                                   "and, where ONNX Runtime is installed, against eager PyTorch.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--backend", choices=("tensorrt", "aoti", "onnx", "onnxruntime", "openvino"), required=True)
    p.add_argument("--precision", choices=("fp16", "fp32"), help="default: fp16 for tensorrt, fp32 for aoti")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=1, help="static batch size of the compiled graph (default 1)")
    p.add_argument("--modalities", default=None, help="comma list (default: every branch in the bundle)")
    p.add_argument("--rebuild", action="store_true", help="compile even when a valid artifact exists")
    p.add_argument("--ship", action="store_true",
                   help="with --backend onnx: also put the graphs in BUNDLE/exported/, the folder a bundle carries to "
                        "other machines (kept in git for the demo), so a fresh copy starts without exporting")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from engine.deploy.backends import load_scorers
    from engine.deploy.bundle import load_bundle
    from engine.errors import CemdError

    console = Console()
    if args.batch < 1:
        raise CemdError("--batch must be ≥ 1")
    bundle = load_bundle(args.bundle)
    mods = [m.strip() for m in args.modalities.split(",")] if args.modalities else list(bundle.modalities)
    unknown = [m for m in mods if m not in bundle.modalities]
    if unknown:
        raise CemdError(f"--modalities: the bundle has no {', '.join(unknown)} branch "
                        f"(it has {', '.join(bundle.modalities)})")
    backend = args.backend
    if args.ship and backend != "onnx":
        raise CemdError("--ship goes with --backend onnx (a compiled TensorRT or AOTInductor artifact is "
                        "specific to one machine and is not shipped)")
    if backend == "onnx":
        from engine.deploy.onnx_runtimes import RuntimeMissing, runtime_version

        try:
            runtime_version("onnxruntime")
            backend = "onnxruntime"  # the graph, checked against eager in ONNX Runtime
        except RuntimeMissing:
            return _ship(bundle, mods, args, console, _export_onnx_unchecked(bundle, mods, args, console))
    # AOTInductor branches that need compiling are compiled at once, one process each
    scorers = load_scorers(bundle, mods, backend, args.device, args.precision, args.batch,
                           rebuild=args.rebuild, log=lambda msg: console.print(msg, highlight=False))
    for m, scorer in scorers.items():
        par = scorer.parity or {}
        built = f"compiled in {scorer.compile_seconds:.0f} s" if scorer.compile_seconds else "already compiled"
        console.print(f"{m.upper()} {scorer.backend} {scorer.precision} batch {scorer.batch}: {built}, {scorer.artifact}; "
                      f"parity vs eager: max map error {par.get('max_abs_map_error', float('nan')):.1e} "
                      f"(tolerance {par.get('tolerance', float('nan')):.0e}), same ranking {par.get('same_ranking')}",
                      highlight=False)
    return _ship(bundle, mods, args, console, 0) if args.ship else 0


def _ship(bundle, mods: list[str], args: argparse.Namespace, console: Console, rc: int) -> int:  # noqa: ANN001
    from engine.deploy.backends import ship_onnx

    for m in mods if args.ship and rc == 0 else []:
        path = ship_onnx(bundle, m, args.batch, log=lambda msg: console.print(msg, highlight=False))
        console.print(f"{m.upper()} onnx batch {args.batch}: shipped as {path}", highlight=False)
    return rc


def _export_onnx_unchecked(bundle, mods: list[str], args: argparse.Namespace, console: Console) -> int:  # noqa: ANN001
    from engine.deploy.backends import onnx_graph

    for m in mods:
        path, seconds = onnx_graph(bundle, m, args.batch, rebuild=args.rebuild,
                                   log=lambda msg: console.print(msg, highlight=False))
        console.print(f"{m.upper()} onnx batch {args.batch}: {'exported in %.0f s' % seconds if seconds else 'already exported'}"
                      f", {path}; onnx.checker passed; parity vs eager not checked (ONNX Runtime is not installed: "
                      f"pip install -e '.[onnxruntime]')", highlight=False)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from engine.synth import cli as synth_cli

    synth_cli.register(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    _add_export(sub)

