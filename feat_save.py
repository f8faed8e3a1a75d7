"""Cache each fold's teacher features for the student's distillation.

For every fold of a teacher run, the fold's teacher (the reported model: last epoch, or the one
`--select` chose) computes the 512-d feature of every image of the database. Written to
`features/<database>/fold<k>.pt` with the teacher checkpoint's SHA-256, so that a retrained
teacher makes the cache refuse to load.

    python feat_save.py --database OIQA --run runs/teacher_train/OIQA/<run>
    python mask_train.py --database OIQA --features features/OIQA      # next step
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from common import UserError, resolve_device, run_cli, runtime_parser, sha256_file
from dataset import database_key, load_database, load_folds
from teacher_features import compute_teacher_features, fold_feature_path, read_teacher_run, save_features, teacher_feature_store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[runtime_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", required=True, help="registered name or folder holding meta.csv")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--run", required=True, type=Path, help="the teacher run folder (runs/teacher_train/<db>/<run>)")
    parser.add_argument("--fold", type=int, default=None, help="only this fold (default: every fold of the run)")
    parser.add_argument("--features-dir", type=Path, default=None, help="default features/<database>")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--faces", choices=("auto", "disk", "online"), default="auto")
    return parser


def rebuild_command(database: str, run: Path, features_dir: Path) -> str:
    return " ".join(["python feat_save.py", "--database", shlex.quote(str(database)), "--run", shlex.quote(str(run)),
                     "--features-dir", shlex.quote(str(features_dir))])


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    db = load_database(args.database, args.data_root)
    teacher_args = read_teacher_run(args.run, "teacher_train", required=("folds_path", "face_size", "erp_size"))
    if teacher_args.get("database_name") != db.name:
        raise UserError(f"{args.run}: a teacher of {teacher_args.get('database_name')!r}, not of {db.name!r}")
    folds = load_folds(teacher_args["folds_path"], db)
    fold_ids = [args.fold] if args.fold is not None else [k for k in range(len(folds))
                                                            if (args.run / f"fold{k}" / "checkpoint.pt").is_file()]
    if args.fold is not None and not 0 <= args.fold < len(folds):
        raise UserError(f"--fold {args.fold} is out of range: folds 0..{len(folds) - 1}")
    if not fold_ids:
        raise UserError(f"{args.run}: no fold checkpoints; train the teacher first")
    features_dir = args.features_dir or Path("features") / database_key(db)
    if features_dir.exists() and not features_dir.is_dir():
        raise UserError(f"{features_dir}: is a file, expected a folder for the feature cache")
    device = resolve_device(args.device)
    store = teacher_feature_store(db, teacher_args, args, device)
    rebuild = rebuild_command(args.database, args.run, features_dir)
    for k in fold_ids:
        feats, ckpt_path = compute_teacher_features(args.run, k, store, args, device,
                                                    resume_hint=f"teacher_train.py --resume --out {args.run}")
        out = fold_feature_path(features_dir, k)
        save_features(out, db=db, names=store.images, feats=feats, checkpoint=ckpt_path,
                      checkpoint_sha256=sha256_file(ckpt_path), face_size=int(teacher_args["face_size"]), fold=k,
                      test_images=folds.folds[k].test, teacher_args=teacher_args, rebuild=rebuild)
        print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]})", flush=True)


if __name__ == "__main__":
    run_cli(main)
