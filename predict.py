"""Score 360-degree (ERP) images with a trained KD-OIQA model.

A student checkpoint needs only the ERP image (resized to its training size); a teacher
checkpoint gets its six cube faces extracted on the fly, on the same device. Any image size and
mode (grayscale, RGBA, palette) is accepted. Prints `image<TAB>score`; the header line states the
scale and direction of the training database's scores.

    python predict.py runs/mask_train/OIQA/<run>/fold0/checkpoint.pt my_panorama.jpg
    python predict.py runs/mask_train/OIQA/<run>/fold0/checkpoint.pt photos/ --csv scores.csv
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import engine
from common import UserError, atomic_write_csv, load_checkpoint, resolve_device, run_cli
from dataset import IMAGE_SUFFIXES, is_two_to_one, read_rgb, resize_rgb, to_chw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a fold<k>/checkpoint.pt of mask_train.py or teacher_train.py")
    parser.add_argument("inputs", nargs="+", type=Path, help="ERP image files or folders (searched recursively)")
    parser.add_argument("--csv", type=Path, default=None, help="also write image,score to this CSV")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="none",
                        help="mixed precision for inference (default none: exact scores)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def collect_images(inputs: list[Path]) -> list[Path]:
    images: list[Path] = []
    for item in inputs:
        if item.is_dir():
            # Hidden files are skipped: `.name.*.tmp.png` are temporaries of an interrupted atomic write.
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise UserError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    return images


def prepared_pixels(path: Path, kind: str, erp_size: tuple[int, int], face_size: int) -> torch.Tensor:
    """The model's input for one image: the resized ERP [3,H,W] or the full-resolution ERP for faces."""
    pixels = read_rgb(path)
    height, width = pixels.shape[:2]
    if not is_two_to_one(width, height):
        print(f"warning: {path}: {width}x{height} is not a 2:1 equirectangular image; scoring it anyway",
              file=sys.stderr)
    if kind == "student":
        return to_chw(resize_rgb(pixels, erp_size))
    return to_chw(pixels)


def batches(paths: list[Path], batch_size: int, load, workers: int) -> Iterator[tuple[list[Path], list[torch.Tensor]]]:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            yield chunk, list(pool.map(load, chunk))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.csv is not None:  # checked before any work: a bad --csv leaves nothing half-done
        if args.csv.is_dir():
            raise UserError(f"{args.csv}: is a folder; --csv takes a file path")
        blocking = next((p for p in args.csv.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise UserError(f"{blocking}: is a file, so --csv {args.csv} cannot be written")
    ckpt = load_checkpoint(args.checkpoint)
    kind = ckpt.get("kind")
    if kind not in ("student", "teacher"):
        raise UserError(f"{args.checkpoint}: unknown model kind {kind!r}")
    paths = collect_images(args.inputs)
    device = resolve_device(args.device)
    model = engine.model_from_checkpoint(ckpt, args.checkpoint).to(device).eval()
    train_args = ckpt["args"]
    erp_size = tuple(train_args.get("erp_size", (1024, 512)))
    face_size = int(train_args.get("face_size", 256))
    scale = ckpt.get("target_scale", {"offset": 0.0, "scale": 1.0})
    autocast = engine.autocast_for(argparse.Namespace(amp=args.amp), device)
    database = ckpt.get("database", {})

    from tqdm import tqdm

    from viewport.project import cube_faces

    scores = []
    with torch.no_grad(), tqdm(total=len(paths), unit="img", disable=args.no_progress, file=sys.stderr) as bar:
        load = lambda p: prepared_pixels(p, kind, erp_size, face_size)  # noqa: E731
        for _chunk, pixels in batches(paths, args.batch_size, load, args.workers):
            if kind == "student":
                inputs = torch.stack(pixels).to(device)
            else:  # sizes differ: faces per image, on the device, then one batch
                inputs = torch.stack([cube_faces(p.to(device), face_size, antialias=True) for p in pixels])
            with autocast():
                out = model(inputs)[0].float().cpu().numpy()
            scores.append(out * scale["scale"] + scale["offset"])
            bar.update(len(pixels))
    values = np.concatenate(scores).astype(np.float64)
    direction = "higher is better" if database.get("higher_is_better", True) else "higher is worse (DMOS)"
    lo, hi = database.get("score_range", [float("nan"), float("nan")])
    print(f"# {kind} trained on {database.get('name', '?')}: scores on its scale {lo:g}-{hi:g}, {direction}")
    for path, value in zip(paths, values):
        print(f"{path}\t{value:.4f}")
    if args.csv is not None:
        atomic_write_csv(args.csv, pd.DataFrame({"image": [str(p) for p in paths], "score": values}))


if __name__ == "__main__":
    run_cli(main)
