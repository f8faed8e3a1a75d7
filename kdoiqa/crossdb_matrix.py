"""The cross-database matrix: every ordered pair of databases through teacher, features and student,
resuming finished work, written to <out>/matrix.csv (rows = trained on, columns = tested on).

    python crossdb_train.py --matrix CVIQ,OIQA,IQA-ODI        # runs/crossdb_matrix/
"""
from __future__ import annotations

import itertools
import shlex
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from kdoiqa import cli, stages
from kdoiqa.common import INTERRUPT_HINT, UserError, atomic_write_csv
from kdoiqa.pairs import CrossPair, load_pair
from kdoiqa.runs import SELECTION_NOTES
from kdoiqa.teacher_features import CROSS_FILE

MATRIX_DIR = Path("runs") / "crossdb_matrix"
# Flags of the matrix invocation that do not pass on to its stages (the matrix sets them per pair).
NOT_PASSED = frozenset({"matrix", "out", "resume", "database", "database_train", "database_test", "features_dir",
                        "folds_file", "fold"})


def _train_stage(name: str, script: str, pair: CrossPair, run_dir: Path, passed: dict[str, Any],
                 extra: dict[str, Any]) -> None:
    build, cross = stages.TRAINERS[script]
    argv = ["--database-train", pair.train_arg, "--database-test", pair.test_arg,
            *cli.to_argv(build(cross=cross), {**passed, **extra})]
    stages.run_training(script, argv, run_dir, f"[{pair.key}] {name}")


def _features_stage(pair: CrossPair, teacher_dir: Path, features_dir: Path, args: Any) -> None:
    if stages.features_up_to_date(teacher_dir, features_dir, args.data_root, pair=(pair.train_arg, pair.test_arg)):
        print(f"[{pair.key}] features: done, skipped ({features_dir / CROSS_FILE})", flush=True)
        return
    print(f"[{pair.key}] features: writing {features_dir / CROSS_FILE}", flush=True)
    stages.save_crossdb_features(pair.train_arg, pair.test_arg, args.data_root, str(teacher_dir), str(features_dir),
                                 data=cli.data_settings(args), runtime=cli.inference_runtime(args))


def _result(run_dir: Path) -> dict:
    table = pd.read_csv(run_dir / "results.csv", dtype={"fold": str})
    row = table[table["fold"] == "0"].iloc[0]
    return {"srcc": float(row["srcc"]), "plcc": float(row["plcc"])}


def run_matrix(args: Any, explicit: frozenset[str]) -> pd.DataFrame:
    """Every ordered pair of `--matrix A,B,...`: teacher -> features -> student, then matrix.csv."""
    names = [n.strip() for n in args.matrix.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"--matrix needs at least two databases separated by commas, got {args.matrix!r}")
    if len(set(names)) != len(names):
        raise UserError(f"--matrix names a database twice: {args.matrix!r}")
    for flag in ("database_train", "database_test", "database", "folds_file", "features_dir"):
        if flag in explicit:
            raise UserError(f"--{flag.replace('_', '-')} does not go with --matrix (the matrix picks every pair "
                            f"and keeps its features under --out)")
    if args.fold not in (None, 0):
        raise UserError(f"--fold {args.fold}: a cross-database run has a single split")
    if args.resume:
        raise UserError("--matrix always resumes what is done; drop --resume")
    cli.training_settings("crossdb_train", args, explicit)  # every stage's flags checked before any work
    INTERRUPT_HINT.insert(0, shlex.join(["python", "crossdb_train.py", *sys.argv[1:]]))
    out = Path(args.out) if args.out else MATRIX_DIR
    pairs = [load_pair(a, b, args.data_root) for a, b in itertools.permutations(names, 2)]
    labels = {}
    for pair in pairs:
        labels.setdefault(pair.train_arg, pair.train.name)
    print(f"cross-database matrix of {', '.join(labels.values())}: {len(pairs)} ordered pairs in {out}", flush=True)
    passed = {dest: getattr(args, dest) for dest in explicit - NOT_PASSED}
    rows = []
    for pair in pairs:
        pair_dir = out / pair.key
        record = {"train": pair.train.name, "test": pair.test.name, "sign_flipped": pair.flipped}
        if args.kd != "none":
            _train_stage("teacher", stages.CROSS_TEACHER, pair, pair_dir / "teacher", passed, {})
            _features_stage(pair, pair_dir / "teacher", pair_dir / "features", args)
            record.update({f"teacher_{k}": v for k, v in _result(pair_dir / "teacher").items()})
        _train_stage("student", "crossdb_train", pair, pair_dir / "student", passed,
                     {"features_dir": str(pair_dir / "features")} if args.kd != "none" else {})
        record.update(_result(pair_dir / "student"))
        rows.append(record)
    return write_matrix(out, pd.DataFrame(rows), list(labels.values()), args)


def write_matrix(out: Path, long: pd.DataFrame, order: list[str], args: Any) -> pd.DataFrame:
    metric_names = ["srcc", "plcc"] + (["teacher_srcc", "teacher_plcc"] if "teacher_srcc" in long else [])
    blocks = []
    for metric in metric_names:
        grid = long.pivot(index="train", columns="test", values=metric).reindex(index=order, columns=order)
        grid.insert(0, "metric", metric)
        blocks.append(grid.reset_index().rename(columns={"index": "train"}))
    matrix = pd.concat(blocks, ignore_index=True)[["metric", "train", *order]]
    atomic_write_csv(out / "matrix.csv", matrix)
    atomic_write_csv(out / "pairs.csv", long)
    select = args.select or ("test" if args.protocol == "paper" else "last")
    print(f"\ncross-database matrix, student --kd {args.kd}, protocol {args.protocol} ({SELECTION_NOTES[select]}); "
          f"rows = trained on, columns = tested on")
    for metric in metric_names:
        block = matrix[matrix["metric"] == metric].drop(columns="metric").set_index("train")
        print(f"\n{metric.upper()}")
        print(block.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))
    flipped = long[long["sign_flipped"]]
    if len(flipped):
        print("\nscores flipped (DMOS vs MOS) for: " + ", ".join(f"{r.train} -> {r.test}" for r in flipped.itertuples()))
    print(f"matrix: {out / 'matrix.csv'}", flush=True)
    return matrix
