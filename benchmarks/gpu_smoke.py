"""Every script once on the device, at tiny sizes, under bf16 and fp32 (a smoke run, not a test).

Two small synthetic databases; then per precision: cube faces, resized ERPs, the 5-fold teacher,
its features, the student with mask KD and without, the cross-database trio, predict.py over a
folder, reproduce.py (one protocol, no cross pairs), and `--parallel folds` with 2 processes on the
one GPU. Each step's outcome and seconds go to $OUT/smoke.json; a failing step does not stop the rest.

    python benchmarks/gpu_smoke.py --work scratch/smoke            # cuda
    python benchmarks/gpu_smoke.py --work scratch/smoke --device cpu --precisions none
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from bench_utils import REPO, machine, report

import crossdb_feat
import crossdb_train
import feat_save
import img_resize
import make_synthetic_db
import mask_train
import predict
import reproduce
import teacher_crossdb_train
import teacher_train
from viewport import extract


def step(results: list[dict], name: str, fn, argv: list[str]) -> None:
    """Run `fn(argv)`, capturing its output; record ok/failed, seconds and the last lines on failure."""
    out = io.StringIO()
    start = time.perf_counter()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            code = fn(argv)
        ok = code in (None, 0)
    except SystemExit as stop:
        ok = stop.code in (None, 0)
    except Exception:  # noqa: BLE001 - a smoke run reports every failure and goes on
        out.write(traceback.format_exc())
        ok = False
    seconds = time.perf_counter() - start
    results.append({"step": name, "ok": ok, "seconds": round(seconds, 2),
                    **({} if ok else {"tail": out.getvalue()[-1500:]})})
    print(f"{'ok    ' if ok else 'FAILED'} {seconds:7.1f} s  {name}", flush=True)
    if not ok:
        print(out.getvalue()[-1500:], flush=True)


def launch(argv: list[str]) -> None:
    """A torchrun launch from the repository; its stderr in the error when it fails."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *argv], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"exit code {proc.returncode}: {proc.stderr[-1200:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precisions", default="bf16,none", help="--amp values to run every step under")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    a, b = args.work / "A", args.work / "B"
    results: list[dict] = []
    for db, seed in ((a, 0), (b, 1)):
        step(results, f"make_synthetic_db {db.name}", make_synthetic_db.main,
             ["--out", str(db), "--contents", "5", "--size", "256x128", "--seed", str(seed), "--workers", "4"])
    dev = ["--device", args.device]
    small = ["--no-pretrained", "--face-size", "32", "--erp-size", "64x32", "--no-progress", "--workers", "2", *dev]
    pair = ["--database-train", str(a), "--database-test", str(b)]
    kd = ["--kd-warmup", "0", "--kd-feature-epochs", "1"]
    for amp in args.precisions.split(","):
        w, prec = args.work / amp, ["--amp", amp]
        steps = [
            ("viewport.extract", extract.main, ["--database", str(a), "--face-size", "32", *dev, "--no-progress", "--force"]),
            ("img_resize", img_resize.main, ["--database", str(a), "--erp-size", "64x32", "--no-progress", "--force"]),
            ("teacher_train", teacher_train.main, ["--database", str(a), "--epochs", "2", "--out", str(w / "teacher"),
                                                   *small, *prec]),
            ("feat_save", feat_save.main, ["--database", str(a), "--run", str(w / "teacher"), "--features-dir",
                                           str(w / "features"), *dev, "--no-progress", *prec]),
            ("mask_train --kd mask", mask_train.main, ["--database", str(a), "--features-dir", str(w / "features"),
                                                       "--epochs", "2", *kd, "--out", str(w / "student_mask"), *small, *prec]),
            ("mask_train --kd none", mask_train.main, ["--database", str(a), "--kd", "none", "--epochs", "2",
                                                       "--out", str(w / "student_none"), *small, *prec]),
            ("teacher_crossdb_train", teacher_crossdb_train.main, [*pair, "--epochs", "1", "--out", str(w / "xteacher"),
                                                                   *small, *prec]),
            ("crossdb_feat", crossdb_feat.main, [*pair, "--run", str(w / "xteacher"), "--features-dir",
                                                 str(w / "xfeatures"), *dev, "--no-progress", *prec]),
            ("crossdb_train", crossdb_train.main, [*pair, "--features-dir", str(w / "xfeatures"), "--epochs", "2", *kd,
                                                   "--out", str(w / "xstudent"), *small, *prec]),
            ("predict (run folder, every fold)", predict.main, [str(w / "student_mask"), str(b / "images"), "--csv",
                                                                str(w / "scores.csv"), *dev, "--no-progress", *prec]),
            ("predict (teacher)", predict.main, [str(w / "teacher" / "fold0"), str(b / "images"), *dev, "--no-progress",
                                                 *prec]),
            ("reproduce (ours, one database)", reproduce.main, ["--databases", str(a), "--protocols", "ours", "--no-cross",
                                                                "--out", str(w / "reproduction"), "--epochs", "1",
                                                                "--kd-warmup", "0", "--kd-feature-epochs", "0", *small,
                                                                *prec]),
            ("torchrun --parallel folds, 2 processes on one device", launch,
             ["--nproc_per_node=2", "teacher_train.py", "--database", str(a), "--epochs", "1", "--parallel", "folds",
              "--out", str(w / "folds_parallel"), *small, *prec]),
            ("torchrun --parallel batch, 2 processes", launch,
             ["--nproc_per_node=2", "mask_train.py", "--database", str(a), "--features-dir", str(w / "features"),
              "--fold", "0", "--epochs", "2", *kd, "--parallel", "batch", "--out", str(w / "batch_parallel"), *small,
              *prec]),
        ]
        if args.device.startswith("cuda"):  # SyncBatchNorm runs on GPUs only
            steps.append(("torchrun --parallel batch --sync-bn, 2 processes", launch,
                          ["--nproc_per_node=2", "mask_train.py", "--database", str(a), "--kd", "none", "--fold", "0",
                           "--epochs", "1", "--parallel", "batch", "--sync-bn", "--out", str(w / "sync_bn"), *small,
                           *prec]))
        for name, fn, argv in steps:
            step(results, f"[{amp}] {name}", fn, argv)
    failed = [r["step"] for r in results if not r["ok"]]
    report("smoke", {"machine": machine(torch.device(args.device)), "steps": results},
           f"{len(results) - len(failed)} of {len(results)} steps ok" + (f"; FAILED: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
