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


def main(argv: list[str] | None = None) -> None:
    args = cli.features_parser(__doc__).parse_args(argv)
    if args.from_authors:
        stages.save_authors_features(args.database, args.data_root, args.from_authors, args.features_dir)
        return
    stages.save_teacher_features(args.database, args.data_root, args.run, args.features_dir,
                                 data=cli.data_settings(args), runtime=cli.inference_runtime(args),
                                 batch_size=args.batch_size, fold=args.fold)


if __name__ == "__main__":
    run_cli(main)
