"""Cross-database ERP student: trained on all of database A, tested on all of database B.

The student of mask_train.py (`--kd mask|feature|none`, the same loss schedule) on the paper's
cross-database protocol (50 epochs by default), distilled from the features of the teacher that
was trained on A (crossdb_feat.py). Tested on the database given by --database-test (the
paper's script tested CVIQ -> OIQA whatever its arguments said). When one database is a DMOS
the correlations on B are taken against its negated score and the output says so.

    python crossdb_train.py --database-train CVIQ --database-test OIQA                 # mask KD
    python crossdb_train.py --database_train CVIQ --database_test OIQA --kd none       # baseline

The whole matrix (every ordered pair: teacher -> features -> student), resuming finished work,
written to <out>/matrix.csv (default runs/crossdb_matrix; rows = train, columns = test):

    python crossdb_train.py --matrix CVIQ,OIQA,IQA-ODI
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import pandas as pd

import crossdb_feat
import engine
import teacher_crossdb_train
from common import (
    UserError,
    atomic_write_csv,
    load_checkpoint,
    run_cli,
    training_parser,
)
from dataset_cross import (
    CrossPair,
    cross_parser,
    load_pair,
    pair_from_args,
    start_cross_run,
)
from mask_train import StudentMethod, kd_parser, student_from_args
from teacher_features import load_features

SCRIPT = "crossdb_train"
MATRIX_DIR = Path("runs") / "crossdb_matrix"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[training_parser(epochs=50), kd_parser(),
                                                                   cross_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", default=None, metavar="A,B,C",
                        help="run every ordered pair of these databases through teacher, features and student "
                             "(skipping finished stages) and write <out>/matrix.csv; --out defaults to "
                             f"{MATRIX_DIR}")
    return parser


def check_kd_args(args: argparse.Namespace) -> None:
    if args.kd_warmup < 0 or args.kd_feature_epochs < 0:
        raise UserError("--kd-warmup and --kd-feature-epochs must be 0 or more")


def train(args: argparse.Namespace) -> list:
    """Train and test one pair from parsed arguments."""
    check_kd_args(args)
    pair = pair_from_args(args)
    features = None
    if args.kd != "none":
        # Checked before the run folder exists: a refusal leaves nothing behind.
        features_dir = args.features or crossdb_feat.default_features_dir(pair)
        rebuild = crossdb_feat.rebuild_command(pair, f"runs/{teacher_crossdb_train.SCRIPT}/{pair.key}/<run>",
                                               args.features)
        features = load_features(crossdb_feat.feature_path(features_dir), pair.train, fold=None,
                                 test_images=pair.test.images, rebuild_hint=rebuild)
    run = start_cross_run(SCRIPT, args, pair)
    return engine.train_folds(run, lambda fold, split: StudentMethod(student_from_args(args), args),
                              features_for_fold=(lambda fold: features) if features is not None else None)


# ----------------------------------------------------------------------------------------------
# The matrix: every ordered pair through the three stages, resuming what is done.

def _stage_args(parser: argparse.ArgumentParser, source: argparse.Namespace, skip: set[str], **fixed) -> argparse.Namespace:
    """The stage script's own defaults, overridden by the matrix invocation's values of its flags."""
    required = [f"--{k.replace('_', '-')}={v}" for k, v in fixed.items() if k in ("run",)]
    ns = parser.parse_args(required)
    for key in vars(ns):
        if key in fixed:
            setattr(ns, key, fixed[key])
        elif key not in skip and hasattr(source, key):
            setattr(ns, key, getattr(source, key))
    return ns


def _training_state(run_dir: Path, epochs: int) -> str:
    """'done' (final checkpoint of these epochs and results.csv), 'partial' (resumable) or 'new'."""
    ckpt_path = run_dir / "fold0" / "checkpoint.pt"
    if not ckpt_path.is_file():
        return "partial" if (run_dir / "args.json").is_file() and (run_dir / "fold0").is_dir() else "new"
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["epoch"] >= ckpt["epochs"] == epochs and (run_dir / "results.csv").is_file():
        return "done"
    return "partial"


def _train_stage(name: str, module, parser: argparse.ArgumentParser, args: argparse.Namespace, pair: CrossPair,
                 run_dir: Path, skip: set[str], **extra) -> None:
    state = _training_state(run_dir, args.epochs)
    if state == "done":
        print(f"[{pair.key}] {name}: done, skipped ({run_dir})", flush=True)
        return
    print(f"[{pair.key}] {name}: {'resuming' if state == 'partial' else 'training'} in {run_dir}", flush=True)
    ns = _stage_args(parser, args, skip, database_train=pair.train_arg, database_test=pair.test_arg,
                     out=str(run_dir), resume=state == "partial", **extra)
    if state == "partial" and not (run_dir / "args.json").is_file():
        ns.resume = False
    module.train(ns)


def _features_stage(args: argparse.Namespace, pair: CrossPair, teacher_dir: Path, features_dir: Path) -> None:
    path = crossdb_feat.feature_path(features_dir)
    if path.is_file():
        try:
            load_features(path, pair.train, fold=None, test_images=pair.test.images, rebuild_hint="")
            print(f"[{pair.key}] features: done, skipped ({path})", flush=True)
            return
        except UserError as err:
            print(f"[{pair.key}] features: rebuilding ({err})", flush=True)
    print(f"[{pair.key}] features: writing {path}", flush=True)
    ns = _stage_args(crossdb_feat.build_parser(), args, {"batch_size", "database_train", "database_test"},
                     database_train=pair.train_arg, database_test=pair.test_arg, run=teacher_dir,
                     features_dir=features_dir)
    crossdb_feat.save(ns)


def _read_result(run_dir: Path) -> dict:
    table = pd.read_csv(run_dir / "results.csv", dtype={"fold": str})
    row = table[table["fold"] == "0"].iloc[0]
    return {"srcc": float(row["srcc"]), "plcc": float(row["plcc"])}


def run_matrix(args: argparse.Namespace) -> pd.DataFrame:
    names = [n.strip() for n in args.matrix.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"--matrix needs at least two databases separated by commas, got {args.matrix!r}")
    if len(set(names)) != len(names):
        raise UserError(f"--matrix names a database twice: {args.matrix!r}")
    for flag in ("database_train", "database_test", "database", "folds_file", "features"):
        if getattr(args, flag, None):
            raise UserError(f"--{flag.replace('_', '-')} does not go with --matrix (the matrix picks every pair "
                            f"and keeps its features under --out)")
    if args.fold not in (None, 0):
        raise UserError(f"--fold {args.fold}: a cross-database run has a single split")
    if args.resume:
        raise UserError("--matrix always resumes what is done; drop --resume")
    check_kd_args(args)
    out = Path(args.out) if args.out else MATRIX_DIR
    pairs = [load_pair(a, b, args.data_root) for a, b in itertools.permutations(names, 2)]
    dbs = {}
    for pair in pairs:
        dbs.setdefault(pair.train_arg, pair.train)
    labels = {arg: db.name for arg, db in dbs.items()}
    print(f"cross-database matrix of {', '.join(labels.values())}: {len(pairs)} ordered pairs in {out}", flush=True)

    common_skip = {"matrix", "out", "resume", "database", "database_train", "database_test"}
    rows = []
    for pair in pairs:
        pair_dir = out / pair.key
        record = {"train": pair.train.name, "test": pair.test.name, "sign_flipped": pair.flipped}
        if args.kd != "none":
            _train_stage("teacher", teacher_crossdb_train, teacher_crossdb_train.build_parser(), args, pair,
                         pair_dir / "teacher", common_skip)
            _features_stage(args, pair, pair_dir / "teacher", pair_dir / "features")
            record.update({f"teacher_{k}": v for k, v in _read_result(pair_dir / "teacher").items()})
        _train_stage("student", sys.modules[__name__], build_parser(), args, pair, pair_dir / "student",
                     common_skip | {"features"}, features=pair_dir / "features" if args.kd != "none" else None)
        record.update(_read_result(pair_dir / "student"))
        rows.append(record)

    long = pd.DataFrame(rows)
    order = list(labels.values())
    metric_names = ["srcc", "plcc"] + (["teacher_srcc", "teacher_plcc"] if args.kd != "none" else [])
    blocks = []
    for metric in metric_names:
        grid = long.pivot(index="train", columns="test", values=metric).reindex(index=order, columns=order)
        grid.insert(0, "metric", metric)
        blocks.append(grid.reset_index().rename(columns={"index": "train"}))
    matrix = pd.concat(blocks, ignore_index=True)[["metric", "train", *order]]
    atomic_write_csv(out / "matrix.csv", matrix)
    atomic_write_csv(out / "pairs.csv", long)
    print(f"\ncross-database matrix, student --kd {args.kd} ({engine.SELECTION_NOTES[args.select]}); "
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.matrix:
        run_matrix(args)
    else:
        train(args)


if __name__ == "__main__":
    run_cli(main)
