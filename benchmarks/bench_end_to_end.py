"""The paper's whole within-database protocol end to end, timed per stage (not a test).

OIQA-sized by default: a synthetic database of 16 contents x (reference + 20 distorted) from
4096x2048 procedural sources; cube faces (256, antialiased, on the device); ERP resized to
1024x512; 5-fold teacher (batch 6); features; 5-fold student with mask distillation. `--parallel-folds
N` runs the two trainings under torchrun with N processes sharing the device (whole folds each).
A run of fewer than 100 epochs is projected to 100 (the training stages scale with the epochs).
`--reuse` keeps a database made by an earlier call. Which protocol: `--protocol` (default ours).

    python benchmarks/bench_end_to_end.py --work scratch/e2e                          # 100 epochs
    python benchmarks/bench_end_to_end.py --work scratch/e2e --epochs 5 --reuse --parallel-folds 5
    python benchmarks/bench_end_to_end.py --work scratch/e2e --size 512x256 --epochs 2 --face-size 64 \\
        --erp-size 128x64 --contents 5 --device cpu                                 # CPU smoke run
"""
from __future__ import annotations

import argparse
import shutil
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
    p.add_argument("--protocol", choices=("ours", "paper"), default="ours")
    p.add_argument("--parallel-folds", type=int, default=1, help="torchrun processes training whole folds")
    p.add_argument("--reuse", action="store_true", help="keep the database (and its faces) of an earlier call")
    p.add_argument("--database", type=Path, default=None, help="the database folder (default <work>/SyntheticOIQA)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to both training scripts")
    args = p.parse_args()
    db = args.database or args.work / "SyntheticOIQA"
    tag = f"{args.protocol}-p{args.parallel_folds}-e{args.epochs}"
    runs, feats = args.work / "runs" / tag, args.work / "features" / tag
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(feats, ignore_errors=True)
    common = ["--device", args.device, "--workers", str(args.workers), "--no-progress", "--no-pretrained",
              "--face-size", str(args.face_size), "--erp-size", args.erp_size, "--epochs", str(args.epochs),
              "--protocol", args.protocol, *args.extra]
    train = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.parallel_folds}"]
             if args.parallel_folds > 1 else [sys.executable])
    parallel = ["--parallel", "folds"] if args.parallel_folds > 1 else []
    # The paper's 5 + 5 phase epochs, scaled with a shorter run (0 + 0 below 10 epochs: all in the mask phase,
    # the most expensive one, so the projection errs long).
    phase = round(5 * args.epochs / 100)
    stages = []
    if not (args.reuse and (db / "meta.csv").is_file()):
        stages.append(("synthetic_db", [sys.executable, "make_synthetic_db.py", "--out", str(db), "--contents",
                                        str(args.contents), "--size", args.size, "--workers", str(args.workers),
                                        "--overwrite"]))
    stages += [
        ("faces", [sys.executable, "img_resize.py", "--faces", "--database", str(db), "--face-size", str(args.face_size),
                   "--protocol", args.protocol, "--device", args.device, "--threads", str(args.workers)]),
        ("erp_resize", [sys.executable, "img_resize.py", "--database", str(db), "--erp-size", args.erp_size,
                        "--threads", str(args.workers)]),
        ("teacher", [*train, "teacher_train.py", "--database", str(db), "--out", str(runs / "teacher"), *common,
                     *parallel]),
        ("features", [sys.executable, "feat_save.py", "--database", str(db), "--run", str(runs / "teacher"),
                      "--features-dir", str(feats), "--device", args.device, "--workers", str(args.workers),
                      "--no-progress"]),
        ("student_mask", [*train, "mask_train.py", "--database", str(db), "--features-dir", str(feats), "--kd", "mask",
                          "--kd-warmup", str(phase), "--kd-feature-epochs", str(phase), "--out", str(runs / "student_mask"),
                          *common, *parallel]),
    ]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name, argv in stages:
        t0 = time.perf_counter()
        print(f"== {name}: {' '.join(argv)}", flush=True)
        result = subprocess.run(argv, cwd=REPO)
        if result.returncode:
            sys.exit(f"stage {name} failed with exit code {result.returncode}")
        seconds[name] = time.perf_counter() - t0
    total = time.perf_counter() - start
    scores = {}
    for model in ("teacher", "student_mask"):
        table = pd.read_csv(runs / model / "results.csv")
        mean = table[table["fold"].astype(str) == "mean"].iloc[0]
        scores[model] = {"srcc": float(mean["srcc"]), "plcc": float(mean["plcc"])}
    # The protocol proper (what the paper's code runs): faces, resize, teacher, features, student.
    fixed = sum(seconds.get(k, 0.0) for k in ("faces", "erp_resize", "features"))
    trained = seconds["teacher"] + seconds["student_mask"]
    protocol_seconds = fixed + trained
    projected = fixed + trained * 100 / args.epochs
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"machine": machine(torch.device(args.device)), "settings": settings, "seconds": seconds,
              "protocol_seconds": protocol_seconds, "projected_100_epoch_seconds": projected,
              "total_seconds": total, "scores": scores}
    report(f"end_to_end_{tag}", result,
           f"protocol {args.protocol}, {args.parallel_folds} process(es), {args.epochs} epochs: "
           f"{protocol_seconds / 60:.1f} min, projected to 100 epochs {projected / 60:.1f} min (teacher "
           f"{seconds['teacher']:.0f} s, student {seconds['student_mask']:.0f} s, faces {seconds['faces']:.0f} s); "
           f"teacher SRCC {scores['teacher']['srcc']:.3f}, student {scores['student_mask']['srcc']:.3f} [{args.device}]")


if __name__ == "__main__":
    main()
