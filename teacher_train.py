"""Teacher of KD-OIQA: one ResNet shared over the six cube faces of each 360-degree image.

Each image's six 90-degree cube faces (F, R, BA, L, T, BO) go through one shared backbone; the six
pooled vectors are concatenated and projected to the 512-d teacher feature, which a linear head
maps to the score; the loss is the MSE to the subjective score (methods.TeacherMethod). k-fold,
content-disjoint, the paper's optimiser (Adam 2e-4, weight decay 5e-4, batch 6, 100 epochs).

    python img_resize.py --database OIQA --faces         # faces_256/ once (else projected on the fly)
    python teacher_train.py --database OIQA               # every fold
    python teacher_train.py --database OIQA --protocol paper       # the paper's exact protocol
    python teacher_train.py --database data/Synthetic --epochs 3 --no-pretrained --face-size 64 --folds 2
    python feat_save.py --database OIQA                   # next: the features of its latest run
"""
from __future__ import annotations

from kdoiqa import cli, stages
from kdoiqa.common import run_cli


def main(argv: list[str] | None = None) -> None:
    args, explicit = cli.parse(cli.teacher_parser(__doc__), argv)
    settings = cli.training_settings("teacher_train", args, explicit)
    stages.train_teacher(settings, explicit, hint=cli.teacher_hint(settings))


if __name__ == "__main__":
    run_cli(main)
