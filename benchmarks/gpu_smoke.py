"""Every script and every device option once, at tiny sizes (a smoke run, not a test).

On two small synthetic databases: cube faces, resized ERPs, the teacher, its features, the student
with mask KD and without, the cross-database trio, predict.py; then the options that only matter on a
GPU: --amp fp16 (mask KD under loss scaling), --deterministic, --protocol paper (BatchNorm
per face, JPEG-75 faces projected on the device, --select test, fp32), --cache cpu / none, Ctrl-C then
--resume, --device cuda:0; under torchrun with 2 processes, reproduce.py on one database and a
--parallel batch run whose last batch leaves one process a stand-in row (with --sync-bn on CUDA);
tests/test_viewport_cuda.py; and, as its own part, --compile of one graph (the slowest). A step that needs CUDA says
"skipped: needs CUDA" on a CPU run. Each step's outcome is appended to $OUT/smoke.jsonl as it ends
(a killed run keeps the steps before it); the total goes to $OUT/results.jsonl.

    python benchmarks/gpu_smoke.py --work scratch/smoke                     # cuda
    python benchmarks/gpu_smoke.py --work scratch/smoke --device cpu        # the same steps on the CPU
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
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
import teacher_crossdb_train
import teacher_train


class Smoke:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.results: list[dict] = []

    def step(self, name: str, fn: Callable, argv: list[str] | None = None, *, needs_cuda: bool = False) -> bool:
        """Run `fn(argv)` (or `fn()`), capturing its output; record ok / FAILED / skipped, seconds, the tail."""
        if needs_cuda and not self.cuda:
            self._record({"step": name, "status": "skipped: needs CUDA", "seconds": 0.0})
            return True
        out = io.StringIO()
        start = time.perf_counter()
        try:
            with redirect_stdout(out), redirect_stderr(out):
                code = fn(argv) if argv is not None else fn()
            ok = code in (None, 0)
        except SystemExit as stop:
            ok = stop.code in (None, 0)
        except Exception:  # noqa: BLE001 - a smoke run reports every failure and goes on
            out.write(traceback.format_exc())
            ok = False
        record = {"step": name, "status": "ok" if ok else "FAILED", "seconds": round(time.perf_counter() - start, 2)}
        if not ok:
            record["tail"] = out.getvalue()[-2000:]
        self._record(record)
        return ok

    def _record(self, record: dict) -> None:
        self.results.append(record)
        print(f"{record['status']:<20} {record['seconds']:7.1f} s  {record['step']}", flush=True)
        if "tail" in record:
            print(record["tail"], flush=True)
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            with open(Path(out) / "smoke.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def launch(argv: list[str]) -> None:
    """A torchrun launch of 2 processes from the repository; its stderr in the error when it fails."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"exit code {proc.returncode}: {proc.stderr[-1500:]}")


def interrupt_then_resume(argv: list[str], run: Path) -> None:
    """Ctrl-C a training after its first epoch (exit 130, the state saved), then --resume it to the end."""
    proc = subprocess.Popen([sys.executable, "teacher_train.py", *argv, "--out", str(run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "fold0" / "log.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    saved = (run / "fold0" / "resume.pt").is_file()
    if proc.returncode != 130 or not saved:
        raise RuntimeError(f"Ctrl-C: exit {proc.returncode}, resume.pt {'written' if saved else 'missing'}: {err[-800:]}")
    teacher_train.main(["--resume", "--out", str(run)])
    if not (run / "fold0" / "checkpoint.pt").is_file():
        raise RuntimeError("the resumed run did not finish")


def stand_in_batch(folds_file: Path) -> tuple[int, int]:
    """(fold, batch size) whose last batch of training images holds one image: under 2 processes one of
    them then takes a stand-in row (weight 0)."""
    folds = json.loads(folds_file.read_text())["folds"]
    return next(((k, bs) for bs in range(4, 64) for k, fold in enumerate(folds) if len(fold["train"]) % bs == 1),
                (0, 2 if len(folds[0]["train"]) % 2 else 4))


def even_batch(folds_file: Path, fold: int) -> int:
    """A batch size (4 to 16) that divides the fold's training images: every step has one shape."""
    train = len(json.loads(folds_file.read_text())["folds"][fold]["train"])
    return next((bs for bs in range(16, 3, -1) if train % bs == 0), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (its runs are emptied first)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--part", choices=("all", "main", "compile"), default="all",
                   help="main: every step but --compile; compile: only that one (it compiles for tens of seconds)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    smoke = Smoke(cuda)
    a, b, w = args.work / "A", args.work / "B", args.work / "runs"
    if args.part == "compile":
        w = args.work / "runs_compile"
    shutil.rmtree(w, ignore_errors=True)
    for db, seed in ((a, 0), (b, 1)):
        if not (db / "meta.csv").is_file():  # run_gpu.sh makes them before the timed steps
            smoke.step(f"make_synthetic_db {db.name}", make_synthetic_db.main,
                       ["--out", str(db), "--contents", "5", "--size", "256x128", "--seed", str(seed), "--workers", "4"])
    dev = ["--device", args.device]
    small = ["--no-pretrained", "--face-size", "32", "--erp-size", "64x32", "--no-progress", "--workers", "2", *dev]
    pair = ["--database-train", str(a), "--database-test", str(b)]
    kd = ["--kd-warmup", "0", "--kd-feature-epochs", "1"]
    teacher = ["--database", str(a), "--folds", "2", *small]
    student = ["--database", str(a), "--folds", "2", "--features-dir", str(w / "features"), *kd, *small]
    folds_file = a / "folds" / "k2_seed2023.json"
    if args.part == "compile":
        # One compiled graph: a student without distillation (no teacher, no features, one phase), one
        # epoch whose batches all have one size (a partial last batch would compile a second graph).
        batch = even_batch(folds_file, 0) if folds_file.is_file() else 4
        smoke.step(f"mask_train --compile (one graph: --kd none, batch {batch})", mask_train.main,
                   ["--database", str(a), "--folds", "2", "--kd", "none", "--fold", "0", "--epochs", "1",
                    "--batch-size", str(batch), "--compile", "--out", str(w / "compiled"), *small], needs_cuda=True)
        finish(smoke, args, "compile")
        return

    # The scripts, under --amp auto (bf16 on a GPU that computes it natively).
    steps = [
        ("img_resize --faces", img_resize.main, ["--faces", "--database", str(a), "--face-size", "32", "--device",
                                                 args.device, "--no-progress", "--force"]),
        ("img_resize", img_resize.main, ["--database", str(a), "--erp-size", "64x32", "--no-progress", "--force"]),
        ("teacher_train (--save-minutes 0)", teacher_train.main, [*teacher, "--epochs", "2", "--save-minutes", "0",
                                                                  "--out", str(w / "teacher")]),
        ("feat_save", feat_save.main, ["--database", str(a), "--run", str(w / "teacher"), "--features-dir",
                                       str(w / "features"), *dev, "--no-progress"]),
        ("mask_train --kd mask", mask_train.main, [*student, "--epochs", "2", "--out", str(w / "student_mask")]),
        ("mask_train --kd none", mask_train.main, ["--database", str(a), "--folds", "2", "--kd", "none", "--epochs", "2",
                                                   "--out", str(w / "student_none"), *small]),
        ("teacher_crossdb_train", teacher_crossdb_train.main, [*pair, "--epochs", "1", "--out", str(w / "xteacher"),
                                                               *small]),
        ("crossdb_feat", crossdb_feat.main, [*pair, "--run", str(w / "xteacher"), "--features-dir", str(w / "xfeatures"),
                                             *dev, "--no-progress"]),
        ("crossdb_train", crossdb_train.main, [*pair, "--features-dir", str(w / "xfeatures"), "--epochs", "2", *kd,
                                               "--out", str(w / "xstudent"), *small]),
        ("predict (run folder, every fold)", predict.main, [str(w / "student_mask"), str(b / "images"), "--csv",
                                                            str(w / "scores.csv"), *dev, "--no-progress"]),
        ("predict (teacher fold)", predict.main, [str(w / "teacher" / "fold0"), str(b / "images"), *dev,
                                                  "--no-progress"]),
    ]
    for name, fn, argv in steps:
        smoke.step(name, fn, argv)

    # The options.
    smoke.step("mask_train --amp fp16 (mask KD under loss scaling)", mask_train.main,
               [*student, "--fold", "0", "--epochs", "2", "--amp", "fp16", "--out", str(w / "fp16")], needs_cuda=True)
    # fp32 (--amp none) is the paper protocol's precision: its step below runs it.
    smoke.step("teacher_train --deterministic", teacher_train.main,
               [*teacher, "--fold", "0", "--epochs", "1", "--deterministic", "--out", str(w / "det_teacher")])
    smoke.step("mask_train --deterministic (mask phase)", mask_train.main,
               [*student, "--fold", "0", "--epochs", "2", "--deterministic", "--out", str(w / "det_student")])
    smoke.step("teacher_train --protocol paper (per-face BN, JPEG-75 faces on the device, --select test)",
               teacher_train.main, [*teacher, "--fold", "0", "--epochs", "2", "--protocol", "paper", "--faces", "online",
                                    "--out", str(w / "paper")])
    for cache in ("cpu", "none"):
        smoke.step(f"mask_train --cache {cache}", mask_train.main,
                   [*student, "--fold", "0", "--epochs", "2", "--cache", cache, "--out", str(w / f"cache_{cache}")])
    smoke.step("teacher_train Ctrl-C, then --resume", lambda: interrupt_then_resume(
        [*teacher, "--fold", "0", "--epochs", "4"], w / "resumed"))
    smoke.step("teacher_train --device cuda:0", teacher_train.main,
               [*teacher, "--fold", "0", "--epochs", "1", "--device", "cuda:0", "--out", str(w / "cuda0")], needs_cuda=True)
    # Two torchrun launches (each starts 2 processes): reproduce.py on one database (the cross-database
    # pair under torchrun, a one-split fold set, is tests/test_ddp.py's), and a --parallel batch mask-KD
    # run whose last batch leaves a process a stand-in row (with --sync-bn on CUDA).
    smoke.step("torchrun reproduce.py (ours, one database)", launch,
               ["reproduce.py", "--databases", str(a), "--protocols", "ours", "--no-cross", "--out",
                str(w / "reproduction"), "--epochs", "1", "--folds", "2", "--kd-warmup", "0", "--kd-feature-epochs", "0",
                *small])
    fold, batch = stand_in_batch(folds_file) if folds_file.is_file() else (0, 4)
    sync_bn = ["--sync-bn"] if cuda else []
    smoke.step(f"torchrun --parallel batch{' --sync-bn' if cuda else ''}, last batch of one image (fold {fold}, "
               f"batch {batch})", launch,
               ["mask_train.py", *student, "--fold", str(fold), "--epochs", "2", "--batch-size", str(batch),
                "--parallel", "batch", *sync_bn, "--out", str(w / "batch_parallel")])
    smoke.step("tests/test_viewport_cuda.py", lambda: subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_viewport_cuda.py"], cwd=REPO,
        check=True, capture_output=True), needs_cuda=True)
    if args.part == "all":
        smoke.step("mask_train --compile", mask_train.main,
                   [*student, "--fold", "0", "--epochs", "2", "--compile", "--out", str(w / "compiled")], needs_cuda=True)
    finish(smoke, args, "smoke")


def finish(smoke: Smoke, args: argparse.Namespace, name: str) -> None:
    failed = [r["step"] for r in smoke.results if r["status"] == "FAILED"]
    skipped = sum(r["status"].startswith("skipped") for r in smoke.results)
    ok = len(smoke.results) - len(failed) - skipped
    report(name, {"machine": machine(torch.device(args.device)), "steps": smoke.results},
           f"{ok} ok, {skipped} skipped (need CUDA), {len(failed)} failed of {len(smoke.results)} steps"
           + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
