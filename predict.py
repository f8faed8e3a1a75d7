"""Score 360-degree (ERP) images with a trained KD-OIQA model: `python predict.py --help` (the work is
kdoiqa.predicting's; installed, the same command is `kdoiqa-predict`).

    python predict.py runs/mask_train/<key>/<run> my_360_photos/ --csv scores.csv
    python predict.py runs/mask_train/<key>/<run>/fold0/checkpoint.pt my_panorama.jpg
"""
from __future__ import annotations

from kdoiqa.cli import predict_main as main
from kdoiqa.common import run_cli

__all__ = ["main"]

if __name__ == "__main__":
    run_cli(main)
