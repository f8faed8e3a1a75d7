"""Folds: content-disjoint train/test splits, a property of the database, saved beside it.

A database's default split is `<db>/folds/k<K>_seed<split seed>.json` (K = 5 and split seed 2023
unless `--folds` / `--split-seed` say otherwise), derived from `ref`, made once and then read by
every script and every training seed. `folds/authors.json` holds the paper's folds
(`python dataset.py folds --authors DIR`). A run records the digest of its split, so runs on
different splits are told apart.

    python dataset.py folds --database OIQA                  # data/OIQA/folds/k5_seed2023.json
    python dataset.py folds --database OIQA --authors path/to/OIQA/   # folds/authors.json
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdoiqa.common import DEFAULT_SEED, UserError, atomic_write_json
from kdoiqa.databases import Database

AUTHORS_FILE = "authors.json"


@dataclass
class FoldSplit:
    """One fold: images (as in meta.csv) to train on and to test on."""

    train: list[str]
    test: list[str]


@dataclass
class FoldSet:
    folds: list[FoldSplit]
    source: str
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.folds)

    def to_json(self) -> dict:
        return {"folds": [{"train": f.train, "test": f.test} for f in self.folds], "source": self.source}

    def digest(self) -> str:
        """SHA-256 of the split itself (each fold's sorted train and test lists): equal digests, equal splits."""
        canonical = json.dumps([[sorted(f.train), sorted(f.test)] for f in self.folds])
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> dict:
        """What a run records of its split."""
        return {"path": str(self.path) if self.path else None, "source": self.source, "k": len(self.folds),
                "sha256": self.digest()}


def default_folds_path(db: Database, k: int = 5, split_seed: int = DEFAULT_SEED) -> Path:
    return db.folds_dir() / f"k{k}_seed{split_seed}.json"


def make_folds(db: Database, k: int = 5, seed: int = DEFAULT_SEED) -> FoldSet:
    """Split the contents (`ref`) into k groups with a seeded permutation; fold i tests group i."""
    refs = sorted(set(db.meta["ref"]))
    if k < 2:
        raise UserError(f"--folds must be at least 2, got {k}")
    if len(refs) < k:
        raise UserError(f"{db.root / 'meta.csv'}: {len(refs)} contents (ref) cannot make {k} content-disjoint folds; "
                        f"pass --folds {max(2, len(refs))} or fewer")
    order = np.random.default_rng(seed).permutation(len(refs))
    groups = np.array_split(np.asarray(refs, dtype=object)[order], k)
    folds = []
    for group in groups:
        test_refs = set(group.tolist())
        is_test = db.meta["ref"].isin(test_refs).to_numpy()
        folds.append(FoldSplit(train=db.meta["image"][~is_test].tolist(), test=db.meta["image"][is_test].tolist()))
    return FoldSet(folds, source=f"{k} content-disjoint folds of {db.name}, split seed {seed}")


def write_folds(folds: FoldSet, path: Path) -> Path:
    atomic_write_json(path, folds.to_json())
    folds.path = path
    return path


def make_folds_command(db: Database, path: Path) -> str:
    """The command that writes the fold file `path` of `db`."""
    import shlex

    base = f"python dataset.py folds --database {shlex.quote(str(db.root))}"
    if path.name == AUTHORS_FILE:
        return f"{base} --authors DIR"
    match = re.fullmatch(r"k(\d+)_seed(-?\d+)\.json", path.name)
    flags = f" --folds {match[1]} --split-seed {match[2]}" if match else ""
    return f"{base}{flags} --out {shlex.quote(str(path))}"


def load_folds(path: str | os.PathLike, db: Database) -> FoldSet:
    """Read a fold file and check it against the database's meta.csv."""
    path = Path(path)
    if not path.is_file():
        note = " (DIR: the folder of the authors' <DB>_trainc_k.csv and <DB>_testc_k.csv)" if path.name == AUTHORS_FILE else ""
        raise UserError(f"{path}: no such fold file; make it with `{make_folds_command(db, path)}`{note}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("folds"), list) or not data["folds"]:
        raise UserError(f"{path}: expected {{\"folds\": [{{\"train\": [...], \"test\": [...]}}, ...]}}")
    known = set(db.images)
    ref_of = dict(zip(db.meta["image"], db.meta["ref"]))
    folds = []
    for i, fold in enumerate(data["folds"]):
        if not isinstance(fold, dict) or not all(isinstance(fold.get(key), list) for key in ("train", "test")):
            raise UserError(f"{path}: fold {i} needs lists 'train' and 'test'")
        for key in ("train", "test"):
            bad = [x for x in fold[key] if not isinstance(x, str)]
            if bad:
                raise UserError(f"{path}: fold {i} {key} holds a non-string entry {bad[0]!r}")
            unknown = [x for x in fold[key] if x not in known]
            if unknown:
                raise UserError(f"{path}: fold {i} {key} names {len(unknown)} image(s) not in "
                                f"{db.root / 'meta.csv'}, e.g. {unknown[0]!r}; the fold file belongs to another database")
            if len(set(fold[key])) != len(fold[key]):
                raise UserError(f"{path}: fold {i} {key} lists an image twice")
        if not fold["test"] or not fold["train"]:
            raise UserError(f"{path}: fold {i} has an empty train or test list")
        overlap = set(fold["train"]) & set(fold["test"])
        if overlap:
            raise UserError(f"{path}: fold {i}: {len(overlap)} image(s) both in train and test, e.g. {sorted(overlap)[0]!r}")
        shared = {ref_of[x] for x in fold["train"]} & {ref_of[x] for x in fold["test"]}
        if shared:
            warnings.warn(f"{path}: fold {i} is not content-disjoint ({len(shared)} content(s) in train and test)",
                          stacklevel=2)
        folds.append(FoldSplit(train=list(fold["train"]), test=list(fold["test"])))
    return FoldSet(folds, source=str(data.get("source", "")), path=path)


def resolve_folds(db: Database, folds_file: str | os.PathLike | None, *, k: int = 5,
                  split_seed: int = DEFAULT_SEED, prefer_authors: bool = False) -> FoldSet:
    """`--folds-file` when given; else (with `prefer_authors`, the paper's protocol) `folds/authors.json`
    when the database has it; else the database's default split, made (and saved) once."""
    if folds_file:
        return load_folds(folds_file, db)
    if prefer_authors and (db.folds_dir() / AUTHORS_FILE).is_file():
        return load_folds(db.folds_dir() / AUTHORS_FILE, db)
    path = default_folds_path(db, k, split_seed)
    if path.is_file():
        return load_folds(path, db)
    folds = make_folds(db, k, split_seed)
    write_folds(folds, path)
    print(f"wrote {path} (the database's default split: {k} content-disjoint folds, split seed {split_seed})",
          file=sys.stderr)
    return folds


def holdout_validation(db: Database, train: Sequence[str], fraction: float = 0.15,
                       seed: int = DEFAULT_SEED) -> tuple[list[str], list[str]]:
    """Hold out ~`fraction` of the training contents (never images of a test content) as validation."""
    ref_of = dict(zip(db.meta["image"], db.meta["ref"]))
    refs = sorted({ref_of[x] for x in train})
    if len(refs) < 2:
        raise UserError("--select val needs at least two training contents to hold one out")
    n_val = min(len(refs) - 1, max(1, round(fraction * len(refs))))
    val_refs = set(np.asarray(refs, dtype=object)[np.random.default_rng(seed).permutation(len(refs))[:n_val]].tolist())
    return ([x for x in train if ref_of[x] not in val_refs], [x for x in train if ref_of[x] in val_refs])


