"""The teacher-feature cache: one file per fold, refused when it no longer matches.

`features/<database>/fold<k>.pt` = {names, feats [N, 512] float32, teacher checkpoint path and
SHA-256, face layout and size, the fold's test images, the teacher's args}. Loading checks the
names against meta.csv, the hash against the checkpoint and the fold against the student's fold:
a stale or mismatched cache is refused with the command that rebuilds it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from common import UserError, atomic_torch_save, jsonable, sha256_file
from dataset import Database
from models import FACE_LAYOUT

FORMAT_VERSION = 1


def fold_feature_path(features_dir: str | Path, fold: int) -> Path:
    return Path(features_dir) / f"fold{fold}.pt"


def images_digest(images: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(images)).encode()).hexdigest()


def save_features(path: Path, *, db: Database, names: Sequence[str], feats: torch.Tensor, checkpoint: Path,
                  checkpoint_sha256: str, face_size: int, fold: int | None, test_images: Sequence[str],
                  teacher_args: dict, rebuild: str) -> None:
    record = {
        "format": FORMAT_VERSION,
        "database": db.name,
        "names": list(names),
        "feats": feats.detach().to("cpu", torch.float32).contiguous(),
        # Relative to the feature file, so a project folder moved as a whole keeps its caches valid.
        "teacher_checkpoint": os.path.relpath(Path(checkpoint).resolve(), Path(path).parent.resolve()),
        "teacher_checkpoint_sha256": checkpoint_sha256,
        "face_layout": list(FACE_LAYOUT),
        "face_size": int(face_size),
        "fold": fold,
        "test_images_sha256": images_digest(test_images),
        "teacher_args": jsonable(teacher_args),
        "rebuild": rebuild,
    }
    atomic_torch_save(record, path)


def load_features(path: Path, db: Database, *, fold: int | None, test_images: Sequence[str] | None,
                  rebuild_hint: str) -> dict[str, torch.Tensor]:
    """name -> feature for every image of `db`, after every staleness check."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no teacher features; make them with `{rebuild_hint}`")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure of a torn or foreign file
        raise UserError(f"{path}: unreadable feature file ({type(err).__name__}); rebuild with `{rebuild_hint}`") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION or "feats" not in record:
        raise UserError(f"{path}: not a KD-OIQA feature file of this version; rebuild with `{rebuild_hint}`")
    rebuild = record.get("rebuild") or rebuild_hint
    if record["database"] != db.name:
        raise UserError(f"{path}: features of database {record['database']!r}, not {db.name!r}; rebuild with `{rebuild}`")
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
    ckpt = path.parent / record["teacher_checkpoint"]
    if not ckpt.is_file():
        raise UserError(f"{path}: its teacher checkpoint {ckpt} is gone, so the cache cannot be verified; "
                        f"rebuild with `{rebuild}`")
    if sha256_file(ckpt) != record["teacher_checkpoint_sha256"]:
        raise UserError(f"{path}: stale: the teacher checkpoint {ckpt} changed after these features were saved; "
                        f"rebuild with `{rebuild}`")
    feats = record["feats"]
    if feats.ndim != 2 or feats.shape[0] != len(names):
        raise UserError(f"{path}: feats shaped {list(feats.shape)} for {len(names)} names; rebuild with `{rebuild}`")
    return {name: feats[i] for i, name in enumerate(names)}


def peek_features(path: Path, rebuild_hint: str) -> dict:
    """The provenance of a feature file (teacher args, rebuild command) without any check."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no teacher features; make them with `{rebuild_hint}` (or train with --kd none)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: unreadable feature file ({type(err).__name__}); rebuild with `{rebuild_hint}`") from None
    if not isinstance(record, dict) or "teacher_args" not in record:
        raise UserError(f"{path}: not a KD-OIQA feature file; rebuild with `{rebuild_hint}`")
    return {"teacher_args": record["teacher_args"], "rebuild": record.get("rebuild")}


# ----------------------------------------------------------------------------------------------
# Computing the features of a teacher run (feat_save.py per fold, crossdb_feat.py for a pair).

def read_teacher_run(run: Path, script: str, required: Sequence[str] = ("face_size", "erp_size")) -> dict:
    """The teacher run's args.json, checked to be a finished run record of `script`."""
    import json

    args_path = Path(run) / "args.json"
    if not args_path.is_file():
        raise UserError(f"{run}: not a teacher run folder (no args.json); pass runs/{script}/<database>/<run>")
    try:
        teacher_args = json.loads(args_path.read_text(encoding="utf-8"))
        if not isinstance(teacher_args, dict):
            raise ValueError("not a JSON object")
        for key in required:
            if key not in teacher_args:
                raise ValueError(f"no {key!r}")
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{args_path}: not a readable teacher run record ({err})") from None
    if teacher_args.get("script") != script:
        raise UserError(f"{args_path}: a {teacher_args.get('script')} run, not a {script} run")
    return teacher_args


def teacher_feature_store(db: Database, teacher_args: dict, args, device: torch.device):
    """The faces of every image of `db` at the teacher's face size, decoded once for every fold."""
    import argparse

    import engine

    data_args = argparse.Namespace(face_size=int(teacher_args["face_size"]), erp_size=tuple(teacher_args["erp_size"]),
                                   workers=args.workers, cache=args.cache, faces=args.faces, amp=args.amp)
    return engine.ImageStore(db, db.images, "faces", data_args, device, progress=not args.no_progress)


def compute_teacher_features(run: Path, fold: int, store, args, device: torch.device, *,
                             resume_hint: str) -> tuple[torch.Tensor, Path]:
    """The 512-d feature of every image of the store from fold `fold`'s finished teacher checkpoint."""
    import engine

    ckpt, ckpt_path = engine.load_run_checkpoint(run, fold)
    if ckpt.get("kind") != "teacher":
        raise UserError(f"{ckpt_path}: a {ckpt.get('kind')} checkpoint, not a teacher")
    if ckpt["epoch"] < ckpt["epochs"]:
        raise UserError(f"{ckpt_path}: fold {fold} stopped at epoch {ckpt['epoch']} of {ckpt['epochs']}; "
                        f"finish it with {resume_hint}")
    model = engine.model_from_checkpoint(ckpt, ckpt_path).to(device)
    _, feats = engine.infer(model, store, store.images, args.batch_size, engine.autocast_for(args, device),
                            progress=not args.no_progress, desc=f"teacher features ({ckpt_path.parent.name})")
    return feats, ckpt_path
