"""The teacher-feature cache: one file per fold, refused when it no longer matches.

`features/<database key>/fold<k>.pt` (cross-database: `features/<A>-to-<B>/all.pt`) =
{names, feats [N, 512] float32, the database's identity, the fold and its test images, the
split's digest, the face layout and size, provenance}. The provenance is a teacher run (its
checkpoint's path and SHA-256, protocol) or the authors' release (their folds, file digests).
Loading checks the database identity, the names against meta.csv, the fold against the student's
split and the checkpoint's hash: a stale or mismatched cache is refused with the command that
rebuilds it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch

from kdoiqa.common import UserError, atomic_torch_save, jsonable, sha256_file, torch_load
from kdoiqa.databases import Database, database_key, image_stem
from kdoiqa.models import FACE_LAYOUT

FORMAT_VERSION = 2
CROSS_FILE = "all.pt"


def fold_feature_path(features_dir: str | Path, fold: int) -> Path:
    return Path(features_dir) / f"fold{fold}.pt"


def features_folder(key: str, given: str | os.PathLike | None = None) -> Path:
    """The teacher-feature folder: `given` (--features-dir), else `features/<key>` (the database key, or a
    cross-database pair's `<A>-to-<B>`), relative to the working folder. The one place that default is made."""
    return Path(given) if given else Path("features") / key


def images_digest(images: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(images)).encode()).hexdigest()


def feat_save_command(database: str, run: str | Path | None = None, features_dir: str | Path | None = None, *,
                      from_authors: str | Path | None = None, data_root: str | Path | None = None) -> str:
    """The command that (re)builds a database's per-fold features: from a teacher run (default: the
    latest finished one), or from the authors' release."""
    words = ["python feat_save.py", "--database", shlex.quote(str(database))]
    if data_root is not None:
        words += ["--data-root", shlex.quote(str(data_root))]
    if run is not None:
        words += ["--run", shlex.quote(str(run))]
    if from_authors is not None:
        words += ["--from-authors", shlex.quote(str(from_authors))]
    if features_dir is not None:
        words += ["--features-dir", shlex.quote(str(features_dir))]
    return " ".join(words)


def crossdb_feat_command(train: str, test: str, run: str | Path | None = None,
                         features_dir: str | Path | None = None) -> str:
    """The command that (re)builds a cross-database pair's features from its teacher run (default: the latest)."""
    words = ["python crossdb_feat.py", "--database-train", shlex.quote(train), "--database-test", shlex.quote(test)]
    if run is not None:
        words += ["--run", shlex.quote(str(run))]
    if features_dir is not None:
        words += ["--features-dir", shlex.quote(str(features_dir))]
    return " ".join(words)


def save_features(path: Path, *, db: Database, names: Sequence[str], feats: torch.Tensor, fold: int | None,
                  test_images: Sequence[str], folds_sha256: str | None, face_size: int | None, provenance: dict,
                  rebuild: str) -> None:
    """Write a feature file. `provenance`: {"kind": "teacher run", "teacher_checkpoint": path, ...} or
    {"kind": "authors' release", ...}; a checkpoint path is stored relative to the feature file, so a
    project folder moved as a whole keeps its caches valid, and absolute, so a feature folder copied
    elsewhere alone finds its teacher too."""
    provenance = dict(provenance)
    if "teacher_checkpoint" in provenance:
        absolute = Path(provenance["teacher_checkpoint"]).resolve()
        provenance["teacher_checkpoint"] = os.path.relpath(absolute, Path(path).parent.resolve())
        provenance["teacher_checkpoint_absolute"] = str(absolute)
    atomic_torch_save({
        "format": FORMAT_VERSION,
        "database": {"name": db.name, "key": database_key(db), "meta_sha256": db.meta_sha256},
        "names": list(names),
        "feats": feats.detach().to("cpu", torch.float32).contiguous(),
        "fold": fold,
        "test_images_sha256": images_digest(test_images),
        "folds_sha256": folds_sha256,
        "face_layout": list(FACE_LAYOUT),
        "face_size": face_size,
        "provenance": jsonable(provenance),
        "rebuild": rebuild,
    }, path)


def _read(path: Path, rebuild_hint: str) -> dict:
    record = torch_load(path, what="teacher feature file", hint=f"rebuild it with `{rebuild_hint}`")
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION or "feats" not in record:
        raise UserError(f"{path}: not a KD-OIQA feature file of this version; rebuild with `{rebuild_hint}`")
    return record


def peek_features(path: Path, rebuild_hint: str) -> dict:
    """A feature file's record (provenance, split digest, rebuild command) without the checks of `load_features`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no teacher features; make them with `{rebuild_hint}` (or train with --kd none)")
    return _read(path, rebuild_hint)


def load_features(path: Path, db: Database, *, fold: int | None, test_images: Sequence[str] | None,
                  rebuild_hint: str) -> dict[str, torch.Tensor]:
    """name -> feature for every image of `db`, after every staleness check."""
    return load_teacher_features(path, db, fold=fold, test_images=test_images, rebuild_hint=rebuild_hint)[0]


def features_source(path: Path, record: dict) -> dict:
    """Where a feature file's features come from, in absolute paths (what a student records of its teacher):
    {"features", "kind": "teacher run", "teacher_run", "teacher_checkpoint", "teacher_checkpoint_sha256",
    "protocol"} or {"features", "kind": "authors' release", "source", "files_sha256", "protocol"}."""
    provenance = dict(record.get("provenance") or {})
    source = {"features": str(Path(path).resolve()), "kind": provenance.get("kind"),
              "protocol": provenance.get("protocol")}
    if provenance.get("kind") == "teacher run":
        ckpt = teacher_checkpoint_of(Path(path), provenance).resolve()
        source.update(teacher_run=str(ckpt.parent.parent), teacher_checkpoint=str(ckpt),
                      teacher_checkpoint_sha256=provenance.get("teacher_checkpoint_sha256"))
    else:
        source.update(source=provenance.get("source"), files_sha256=provenance.get("files_sha256"))
    return source


def teacher_checkpoint_of(path: Path, provenance: dict) -> Path:
    """The teacher checkpoint a feature file names: relative to the file, else at its absolute path."""
    relative = Path(path).parent / provenance["teacher_checkpoint"]
    absolute = provenance.get("teacher_checkpoint_absolute")
    return Path(absolute) if not relative.is_file() and absolute and Path(absolute).is_file() else relative


def load_teacher_features(path: Path, db: Database, *, fold: int | None, test_images: Sequence[str] | None,
                          rebuild_hint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """`load_features` and the file's `features_source`: the features and the teacher they come from."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no teacher features; make them with `{rebuild_hint}`")
    record = _read(path, rebuild_hint)
    rebuild = record.get("rebuild") or rebuild_hint
    saved = record.get("database") or {}
    if saved.get("key") != database_key(db):
        raise UserError(f"{path}: features of database {saved.get('key')!r} ({saved.get('name')}), not of "
                        f"{database_key(db)!r} ({db.root}): another database or another version of its meta.csv; "
                        f"make this database's features with `{rebuild_hint}`")
    if tuple(record.get("face_layout", ())) != FACE_LAYOUT:
        raise UserError(f"{path}: teacher face layout {record.get('face_layout')} differs from {list(FACE_LAYOUT)}; "
                        f"rebuild with `{rebuild}`")
    if fold is not None and record.get("fold") != fold:
        raise UserError(f"{path}: features of fold {record.get('fold')}, expected fold {fold}; rebuild with `{rebuild}`")
    if test_images is not None and record.get("test_images_sha256") != images_digest(test_images):
        raise UserError(f"{path}: the teacher of these features was trained on other folds than the student's "
                        f"(its test set differs); use the teacher's fold file or rebuild with `{rebuild}`")
    names = list(record["names"])
    missing = sorted(set(db.images) - set(names))
    if missing:
        raise UserError(f"{path}: no feature for {len(missing)} image(s) of {db.root / 'meta.csv'}, e.g. {missing[0]!r}; "
                        f"rebuild with `{rebuild}`")
    provenance = record.get("provenance") or {}
    if provenance.get("kind") == "teacher run":
        ckpt = teacher_checkpoint_of(path, provenance)
        if not ckpt.is_file():  # the run it names is gone too, or moved: rebuild from the latest teacher run
            raise UserError(f"{path}: its teacher checkpoint {ckpt} is gone (the teacher run deleted or moved?), so "
                            f"the cache cannot be verified; rebuild it with `{rebuild_hint or rebuild}` (another "
                            f"teacher run: add --run RUN)")
        if sha256_file(ckpt) != provenance["teacher_checkpoint_sha256"]:
            raise UserError(f"{path}: stale: the teacher checkpoint {ckpt} changed after these features were saved; "
                            f"rebuild with `{rebuild}`")
    feats = record["feats"]
    if feats.ndim != 2 or feats.shape[0] != len(names):
        raise UserError(f"{path}: feats shaped {list(feats.shape)} for {len(names)} names; rebuild with `{rebuild}`")
    return {name: feats[i] for i, name in enumerate(names)}, features_source(path, record)


# ----------------------------------------------------------------------------------------------
# The authors' released features: features/<database>/<fold 1..5>/<image id>.npy, each a
# torch.save'd [1, 512] tensor (possibly saved from CUDA, possibly with requires_grad).

def authors_image_id(image: str) -> str:
    """The authors' id of one of our images: `001` for CVIQ's `001.png` and OIQA's `img1.jpg`, the file
    stem for IQA-ODI (`QF5_ERP_human_P0`)."""
    stem = PurePosixPath(image_stem(image)).name
    match = re.fullmatch(r"(?:img)?0*(\d+)", stem, flags=re.IGNORECASE)
    return match[1].rjust(3, "0") if match else stem


def authors_fold_dirs(folder: Path, db: Database, k: int) -> list[Path]:
    """The authors' fold folders 1..k for `db`: `folder/<1..k>` or `folder/<database name>/<1..k>`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; --from-authors takes the authors' features/<database> folder "
                        f"(holding 1/ ... {k}/)")
    candidates = [folder] + [folder / name for name in (db.name, db.name.replace("-", ""), db.name.upper())]
    for base in candidates:
        if (base / "1").is_dir():
            missing = [str(i) for i in range(1, k + 1) if not (base / str(i)).is_dir()]
            if missing:
                raise UserError(f"{base}: the authors' feature folders {', '.join(missing)} are missing (expected 1..{k})")
            return [base / str(i) for i in range(1, k + 1)]
    raise UserError(f"{folder}: no fold folders 1/ ... {k}/ here or in {folder / db.name}; --from-authors takes the "
                    f"authors' features/<database> folder")


def read_authors_fold(folder: Path, db: Database) -> tuple[torch.Tensor, str]:
    """Every image's feature from one authors' fold folder ([N, 512] in meta.csv order) and a digest
    of the files read; a missing, extra or malformed file is one line naming it."""
    ids = {authors_image_id(image): image for image in db.images}
    if len(ids) != len(db):
        raise UserError(f"{db.root / 'meta.csv'}: several images share an authors' id; cannot match their features")
    files = {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix == ".npy"}
    missing = sorted(set(ids) - set(files))
    if missing:
        raise UserError(f"{folder / (missing[0] + '.npy')}: missing ({len(missing)} of {len(ids)} features missing "
                        f"in {folder})")
    extra = sorted(set(files) - set(ids))
    if extra:
        raise UserError(f"{files[extra[0]]}: names no image of {db.root / 'meta.csv'} ({len(extra)} such file(s)); "
                        f"are these the features of another database?")
    digest = hashlib.sha256()
    rows = []
    for image in db.images:
        path = files[authors_image_id(image)]
        value = torch_load(path, what="authors' feature file (a torch.save'd [1, 512] tensor)")
        if not isinstance(value, torch.Tensor) or value.numel() != 512 or value.dim() not in (1, 2):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"{path}: expected a [1, 512] tensor, got {shape}")
        if not torch.isfinite(value).all():
            raise UserError(f"{path}: holds NaN or inf")
        rows.append(value.detach().reshape(512).float())
        digest.update(path.name.encode() + sha256_file(path).encode())
    return torch.stack(rows), digest.hexdigest()
