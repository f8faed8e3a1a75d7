"""Cross-database pairing: train on all of database A, test on all of database B.

Each database is a registered name or a folder holding meta.csv. Score directions are
reconciled: when one is a DMOS (higher is worse, e.g. IQA-ODI, or a folder whose database.json
says `"higher_is_better": false`) and the other a MOS, the model keeps regressing A's own score
and every correlation on B is taken against B's negated score, so that a good model reports
positive SRCC/PLCC; the run says so ("scores of B flipped (DMOS vs MOS)"), `metrics.json` and
`results.csv` carry `sign_flipped`.

The cross-database "fold set" is one split: train = every image of A, test = every image of B.
`--select val` holds out part of A's contents (folds.holdout_validation on A), never anything of B.
`Evaluation` is what a stage trains and tests on, a database's folds or such a pair, as one value:
the stages (kdoiqa/stages.py) run both through one code path, and what differs is in it as data.

    python dataset_cross.py --database-train CVIQ --database-test IQA-ODI     # describe a pair
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdoiqa.common import UserError
from kdoiqa.databases import Database, database_key, load_database
from kdoiqa.folds import FoldSet, FoldSplit
from kdoiqa.teacher_features import (
    CROSS_FILE,
    crossdb_feat_command,
    feat_save_command,
    features_folder,
    fold_feature_path,
)

TEACHER, CROSS_TEACHER = "teacher_train", "teacher_crossdb_train"


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


def portable_database(database: str) -> str:
    """--database as a command stored for later use gives it: a folder as an absolute path, a name as it is."""
    return str(Path(database).resolve()) if Path(database).is_dir() else database


def portable_root(data_root: str | None) -> str | None:
    return str(Path(data_root).resolve()) if data_root else None


@dataclass(frozen=True)
class Evaluation:
    """What a stage trains and tests on: the content-disjoint folds of one database (`pair` None; the split is
    the teacher's, read from its run or its features), or a cross-database pair, a fold set of one split (all of
    A -> all of B). The feature file of a fold, the fold it records, the scripts and labels differ; nothing else.
    `database_args`: the databases as the command line named them ((database,), or (A, B))."""

    train: Database
    database_args: tuple[str, ...]
    data_root: str | None = None
    pair: CrossPair | None = None

    @classmethod
    def of_database(cls, db: Database, database: str, data_root: str | None) -> Evaluation:
        return cls(db, (database,), data_root)

    @classmethod
    def of_pair(cls, pair: CrossPair, data_root: str | None) -> Evaluation:
        return cls(pair.train, (pair.train_arg, pair.test_arg), data_root, pair)

    @property
    def test(self) -> Database | None:
        """The database tested on in full (a pair's B); None: each fold's test images of `train`."""
        return self.pair.test if self.pair is not None else None

    @property
    def key(self) -> str:
        """The run and feature folder name: the database key, or the pair's `<A>-to-<B>`."""
        return self.pair.key if self.pair is not None else database_key(self.train)

    @property
    def name(self) -> str:
        """What messages call it: the database's name, or `A -> B`."""
        return f"{self.train.name} -> {self.pair.test.name}" if self.pair is not None else self.train.name

    @property
    def roots(self) -> tuple[Path, ...]:
        """The databases' folders (where a project's runs/ and features/ may be found beside them)."""
        return (self.train.root,) if self.pair is None else (self.train.root, self.pair.test.root)

    @property
    def teacher_script(self) -> str:
        return TEACHER if self.pair is None else CROSS_TEACHER

    @property
    def database_flags(self) -> tuple[str, ...]:
        return ("--database",) if self.pair is None else ("--database-train", "--database-test")

    def database_words(self) -> list[str]:
        """`--database X` or `--database-train A --database-test B`, as given."""
        return [word for pair in zip(self.database_flags, self.database_args) for word in pair]

    def fixed_folds(self) -> FoldSet | None:
        """The split itself when the evaluation decides it (a pair's one split); None: a database's split, which
        its teacher run (or the student's teacher features, or the baseline's flags) chooses."""
        return self.pair.folds() if self.pair is not None else None

    def feature_fold(self, k: int) -> int | None:
        """The fold a feature file records: k, or None for a pair's one split (its teacher is one model)."""
        return k if self.pair is None else None

    def feature_path(self, features_dir: Path, k: int) -> Path:
        """The teacher-feature file of fold k: `fold<k>.pt`, or a pair's `CROSS_FILE`."""
        return fold_feature_path(features_dir, k) if self.pair is None else Path(features_dir) / CROSS_FILE

    def features_dir(self, given: str | os.PathLike | None) -> Path:
        return features_folder(self.key, given)

    def feature_rows(self, n: int) -> str:
        """The rows of a feature file, as `wrote ...` says them."""
        return str(n) if self.pair is None else f"{n} images of {self.train.name}"

    def features_command(self, run: str | Path | None = None, features_dir: str | Path | None = None, *,
                         portable: bool = False) -> str:
        """The command that (re)builds these features: feat_save.py or crossdb_feat.py. `portable` (the command
        stored in a feature file): database folders and the data root as absolute paths."""
        words = [portable_database(a) if portable else a for a in self.database_args]
        if self.pair is not None:
            return crossdb_feat_command(*words, run, features_dir)
        return feat_save_command(words[0], run, features_dir,
                                 data_root=portable_root(self.data_root) if portable else None)
