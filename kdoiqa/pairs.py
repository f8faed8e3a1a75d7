"""Cross-database pairing: train on all of database A, test on all of database B.

Each database is a registered name or a folder holding meta.csv. Score directions are
reconciled: when one is a DMOS (higher is worse, e.g. IQA-ODI, or a folder whose database.json
says `"higher_is_better": false`) and the other a MOS, the model keeps regressing A's own score
and every correlation on B is taken against B's negated score, so that a good model reports
positive SRCC/PLCC; the run says so ("scores of B flipped (DMOS vs MOS)"), `metrics.json` and
`results.csv` carry `sign_flipped`.

The cross-database "fold set" is one split: train = every image of A, test = every image of B.
`--select val` holds out part of A's contents (folds.holdout_validation on A), never anything of B.

    python dataset_cross.py --database-train CVIQ --database-test IQA-ODI     # describe a pair
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from kdoiqa.common import UserError
from kdoiqa.databases import Database, database_key, load_database
from kdoiqa.folds import FoldSet, FoldSplit


@dataclass
class CrossPair:
    """Database A (all trained on) and database B (all tested on)."""

    train: Database
    test: Database
    train_arg: str
    test_arg: str

    def describe(self) -> str:
        """Two lines: what is trained on and tested on, and how the score directions are reconciled."""
        return (f"{self.key}: {len(self.train)} images of {self.train.name} ({self.train.meta['ref'].nunique()} "
                f"contents) -> {len(self.test)} images of {self.test.name} ({self.test.meta['ref'].nunique()} "
                f"contents)\n{self.direction_note()}")

    @property
    def key(self) -> str:
        """`<A>-to-<B>`: the run and feature folder name of the pair."""
        return f"{database_key(self.train)}-to-{database_key(self.test)}"

    @property
    def flipped(self) -> bool:
        """True when A and B score in opposite directions (one is a DMOS)."""
        return self.train.higher_is_better != self.test.higher_is_better

    def direction_note(self) -> str:
        """One line: the two directions and whether B's scores are flipped for the metrics."""
        if not self.flipped:
            return (f"score directions agree ({self.train.describe_scores()}; {self.test.describe_scores()}); "
                    f"nothing flipped")
        return (f"scores of {self.test.name} flipped (DMOS vs MOS): the model regresses {self.train.name}'s score "
                f"({'higher is better' if self.train.higher_is_better else 'higher is worse'}), "
                f"{self.test.name}'s is {'higher is better' if self.test.higher_is_better else 'higher is worse'}; "
                f"correlations are taken against -{self.test.name} score so a good model is positive")

    def folds(self) -> FoldSet:
        """The one cross-database split: train = all of A, test = all of B."""
        return FoldSet([FoldSplit(train=list(self.train.images), test=list(self.test.images))],
                       source=f"cross-database: all {len(self.train)} images of {self.train.name} -> "
                              f"all {len(self.test)} images of {self.test.name}")


def load_pair(train: str | os.PathLike, test: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
              check_files: bool = True) -> CrossPair:
    """Load and validate both databases; refuse a database paired with itself."""
    if not train or not test:
        raise UserError("--database-train and --database-test are both required (registered names or folders)")
    a = load_database(train, data_root, check_files=check_files)
    b = load_database(test, data_root, check_files=check_files)
    if a.root.resolve() == b.root.resolve():
        raise UserError(f"--database-train and --database-test are the same database ({a.root}); for a "
                        f"within-database evaluation use teacher_train.py / mask_train.py")
    if database_key(a) == database_key(b):
        raise UserError(f"{a.root} and {b.root} are copies of one database (same name, same meta.csv); a "
                        f"cross-database pair needs two databases")
    return CrossPair(a, b, str(train), str(test))
