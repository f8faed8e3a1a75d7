"""Cross-database pairing: train on all of database A, test on all of database B.

Each database is a registered name or a folder holding meta.csv. Score directions are
reconciled: when one is a DMOS (higher is worse, e.g. IQA-ODI, or a folder whose database.json
says `"higher_is_better": false`) and the other a MOS, the model keeps regressing A's own score
and every correlation on B is taken against B's negated score, so that a good model reports
positive SRCC/PLCC; the run says so ("scores of B flipped (DMOS vs MOS)"), `metrics.json` and
`results.csv` carry `sign_flipped`.

The cross-database "fold set" is one split: train = every image of A, test = every image of B.
`--select val` holds out part of A's contents (engine.holdout_validation on the run's database,
A), never anything of B.

    python dataset_cross.py --database-train CVIQ --database-test IQA-ODI     # describe a pair
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from common import UserError, run_cli
from dataset import Database, FoldSet, FoldSplit, database_key, load_database


@dataclass
class CrossPair:
    """Database A (all trained on) and database B (all tested on)."""

    train: Database
    test: Database
    train_arg: str
    test_arg: str

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
        raise UserError(f"both databases are named {a.name!r} ({a.root}, {b.root}); give one a different "
                        f"\"name\" in its database.json")
    return CrossPair(a, b, str(train), str(test))


def cross_parser(*, required: bool = True) -> argparse.ArgumentParser:
    """`--database-train A --database-test B` (the paper's `--database_train` spelling works too)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cross-database")
    g.add_argument("--database-train", "--database_train", dest="database_train", default=None,
                   help="database A, trained on in full: a registered name or a folder holding meta.csv")
    g.add_argument("--database-test", "--database_test", dest="database_test", default=None,
                   help="database B, tested on in full: a registered name or a folder holding meta.csv")
    return p


def pair_from_args(args: argparse.Namespace) -> CrossPair:
    """Load the pair named by the flags and make the args consistent with a one-split run on A."""
    if getattr(args, "database", None):
        raise UserError("cross-database scripts take --database-train A --database-test B, not --database")
    if getattr(args, "folds_file", None):
        raise UserError("--folds-file does not apply: a cross-database run trains on all of A and tests on all of B")
    if getattr(args, "fold", None) not in (None, 0):
        raise UserError(f"--fold {args.fold}: a cross-database run has a single split (fold 0)")
    pair = load_pair(args.database_train, args.database_test, args.data_root)
    args.database = args.database_train          # what start_run validates and --resume compares
    args.scores_flipped = pair.flipped          # recorded in args.json
    return pair


def start_cross_run(script: str, args: argparse.Namespace, pair: CrossPair):
    """engine.start_run on A, scored on B: runs/<script>/<A>-to-<B>/<time> unless --out."""
    import json
    from pathlib import Path

    import engine

    if args.resume and args.out and (Path(args.out) / "args.json").is_file():
        saved = json.loads((Path(args.out) / "args.json").read_text())
        if saved.get("database_test") not in (None, args.database_test):
            raise UserError(f"{Path(args.out) / 'args.json'}: --database-test was {saved['database_test']!r} in this "
                            f"run, now {args.database_test!r}; resume with the same pair or start a new --out")
    run = engine.start_run(script, args, db=pair.train, folds=pair.folds(), test_db=pair.test, run_key=pair.key)
    print(f"{script}: train on all of {pair.train.name} ({len(pair.train)} images), test on all of "
          f"{pair.test.name} ({len(pair.test)} images); {pair.direction_note()}", flush=True)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, parents=[cross_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    pair = load_pair(args.database_train, args.database_test, args.data_root, check_files=False)
    print(f"{pair.key}: {len(pair.train)} images of {pair.train.name} ({pair.train.meta['ref'].nunique()} contents) "
          f"-> {len(pair.test)} images of {pair.test.name} ({pair.test.meta['ref'].nunique()} contents)")
    print(pair.direction_note())


if __name__ == "__main__":
    run_cli(main)
