"""Cross-database teacher: the six-cube-face teacher trained on all of database A, tested on all of B.

The paper's cross-database protocol (50 epochs by default): one split, train = every image of A,
test = every image of B. The same engine, model and outputs as teacher_train.py (results.csv,
predictions.csv of B's images, scatter plot, TensorBoard, checkpoint); when one database is a DMOS
the correlations on B are taken against its negated score and the output says so.

    python teacher_crossdb_train.py --database-train CVIQ --database-test OIQA
    python teacher_crossdb_train.py --database_train OIQA --database_test IQA-ODI --select val
    python crossdb_feat.py --database-train CVIQ --database-test OIQA --run runs/teacher_crossdb_train/CVIQ-to-OIQA/<run>
"""
from __future__ import annotations

import argparse

import engine
from common import run_cli, training_parser
from dataset_cross import cross_parser, pair_from_args, start_cross_run
from teacher_train import TeacherMethod, teacher_from_args

SCRIPT = "teacher_crossdb_train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[training_parser(epochs=50), cross_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", choices=("auto", "disk", "online"), default="auto",
                        help="read faces_<size>/ PNGs (disk), extract them from the ERP (online), or disk when "
                             "present (auto)")
    return parser


def train(args: argparse.Namespace) -> list:
    """Train and test one pair from parsed arguments (also called by crossdb_train.py --matrix)."""
    pair = pair_from_args(args)
    run = start_cross_run(SCRIPT, args, pair)
    return engine.train_folds(run, lambda fold, split: TeacherMethod(teacher_from_args(args)))


def main(argv: list[str] | None = None) -> None:
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
