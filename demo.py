"""The whole KD-OIQA pipeline on CPU in a few minutes (what `make demo` runs).

synthetic database -> cube faces -> resized ERP -> teacher (k folds) -> teacher features ->
student with mask distillation and without (the baseline) -> predict.py on one image -> table.
Small settings (no ImageNet weights, 64-pixel faces, 128x64 ERP, few epochs): the figures show
that the pipeline works, not the paper's accuracy.

    python demo.py --out demo            # make demo
    python demo.py --out demo --epochs 20 --student-epochs 30   # longer
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from common import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo"), help="everything goes here (database, runs, features)")
    p.add_argument("--contents", type=int, default=6, help="synthetic contents (21 images each)")
    p.add_argument("--folds", type=int, default=3, help="content-disjoint folds")
    p.add_argument("--epochs", type=int, default=12, help="teacher epochs")
    p.add_argument("--student-epochs", type=int, default=14, help="student epochs (2 warm-up + 2 feature + mask)")
    p.add_argument("--face-size", type=int, default=64)
    p.add_argument("--erp-size", default="128x64")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kd", default="none,mask", help="students to train, comma-separated from none,feature,mask "
                   "(the README's ablation uses all three)")
    p.add_argument("--size", default="256x128", help="synthetic panorama size")
    return p


def step(title: str, argv: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    result = subprocess.run([sys.executable, *argv])
    if result.returncode != 0:
        raise UserError(f"demo step '{title}' failed (exit code {result.returncode}); see the output above")


def resume_flag(run: Path) -> list[str]:
    """An interrupted demo continues where it stopped."""
    return ["--resume"] if (run / "args.json").is_file() else []


def summary_of(run: Path, metric: str) -> str:
    """'mean ± std' over the folds, from the run's results.csv."""
    table = pd.read_csv(run / "results.csv").set_index("fold")
    return f"{float(table.loc['mean', metric]):.3f} ± {float(table.loc['std', metric]):.3f}"


KD_NAMES = {"none": "student, no KD", "feature": "student, feature KD", "mask": "student, mask KD"}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    db, runs, feats = out / "Synthetic", out / "runs", out / "features"
    started = time.perf_counter()
    common = ["--no-pretrained", "--workers", str(args.workers), "--no-progress", "--face-size", str(args.face_size),
              "--erp-size", args.erp_size]
    if not (db / "meta.csv").is_file():
        step("synthetic database", ["make_synthetic_db.py", "--out", str(db), "--contents", str(args.contents),
                                    "--size", args.size, "--seed", "0"])
    folds = db / "folds" / f"k{args.folds}_seed2023.json"
    step("content-disjoint folds", ["dataset.py", "folds", "--database", str(db), "--k", str(args.folds)])
    step("cube faces", ["-m", "viewport.extract", "--database", str(db), "--size", str(args.face_size),
                        "--workers", str(args.workers)])
    step("resized ERP", ["img_resize.py", "--database", str(db), "--erp-size", args.erp_size,
                         "--workers", str(args.workers)])
    teacher = runs / "teacher"
    if not (teacher / "results.csv").is_file():
        step("teacher on cube faces", ["teacher_train.py", "--database", str(db), "--folds-file", str(folds),
                                       "--epochs", str(args.epochs), "--out", str(teacher), *common,
                                       *resume_flag(teacher)])
    step("teacher features", ["feat_save.py", "--database", str(db), "--run", str(teacher), "--features-dir",
                              str(feats), "--workers", str(args.workers), "--no-progress"])
    variants = [kd.strip() for kd in args.kd.split(",") if kd.strip()]
    unknown = sorted(set(variants) - set(KD_NAMES))
    if unknown or not variants:
        raise UserError(f"--kd takes a comma-separated list of none, feature, mask; got {args.kd!r}")
    students = {}
    for kd in variants:
        run = runs / f"student_{kd}"
        students[kd] = run
        if not (run / "results.csv").is_file():
            step(f"ERP student, --kd {kd}", ["mask_train.py", "--database", str(db), "--kd", kd, "--features", str(feats),
                                             "--folds-file", str(folds), "--epochs", str(args.student_epochs),
                                             "--kd-warmup", "2", "--kd-feature-epochs", "2", "--out", str(run), *common,
                                             *resume_flag(run)])
    image = sorted((db / "images").glob("*.png"))[0]
    step("predict.py on one image", ["predict.py", str(students[variants[-1]] / "fold0" / "checkpoint.pt"), str(image),
                                     "--no-progress"])
    rows = [("teacher (cube faces)", teacher)] + [(KD_NAMES[kd], students[kd]) for kd in variants]
    print(f"\n== KD-OIQA demo on {db} ({args.folds} folds, last epoch, mean ± std over folds)")
    print(f"{'model':<22} {'SRCC':>15} {'PLCC':>15}")
    for name, run in rows:
        print(f"{name:<22} {summary_of(run, 'srcc'):>15} {summary_of(run, 'plcc'):>15}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; runs in {runs}")


if __name__ == "__main__":
    run_cli(main)
