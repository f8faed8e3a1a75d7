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

from kdoiqa import pipeline
from kdoiqa.common import UserError, atomic_write_csv
from kdoiqa.pairs import CrossPair, load_pair
from kdoiqa.pipeline import TrainingStage
from kdoiqa.runs import SELECTION_NOTES
from kdoiqa.settings import DataSettings, RuntimeSettings

MATRIX_DIR = Path("runs") / "crossdb_matrix"

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


def _result(run_dir: Path) -> dict:
    table = pd.read_csv(run_dir / "results.csv", dtype={"fold": str})
    row = table[table["fold"] == "0"].iloc[0]
    return {"srcc": float(row["srcc"]), "plcc": float(row["plcc"])}


def run_matrix(matrix: MatrixSettings, training: TrainingStage, features_hint: FeaturesHint | None = None
               ) -> pd.DataFrame:
    """Every ordered pair of the databases through the pipeline: teacher -> features -> student (each training
    made a stage by `training`), then matrix.csv."""
    out = matrix.out
    pairs = [load_pair(a, b, matrix.data_root) for a, b in itertools.permutations(matrix.databases, 2)]
    labels = {}
    for pair in pairs:
        labels.setdefault(pair.train_arg, pair.train.name)
    print(f"cross-database matrix of {', '.join(labels.values())}: {len(pairs)} ordered pairs in {out}", flush=True)
    experiments = {}
    for pair in pairs:
        pair_dir = out / pair.key
        distilled = matrix.kd != "none"  # the baseline needs no teacher
        experiments[pair.key] = pipeline.Experiment(
            f"[{pair.key}]", {"database_train": pair.train_arg, "database_test": pair.test_arg},
            pair_dir / "teacher" if distilled else None, pair_dir / "features" if distilled else None,
            {matrix.kd: pair_dir / "student"})
    pair_of = {experiments[pair.key].tag: pair for pair in pairs}

    def features(experiment: pipeline.Experiment, label: str) -> pipeline.Stage:
        pair = pair_of[experiment.tag]
        hint = features_hint(pair, experiment.features) if features_hint is not None else None
        return pipeline.features_stage(experiment, label, matrix.data_root, matrix.data, matrix.runtime, hint)

    pipeline.execute([stage for experiment in experiments.values()
                      for stage in pipeline.experiment_stages(experiment, {}, training, features)])
    rows = []
    for pair in pairs:
        experiment = experiments[pair.key]
        record = {"train": pair.train.name, "test": pair.test.name, "sign_flipped": pair.flipped}
        if experiment.teacher is not None:
            record.update({f"teacher_{k}": v for k, v in _result(experiment.teacher).items()})
        record.update(_result(experiment.students[matrix.kd]))
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
