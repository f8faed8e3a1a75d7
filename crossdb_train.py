"""Cross-database ERP student: trained on all of database A, tested on all of database B.

The student of mask_train.py (`--kd mask|feature|none`, the same loss schedule) on the paper's
cross-database protocol (50 epochs), distilled from the features of the teacher trained on A
(crossdb_feat.py). Tested on the database --database-test names (the paper's script tested
CVIQ -> OIQA whatever its arguments said). When one database is a DMOS, the correlations on B
are taken against its negated score and the output says so.

    python crossdb_train.py --database_train=CVIQ --database_test=OIQA      # the paper's command: mask KD
    python crossdb_train.py --database-train CVIQ --database-test OIQA --kd none     # the baseline

The whole matrix (every ordered pair: teacher -> features -> student), resuming finished work,
written to <out>/matrix.csv (default runs/crossdb_matrix; rows = trained on, columns = tested on):

    python crossdb_train.py --matrix CVIQ,OIQA,IQA-ODI
"""
from __future__ import annotations

import shlex
import sys

from kdoiqa import cli, stages
from kdoiqa.common import interrupt_hint, run_cli
from kdoiqa.crossdb_matrix import MATRIX_DIR, run_matrix
from kdoiqa.distributed import DIST


def build_parser() -> cli.Parser:
    parser = cli.student_parser(__doc__, cross=True)
    parser.add_argument("--matrix", default=None, metavar="A,B,C",
                        help="run every ordered pair of these databases through teacher, features and student "
                             f"(skipping finished stages) and write <out>/matrix.csv; --out defaults to {MATRIX_DIR}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args, explicit = cli.parse(build_parser(), argv)
    if args.matrix:
        matrix = cli.matrix_settings(args, explicit)
        # Ctrl-C continues the whole matrix; one process group serves all its runs (undone at the end)
        with interrupt_hint(shlex.join(["python", "crossdb_train.py", *sys.argv[1:]])), DIST.scope():
            run_matrix(matrix, *cli.matrix_steps(args, explicit))
    else:
        settings = cli.training_settings("crossdb_train", args, explicit)
        stages.train_student(settings, explicit, hint=cli.student_hint(settings))


if __name__ == "__main__":
    run_cli(main)
