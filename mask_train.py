"""ERP student of KD-OIQA, distilled from the cached cube-face teacher features.

The student sees only the equirectangular image: backbone -> pooled feature f_s -> linear head.
With `--kd mask` (the paper's) a policy network picks, channel by channel, the teacher's feature
f_t or f_s; the head must score the mix f_m, and the student learns to imitate it
(methods.StudentMethod): epochs 1-5 L = MSE(y_hat, y); 6-10 L += 0.2 MSE(f_s, f_t); from 11
L = MSE(y_hat, y) + MSE(head(f_m), y) + 0.2 MSE(f_s, f_m.detach()). `--kd feature` keeps the plain
feature loss; `--kd none` is the paper's baseline_train.py. It trains on its teacher's split.

    python mask_train.py --database OIQA                 # mask KD from features/<OIQA key>/
    python mask_train.py --database OIQA --kd none       # the baseline, on the same split
    python mask_train.py --database data/Synthetic --epochs 12 --kd-warmup 2 --kd-feature-epochs 2 \\
        --no-pretrained --erp-size 128x64 --folds 2
    python predict.py runs/mask_train/<key>/<run> my_360_photos/     # next
"""
from __future__ import annotations

from kdoiqa import cli, stages
from kdoiqa.common import run_cli


def main(argv: list[str] | None = None) -> None:
    args, explicit = cli.parse(cli.student_parser(__doc__), argv)
    settings = cli.training_settings("mask_train", args, explicit)
    stages.train_student(settings, explicit, hint=cli.student_hint(settings))


if __name__ == "__main__":
    run_cli(main)
