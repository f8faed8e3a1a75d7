"""Cross-database pairs (the paper's dataset_cross.py): train on all of database A, test on all of B.

Each database is a registered name or a folder holding meta.csv. When one scores a DMOS and the other
a MOS, the model keeps regressing A's own score and every correlation on B is taken against B's negated
score, so that a good model reports positive SRCC/PLCC (`kdoiqa.pairs`). This command describes a pair
before training on it; the trio `teacher_crossdb_train.py`, `crossdb_feat.py`, `crossdb_train.py` trains it.

    python dataset_cross.py --database-train CVIQ --database-test IQA-ODI
"""
from __future__ import annotations

import shlex

from kdoiqa.cli import Parser, cross_parser
from kdoiqa.common import run_cli
from kdoiqa.pairs import load_pair


def main(argv: list[str] | None = None) -> None:
    args = Parser(description=__doc__, parents=[cross_parser()]).parse_args(argv)
    print(load_pair(args.database_train, args.database_test, args.data_root, check_files=False).describe())
    print(f"next: python teacher_crossdb_train.py --database-train {shlex.quote(args.database_train)} "
          f"--database-test {shlex.quote(args.database_test)}")


if __name__ == "__main__":
    run_cli(main)
