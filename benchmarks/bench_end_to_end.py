"""The full paper protocol end to end, timed per stage (not a test).

OIQA-sized by default: a synthetic database of 16 contents x (reference + 20 distorted) from
4096x2048 procedural sources; cube faces (256, antialiased, on the device); ERP resized to
1024x512; 5-fold teacher (100 epochs, batch 6); features; 5-fold student with mask distillation
(100 epochs). Prints JSON with the wall time of each stage and the mean SRCC/PLCC of each model.

    python benchmarks/bench_end_to_end.py --work scratch/e2e                          # the paper's settings
    python benchmarks/bench_end_to_end.py --work scratch/e2e --size 512x256 --epochs 2 --face-size 64 \
        --erp-size 128x64 --contents 5 --device cpu                                 # CPU smoke run
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from bench_utils import REPO, machine, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (database, runs, features)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contents", type=int, default=16)
    p.add_argument("--size", default="4096x2048", help="synthetic source size")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--face-size", type=int, default=256)
    p.add_argument("--erp-size", default="1024x512")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to both training scripts")
    args = p.parse_args()
    db, runs, feats = args.work / "SyntheticOIQA", args.work / "runs", args.work / "features"
    common = ["--device", args.device, "--workers", str(args.workers), "--no-progress", "--no-pretrained",
              "--face-size", str(args.face_size), "--erp-size", args.erp_size, "--epochs", str(args.epochs),
              *args.extra]
    stages = [
        ("synthetic_db", ["make_synthetic_db.py", "--out", str(db), "--contents", str(args.contents), "--size",
                          args.size, "--workers", str(args.workers), "--overwrite"]),
        ("folds", ["dataset.py", "folds", "--database", str(db)]),
        ("faces", ["-m", "viewport.extract", "--database", str(db), "--face-size", str(args.face_size), "--device",
                   args.device, "--threads", str(args.workers)]),
        ("erp_resize", ["img_resize.py", "--database", str(db), "--erp-size", args.erp_size,
                        "--threads", str(args.workers)]),
        ("teacher", ["teacher_train.py", "--database", str(db), "--out", str(runs / "teacher"), *common]),
        ("features", ["feat_save.py", "--database", str(db), "--run", str(runs / "teacher"), "--features-dir",
                      str(feats), "--device", args.device, "--workers", str(args.workers), "--no-progress"]),
        ("student_mask", ["mask_train.py", "--database", str(db), "--features-dir", str(feats), "--kd", "mask",
                          "--out", str(runs / "student_mask"), *common]),
    ]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name, argv in stages:
        t0 = time.perf_counter()
        print(f"== {name}: {' '.join(argv)}", flush=True)
        result = subprocess.run([sys.executable, *argv], cwd=REPO)
        if result.returncode:
            sys.exit(f"stage {name} failed with exit code {result.returncode}")
        seconds[name] = time.perf_counter() - t0
    total = time.perf_counter() - start
    scores = {}
    for model in ("teacher", "student_mask"):
        table = pd.read_csv(runs / model / "results.csv")
        mean = table[table["fold"].astype(str) == "mean"].iloc[0]
        scores[model] = {"srcc": float(mean["srcc"]), "plcc": float(mean["plcc"])}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    # Training stages scale with the epochs; the rest does not. A shorter run projects to the paper's 100.
    per_run = seconds["synthetic_db"] + seconds["folds"] + seconds["faces"] + seconds["erp_resize"] + seconds["features"]
    projected = per_run + (seconds["teacher"] + seconds["student_mask"]) * 100 / args.epochs
    result = {"machine": machine(torch.device(args.device)), "settings": settings,
              "projected_100_epoch_seconds": projected,
              "seconds": seconds, "total_seconds": total,
              "training_seconds": seconds["teacher"] + seconds["features"] + seconds["student_mask"], "scores": scores}
    report("end_to_end", result, f"{args.epochs} epochs: {total / 60:.1f} min, projected to 100 epochs "
           f"{projected / 60:.1f} min (teacher {seconds['teacher']:.0f} s, student "
           f"{seconds['student_mask']:.0f} s, faces {seconds['faces']:.0f} s); teacher SRCC "
           f"{scores['teacher']['srcc']:.3f}, student {scores['student_mask']['srcc']:.3f} [{args.device}]")


if __name__ == "__main__":
    main()
