"""The cross-database matrix: every ordered pair of databases through teacher, features and student,
resuming finished work, written to <out>/matrix.csv (rows = trained on, columns = tested on).

    python crossdb_train.py --matrix CVIQ,OIQA,IQA-ODI        # runs/crossdb_matrix/
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kdoiqa import stages
from kdoiqa.common import UserError, atomic_write_csv
from kdoiqa.pairs import CrossPair, load_pair
from kdoiqa.runs import SELECTION_NOTES
from kdoiqa.settings import DataSettings, RuntimeSettings
from kdoiqa.teacher_features import CROSS_FILE

MATRIX_DIR = Path("runs") / "crossdb_matrix"

# One training of the matrix in its folder, resumed or skipped when done: (script, pair, run folder, label,
# the student's features folder or None) -> the state found (see kdoiqa.cli.run_training).
TrainStep = Callable[[str, CrossPair, Path, str, "Path | None"], str]
# The `next:` line after a pair's features (pair, features folder) -> a function of the teacher's record.
FeaturesHint = Callable[[CrossPair, Path], Callable[[dict], str]]


@dataclass(frozen=True)
class MatrixSettings:
    """The matrix: its databases (at least two), where it writes, and what the student and its features use."""

    databases: tuple[str, ...]
    out: Path
    data_root: str | None
    kd: str                     # the student's --kd
    protocol: str
    select: str | None          # None: the protocol's
    data: DataSettings          # of the feature extraction
    runtime: RuntimeSettings    # of the feature extraction

    def __post_init__(self) -> None:
        if len(self.databases) < 2:
            raise UserError(f"the matrix needs at least two databases, got {', '.join(self.databases) or 'none'}")
        if len(set(self.databases)) != len(self.databases):
            raise UserError(f"the matrix names a database twice: {', '.join(self.databases)}")


def _features_stage(pair: CrossPair, teacher_dir: Path, features_dir: Path, matrix: MatrixSettings,
                    hint: FeaturesHint | None) -> None:
    if stages.features_up_to_date(teacher_dir, features_dir, matrix.data_root, pair=(pair.train_arg, pair.test_arg)):
        print(f"[{pair.key}] features: done, skipped ({features_dir / CROSS_FILE})", flush=True)
        return
    print(f"[{pair.key}] features: writing {features_dir / CROSS_FILE}", flush=True)
    stages.save_crossdb_features(pair.train_arg, pair.test_arg, matrix.data_root, str(teacher_dir), str(features_dir),
                                 data=matrix.data, runtime=matrix.runtime,
                                 hint=hint(pair, features_dir) if hint is not None else None)


def _result(run_dir: Path) -> dict:
    table = pd.read_csv(run_dir / "results.csv", dtype={"fold": str})
    row = table[table["fold"] == "0"].iloc[0]
    return {"srcc": float(row["srcc"]), "plcc": float(row["plcc"])}


def run_matrix(matrix: MatrixSettings, train: TrainStep, features_hint: FeaturesHint | None = None) -> pd.DataFrame:
    """Every ordered pair of the databases: teacher -> features -> student (each training through `train`), then
    matrix.csv."""
    out = matrix.out
    pairs = [load_pair(a, b, matrix.data_root) for a, b in itertools.permutations(matrix.databases, 2)]
    labels = {}
    for pair in pairs:
        labels.setdefault(pair.train_arg, pair.train.name)
    print(f"cross-database matrix of {', '.join(labels.values())}: {len(pairs)} ordered pairs in {out}", flush=True)
    rows = []
    for pair in pairs:
        pair_dir = out / pair.key
        record = {"train": pair.train.name, "test": pair.test.name, "sign_flipped": pair.flipped}
        if matrix.kd != "none":
            train(stages.CROSS_TEACHER, pair, pair_dir / "teacher", f"[{pair.key}] teacher", None)
            _features_stage(pair, pair_dir / "teacher", pair_dir / "features", matrix, features_hint)
            record.update({f"teacher_{k}": v for k, v in _result(pair_dir / "teacher").items()})
        train("crossdb_train", pair, pair_dir / "student", f"[{pair.key}] student",
              pair_dir / "features" if matrix.kd != "none" else None)
        record.update(_result(pair_dir / "student"))
        rows.append(record)
    return write_matrix(out, pd.DataFrame(rows), list(labels.values()), matrix)


def write_matrix(out: Path, long: pd.DataFrame, order: list[str], settings: MatrixSettings) -> pd.DataFrame:
    metric_names = ["srcc", "plcc"] + (["teacher_srcc", "teacher_plcc"] if "teacher_srcc" in long else [])
    blocks = []
    for metric in metric_names:
        grid = long.pivot(index="train", columns="test", values=metric).reindex(index=order, columns=order)
        grid.insert(0, "metric", metric)
        blocks.append(grid.reset_index().rename(columns={"index": "train"}))
    matrix = pd.concat(blocks, ignore_index=True)[["metric", "train", *order]]
    atomic_write_csv(out / "matrix.csv", matrix)
    atomic_write_csv(out / "pairs.csv", long)
    select = settings.select or ("test" if settings.protocol == "paper" else "last")
    print(f"\ncross-database matrix, student --kd {settings.kd}, protocol {settings.protocol} ({SELECTION_NOTES[select]}); "
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
