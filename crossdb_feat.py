"""Teacher features of all of database A, from the cross-database teacher (A -> B).

Every image of A (however many: the paper's script looped over a hard-coded 320) is scored by the
teacher run of teacher_crossdb_train.py (default: the pair's latest finished run), and its 512-d
feature written to `features/<A>-to-<B>/all.pt`, checked as feat_save.py's per-fold files.

    python crossdb_feat.py --database_train=CVIQ --database_test=OIQA      # the paper's command
    python crossdb_feat.py --database-train CVIQ --database-test OIQA --run runs/teacher_crossdb_train/<pair>/<run>
    python crossdb_train.py --database-train CVIQ --database-test OIQA     # next
"""
from __future__ import annotations

from kdoiqa import cli, stages
from kdoiqa.common import run_cli


def main(argv: list[str] | None = None) -> None:
    args, explicit = cli.parse(cli.features_parser(__doc__, cross=True), argv)
    cli.check_cross_values(args)
    data, runtime = cli.data_settings(args), cli.inference_runtime(args)
    hint = cli.features_hint(args.database_train, args.data_root, args.features_dir, test=args.database_test)
    stages.write_teacher_features(stages.pair_evaluation(args.database_train, args.database_test, args.data_root),
                                  args.run, args.features_dir, data=data, runtime=runtime, batch_size=args.batch_size,
                                  explicit=explicit, hint=hint)


if __name__ == "__main__":
    run_cli(main)
