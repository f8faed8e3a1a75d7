"""Cross-database teacher: the six-cube-face teacher trained on all of database A, tested on all of B.

The paper's cross-database protocol (50 epochs): one split, train = every image of A, test = every
image of B. The same engine, model and outputs as teacher_train.py; when one database is a DMOS
the correlations on B are taken against its negated score and the output says so.

    python teacher_crossdb_train.py --database_train=CVIQ --database_test=OIQA      # the paper's command
    python teacher_crossdb_train.py --database-train OIQA --database-test IQA-ODI --select val
    python crossdb_feat.py --database-train CVIQ --database-test OIQA              # next
"""
from __future__ import annotations

from kdoiqa import cli, stages
from kdoiqa.common import run_cli


def main(argv: list[str] | None = None) -> None:
    args, explicit = cli.parse(cli.teacher_parser(__doc__, cross=True), argv)
    settings = cli.training_settings("teacher_crossdb_train", args, explicit)
    stages.train_teacher(settings, hint=cli.teacher_hint(settings))


if __name__ == "__main__":
    run_cli(main)
