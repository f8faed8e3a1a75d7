"""Scoring a folder of panoramas with predict.py: images per second, decoding included (not a test).

Writes `--images` JPEG panoramas of `--size`, saves a randomly initialised student checkpoint in the
checkpoint format (what is measured is the data path and the network, not what it learned), and
times `predict.main` over the folder with one model and with a 5-fold run folder (every fold scores
every image).

    python benchmarks/bench_predict.py --work scratch/predict --device cuda --images 512
    python benchmarks/bench_predict.py --work scratch/predict --device cpu --images 32 --size 1024x512
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np
import torch
from bench_utils import machine, report
from PIL import Image

import predict
from kdoiqa.checkpoints import save_checkpoint
from kdoiqa.cli import size_type
from kdoiqa.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=size_type("--size"), default=(2048, 1024), help="panorama size (JPEG)")
    p.add_argument("--erp-size", type=size_type("--erp-size"), default=(1024, 512), help="the student's input size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--prepare-only", action="store_true", help="write the photos and checkpoints, then stop")
    args = p.parse_args()
    photos, run = args.work / "photos", args.work / "run"
    photos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = args.size
    base = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
    for i in range(args.images):
        path = photos / f"{i:05d}.jpg"
        if not path.exists():
            Image.fromarray(np.roll(base, i, axis=1)).resize((width, height)).save(path, quality=90)
    model = build_model("student", pretrained=False)
    data = {"erp_size": list(args.erp_size), "face_size": 256, "face_jpeg_quality": None}
    for k in range(args.folds):
        save_checkpoint(run / f"fold{k}" / "checkpoint.pt", {
            "kind": "student", "model_config": model.config(), "model": model.state_dict(), "epoch": 1, "epochs": 1,
            "settings": {"data": data}, "target_scale": {"offset": 0.0, "scale": 1.0},
            "database": {"name": "bench", "higher_is_better": True, "score_range": [0, 100]}})
    if args.prepare_only:
        return
    rates = {}
    for name, target in (("one_model", run / "fold0"), (f"{args.folds}_folds", run)):
        argv = [str(target), str(photos), "--device", args.device, "--batch-size", str(args.batch_size), "--no-progress"]
        with contextlib.redirect_stdout(io.StringIO()):
            predict.main(argv[:1] + [str(photos / "00000.jpg")] + argv[2:])  # warm-up (CUDA context, cuDNN)
            start = time.perf_counter()
            predict.main(argv)
        rates[name] = args.images / (time.perf_counter() - start)
    report("predict", {"machine": machine(torch.device(args.device)), "settings": {
        "images": args.images, "size": list(args.size), "erp_size": list(args.erp_size), "batch": args.batch_size},
        "images_per_s": rates},
        f"{rates['one_model']:.1f} images/s with one model, {rates[f'{args.folds}_folds']:.1f} with {args.folds} folds' "
        f"models ({width}x{height} JPEG, decode included) [{args.device}]")


if __name__ == "__main__":
    main()
