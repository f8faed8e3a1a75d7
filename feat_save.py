"""Cache each fold's teacher features for the student's distillation.

For every finished fold of a teacher run, that fold's teacher (its reported model) computes the
512-d feature of every image of the database, written to `features/<database key>/fold<k>.pt`
with the teacher checkpoint's SHA-256, so that a retrained teacher makes the cache refuse to load.
Without --run: the latest finished teacher run of the database. `--from-authors DIR` imports the
authors' released features instead (their folds: `python dataset.py folds --authors ...` first).

    python feat_save.py                                   # OIQA, its latest finished teacher run
    python feat_save.py --database OIQA --run runs/teacher_train/<key>/<run>
    python feat_save.py --database OIQA --from-authors path/to/KD-OIQA/features/OIQA
    python mask_train.py --database OIQA                  # next
"""
from __future__ import annotations

from kdoiqa import cli, stages
from kdoiqa.common import run_cli

# What --from-authors does not use: the authors' features come from their own teacher, already computed.
TEACHER_RUN_FLAGS = ("run", "fold", "erp_size", "face_size", "faces", "face_jpeg_quality", "cache", "workers", "device",
                     "amp", "tf32", "batch_size", "protocol")


def main(argv: list[str] | None = None) -> None:
    args, explicit = cli.parse(cli.features_parser(__doc__), argv)
    if args.from_authors:
        cli.refuse_explicit(explicit, TEACHER_RUN_FLAGS, "--from-authors imports the authors' features as released "
                            "(no teacher run is used)")
        stages.save_authors_features(args.database, args.data_root, args.from_authors, args.features_dir,
                                     hint=cli.authors_features_hint(args.database, args.data_root, args.features_dir))
        return
    data, runtime = cli.data_settings(args), cli.inference_runtime(args)
    hint = cli.features_hint(args.database, args.data_root, args.features_dir, args.fold)
    stages.write_teacher_features(stages.database_evaluation(args.database, args.data_root), args.run,
                                  args.features_dir, data=data, runtime=runtime, batch_size=args.batch_size,
                                  fold=args.fold, explicit=explicit, hint=hint)


if __name__ == "__main__":
    run_cli(main)
