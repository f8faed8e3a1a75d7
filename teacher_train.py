"""Teacher of KD-OIQA: one ResNet shared over the six cube faces of each 360-degree image.

Each image's six 90-degree cube faces (F, R, BA, L, T, BO) go through one shared backbone; the
six pooled vectors are concatenated and projected to the 512-d teacher feature, which a linear
head maps to the score. k-fold, content-disjoint; the paper's defaults (Adam 2e-4, weight decay
5e-4, batch 6, 100 epochs, MSE, seed 2023).

    python -m viewport.extract --database OIQA            # faces_256/ once (else extracted online)
    python teacher_train.py --database OIQA               # all folds, paper defaults
    python teacher_train.py --database data/Synthetic --epochs 3 --no-pretrained --face-size 64
    python feat_save.py --database OIQA --run runs/teacher_train/OIQA/<run>   # next step
"""
from __future__ import annotations

import argparse

import engine
from common import run_cli, training_parser
from models import build_model


class TeacherMethod(engine.Method):
    """MSE on the score of the six-face teacher."""

    view = "faces"
    kind = "teacher"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[training_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", choices=("auto", "disk", "online"), default="auto",
                        help="read faces_<size>/ PNGs (disk), extract them from the ERP (online), or disk when "
                             "present (auto)")
    return parser


def teacher_from_args(args: argparse.Namespace):
    return build_model("teacher", arch=args.arch, pretrained=not args.no_pretrained, weights_path=args.weights,
                       normalize=args.normalize)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run = engine.start_run("teacher_train", args)
    engine.train_folds(run, lambda fold, split: TeacherMethod(teacher_from_args(args)))


if __name__ == "__main__":
    run_cli(main)
