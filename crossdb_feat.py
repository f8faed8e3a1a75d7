"""Teacher features of all of database A, from the cross-database teacher (A -> B).

Every image of A (however many: the paper's script looped over a hard-coded 320) is scored by
the teacher run of teacher_crossdb_train.py, and its 512-d feature written to
`features/<A>-to-<B>/all.pt` with the teacher checkpoint's SHA-256, so that a retrained teacher
makes the cache refuse to load (the same checks as feat_save.py's per-fold files).

    python crossdb_feat.py --database-train CVIQ --database-test OIQA --run runs/teacher_crossdb_train/CVIQ-to-OIQA/<run>
    python crossdb_train.py --database-train CVIQ --database-test OIQA --kd mask      # next step
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from common import UserError, resolve_device, run_cli, runtime_parser, sha256_file
from dataset_cross import CrossPair, cross_parser, load_pair
from teacher_crossdb_train import SCRIPT as TEACHER_SCRIPT
from teacher_features import compute_teacher_features, read_teacher_run, save_features, teacher_feature_store

FEATURE_FILE = "all.pt"


def feature_path(features_dir: str | Path) -> Path:
    return Path(features_dir) / FEATURE_FILE


def default_features_dir(pair: CrossPair) -> Path:
    return Path("features") / pair.key


def rebuild_command(pair: CrossPair, run: str | Path, features_dir: str | Path | None = None) -> str:
    words = ["python crossdb_feat.py", "--database-train", shlex.quote(pair.train_arg),
             "--database-test", shlex.quote(pair.test_arg), "--run", shlex.quote(str(run))]
    if features_dir is not None:
        words += ["--features-dir", shlex.quote(str(features_dir))]
    return " ".join(words)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[runtime_parser(), cross_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--run", required=True, type=Path,
                        help="the cross-database teacher run (runs/teacher_crossdb_train/<A>-to-<B>/<run>)")
    parser.add_argument("--features-dir", type=Path, default=None, help="default features/<A>-to-<B>")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--faces", choices=("auto", "disk", "online"), default="auto")
    return parser


def save(args: argparse.Namespace) -> Path:
    """Write the feature file from parsed arguments (also called by crossdb_train.py --matrix)."""
    pair = load_pair(args.database_train, args.database_test, args.data_root)
    teacher_args = read_teacher_run(args.run, TEACHER_SCRIPT)
    if teacher_args.get("database_name") != pair.train.name:
        raise UserError(f"{args.run}: a teacher trained on {teacher_args.get('database_name')!r}, "
                        f"not on {pair.train.name!r}")
    if teacher_args.get("test_database_name") != pair.test.name:
        raise UserError(f"{args.run}: a teacher of the pair {teacher_args.get('database_name')} -> "
                        f"{teacher_args.get('test_database_name')}, not {pair.train.name} -> {pair.test.name}")
    features_dir = args.features_dir or default_features_dir(pair)
    if features_dir.exists() and not features_dir.is_dir():
        raise UserError(f"{features_dir}: is a file, expected a folder for the feature cache")
    device = resolve_device(args.device)
    db = pair.train
    store = teacher_feature_store(db, teacher_args, args, device)
    feats, ckpt_path = compute_teacher_features(
        args.run, 0, store, args, device,
        resume_hint=f"{TEACHER_SCRIPT}.py --resume --out {args.run} (and the same flags)")
    out = feature_path(features_dir)
    save_features(out, db=db, names=db.images, feats=feats, checkpoint=ckpt_path,
                  checkpoint_sha256=sha256_file(ckpt_path), face_size=int(teacher_args["face_size"]), fold=None,
                  test_images=pair.test.images, teacher_args=teacher_args,
                  rebuild=rebuild_command(pair, args.run, args.features_dir))
    print(f"wrote {out} ({feats.shape[0]} images of {db.name} x {feats.shape[1]})", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    save(args)


if __name__ == "__main__":
    run_cli(main)
