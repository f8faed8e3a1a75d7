"""The whole KD-OIQA pipeline on CPU in a few minutes (what `make demo` runs).

synthetic database -> cube faces -> resized ERP -> teacher (k folds) -> teacher features ->
student with mask distillation and without (the baseline) -> predict.py on one image -> table.
Small settings (no ImageNet weights, 64-pixel faces, 128x64 ERP, few epochs): the figures show
that the pipeline works, not the paper's accuracy.

    python demo.py --out demo            # make demo: 6 contents x 21 images, 3 folds (about 6 minutes on 2 cores)
    python demo.py --out demo --epochs 20 --student-epochs 30   # longer
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from kdoiqa import cli, pipeline, stages
from kdoiqa.cli import Parser, erp_size_type, non_negative, positive
from kdoiqa.common import UserError, parse_size, run_cli


def build_parser() -> Parser:
    p = Parser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo"), help="everything goes here (database, runs, features)")
    p.add_argument("--contents", type=positive, default=6, help="synthetic contents (21 images each)")
    p.add_argument("--folds", type=positive, default=3, help="content-disjoint folds")
    p.add_argument("--epochs", type=positive, default=12, help="teacher epochs")
    p.add_argument("--student-epochs", type=positive, default=14,
                   help="student epochs (2 warm-up + 2 feature imitation + the mask phase)")
    p.add_argument("--face-size", type=positive, default=64, help="cube-face side")
    p.add_argument("--erp-size", type=erp_size_type, default=(128, 64), metavar="WxH", help="student input size")
    p.add_argument("--workers", type=non_negative, default=2, help="data-loading worker processes")
    p.add_argument("--kd", default="none,mask", help="students to train, comma-separated from none,feature,mask "
                   "(the README's ablation uses all three)")
    p.add_argument("--size", default="256x128", help="synthetic panorama size, 2:1")
    return p


STARTED = time.perf_counter()


def run_command(title: str, argv: list[str]) -> str:
    """Print a step's shell command, run it as a user would, and say how long it took."""
    print(f"$ python {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    began = time.perf_counter()
    result = subprocess.run([sys.executable, *argv])
    if result.returncode != 0:
        raise UserError(f"demo step '{title}' failed (exit code {result.returncode}); see the output above")
    print(f"-- {title}: {time.perf_counter() - began:.0f} s ({(time.perf_counter() - STARTED) / 60:.1f} min so far)",
          flush=True)
    return "made"


def command_stage(kind: str, title: str, argv: list[str]) -> pipeline.Stage:
    return pipeline.Stage(kind, title, lambda: run_command(title, argv))


def training_stage(script: str, given: dict, run_dir: Path, label: str) -> pipeline.Stage:
    """A training as its shell command (skipped when it finished, resumed when it was interrupted)."""
    def run() -> str:
        state = stages.training_state(run_dir)
        if state == "done":
            print(f"{label}: done, skipped ({run_dir})", flush=True)
            return "done"
        values = {**given, "out": str(run_dir), **({"resume": True} if state == "partial" else {})}
        return run_command(label, [f"{script}.py", *cli.to_argv(cli.training_parser(script), values)])
    return pipeline.Stage(pipeline.stage_kind(script), label, run)


def summary_of(run: Path, metric: str) -> str:
    """'mean ± std' over the folds, from the run's results.csv."""
    table = pd.read_csv(run / "results.csv").set_index("fold")
    return f"{float(table.loc['mean', metric]):.3f} ± {float(table.loc['std', metric]):.3f}"


KD_NAMES = {"none": "student, no KD", "feature": "student, feature KD", "mask": "student, mask KD"}


def check_args(args) -> list[str]:
    """Every argument checked before any work; the student variants to train."""
    variants = [kd.strip() for kd in args.kd.split(",") if kd.strip()]
    unknown = sorted(set(variants) - set(KD_NAMES))
    if unknown or not variants:
        raise UserError(f"--kd takes a comma-separated list of none, feature, mask; got {args.kd!r}")
    try:
        width, height = parse_size(args.size, name="--size")
    except ValueError as err:
        raise UserError(str(err)) from None
    if width != 2 * height or width < 128:
        raise UserError(f"--size {args.size}: a panorama twice as wide as high, at least 128x64")
    if args.folds < 2 or args.folds > args.contents:
        raise UserError(f"--folds {args.folds}: between 2 and --contents ({args.contents})")
    if set(variants) - {"none"} and args.student_epochs < 5:
        raise UserError(f"--student-epochs {args.student_epochs}: distillation needs at least 5 (2 warm-up, "
                        f"2 feature imitation, 1 with the mask)")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: is a file, expected a folder")
    return variants


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    variants = check_args(args)
    out: Path = args.out
    db, runs, feats = out / "Synthetic", out / "runs", out / "features"
    started = time.perf_counter()
    erp = f"{args.erp_size[0]}x{args.erp_size[1]}"
    steps = []
    if not (db / "meta.csv").is_file():
        steps.append(command_stage("database", "synthetic database", [
            "make_synthetic_db.py", "--out", str(db), "--contents", str(args.contents), "--size", args.size,
            "--seed", "0"]))
    steps.append(command_stage("faces", "cube faces", ["img_resize.py", "--faces", "--database", str(db),
                                                       "--face-size", str(args.face_size), "--no-progress"]))
    steps.append(command_stage("erp", "resized ERP", ["img_resize.py", "--database", str(db), "--erp-size", erp,
                                                      "--no-progress"]))
    # teacher -> features -> students: the pipeline of reproduce.py and the cross-database matrix, each
    # training as the command a user would type.
    experiment = pipeline.Experiment("Synthetic", {"database": str(db)}, runs / "teacher", feats,
                                     {kd: runs / f"student_{kd}" for kd in variants})
    common = {"pretrained": False, "workers": args.workers, "progress": False, "face_size": args.face_size,
              "erp_size": args.erp_size, "folds": args.folds}
    teacher_values = {**common, "epochs": args.epochs}
    student_values = {**common, "epochs": args.student_epochs, "kd_warmup": 2, "kd_feature_epochs": 2}

    def training(script: str, given: dict, run_dir: Path, label: str) -> pipeline.Stage:
        return training_stage(script, {**given, **(teacher_values if "teacher" in script else student_values)},
                              run_dir, label)

    def features(experiment: pipeline.Experiment, label: str) -> pipeline.Stage:
        return command_stage("features", label, [
            "feat_save.py", "--database", str(db), "--run", str(experiment.teacher), "--features-dir",
            str(experiment.features), "--workers", str(args.workers), "--no-progress"])

    steps += pipeline.experiment_stages(experiment, {}, training, features)
    students = dict(experiment.students)

    def predict_stage() -> str:
        first = sorted((db / "images").glob("*.png"))[0]
        return run_command("predict.py on one image, with every fold's student",
                           ["predict.py", str(students[variants[-1]]), str(first), "--no-progress"])
    steps.append(pipeline.Stage("predict", "predict.py on one image, with every fold's student", predict_stage))
    pipeline.execute(steps)
    image = sorted((db / "images").glob("*.png"))[0]
    print(what_the_models_saw(db, students[variants[-1]], image))
    rows = [("teacher (cube faces)", experiment.teacher)] + [(KD_NAMES[kd], students[kd]) for kd in variants]
    print(f"\n== KD-OIQA demo on {db} ({args.folds} folds, last epoch, protocol ours, mean ± std over folds)")
    print(f"{'model':<22} {'SRCC':>15} {'PLCC':>15}")
    for name, run in rows:
        print(f"{name:<22} {summary_of(run, 'srcc'):>15} {summary_of(run, 'plcc'):>15}")
    print("\nThese are tiny models trained from scratch for minutes on a few synthetic images: the table shows that\n"
          "every stage runs, and the differences between its rows are noise, not a finding about the method.\n"
          "The paper's comparison needs ImageNet weights, its databases and a GPU (see 'Reproducing the paper').")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; runs in {runs}")


def what_the_models_saw(db: Path, run: Path, image: Path) -> str:
    """The scored image's true score, and which folds' models trained on it (their score is no test)."""
    meta = pd.read_csv(db / "meta.csv")
    name = image.relative_to(db).as_posix()
    row = meta[meta["image"] == name].iloc[0]
    record = json.loads((run / "args.json").read_text())
    folds = json.loads(Path(record["folds"]["path"]).read_text())["folds"]
    seen = [k for k, fold in enumerate(folds) if name in fold["train"]]
    unseen = [k for k in range(len(folds)) if k not in seen]
    return (f"{name}: true score {row['mos']:.2f} (meta.csv); the models of fold(s) {', '.join(map(str, seen))} "
            f"trained on it, so their scores are not a test; fold(s) {', '.join(map(str, unseen))} never saw it")


if __name__ == "__main__":
    run_cli(main)
