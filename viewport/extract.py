"""Extract the six cube faces of every image of a database to lossless PNGs (the teacher's input).

Writes `<db>/faces_<size>/<stem>_{F,R,BA,L,T,BO}.png` with `viewport.project.cube_faces(erp,
size, antialias=True)`: the paper's faces (sampled at 8*floor(W/pi/8) pixels, then an
antialiased resize). Images are decoded and the PNGs written by a pool of threads; the
projection runs batched on the device for images that share a size. Up-to-date images (all six
faces newer than the source) are skipped.

    python -m viewport.extract --database OIQA                    # data/OIQA/faces_256/...
    python -m viewport.extract --database data/my_db --size 256 --device cuda --batch-size 16
    python -m viewport.extract --database CVIQ --data-root /datasets --workers 8 --force
"""
from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from common import UserError, resolve_device, run_cli
from dataset import Database, is_two_to_one, load_database, read_rgb
from img_resize import (
    Summary,
    add_database_args,
    check_workers,
    default_workers,
    plan_outputs,
    progress_bar,
    warn_not_two_to_one,
    write_png,
)

# Largest batch (in ERP pixels) sent to the device at once; big panoramas go one at a time.
MAX_BATCH_PIXELS = 64 * 1024 * 1024


def _write_faces(paths: list[Path], faces: np.ndarray) -> None:
    for path, face in zip(paths, faces):
        write_png(path, face)


def extract_database(db: Database, size: int = 256, device: str | None = None, workers: int | None = None, *,
                     batch_size: int = 8, force: bool = False, progress: bool = True,
                     images: Iterable[str] | None = None) -> Summary:
    """Write `db.face_paths(image, size)` for every image (or `images`); skip up-to-date ones."""
    import torch

    from viewport.project import cube_faces

    if size < 1:
        raise UserError(f"--size must be at least 1, got {size}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    workers = check_workers(workers or default_workers())
    dev = resolve_device(None if device in (None, "auto") else str(device))
    chosen = list(db.images if images is None else images)
    outputs = {image: db.face_paths(image, size) for image in chosen}
    summary, todo = plan_outputs(db, outputs, force)

    bar = progress_bar(len(todo), f"faces_{size}", progress)
    pool = ThreadPoolExecutor(max_workers=workers)
    decoding: deque[tuple[str, Future]] = deque()
    writing: deque[Future] = deque()
    pending = iter(todo)
    window = max(2 * workers, batch_size + workers)

    def fill() -> None:
        while len(decoding) < window:
            image = next(pending, None)
            if image is None:
                return
            decoding.append((image, pool.submit(read_rgb, db.path(image))))

    def drain(limit: int) -> None:
        while len(writing) > limit:
            writing.popleft().result()

    def flush(batch: list[tuple[str, np.ndarray]]) -> None:
        if not batch:
            return
        erp = torch.from_numpy(np.stack([pixels for _, pixels in batch])).permute(0, 3, 1, 2)
        with torch.inference_mode():
            faces = cube_faces(erp.to(dev, non_blocking=True), size, antialias=True)  # [B,6,3,s,s] uint8
        faces = faces.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B,6,s,s,3]
        for (image, _), image_faces in zip(batch, faces):
            writing.append(pool.submit(_write_faces, outputs[image], image_faces))
            summary.written.append(image)
        drain(4 * workers)
        bar.update(len(batch))
        batch.clear()

    try:
        batch: list[tuple[str, np.ndarray]] = []
        fill()
        while decoding:
            image, future = decoding.popleft()
            pixels = future.result()
            fill()
            height, width = pixels.shape[:2]
            if not is_two_to_one(width, height):
                warn_not_two_to_one(db.path(image), width, height)
                summary.not_two_to_one.append(image)
            if batch and batch[0][1].shape != pixels.shape:
                flush(batch)
            batch.append((image, pixels))
            limit = max(1, min(batch_size, MAX_BATCH_PIXELS // max(1, height * width)))
            if len(batch) >= limit:
                flush(batch)
        flush(batch)
        drain(0)
    except BaseException:
        for _, future in decoding:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m viewport.extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_args(parser)
    parser.add_argument("--size", type=int, default=256, help="face side in pixels (default 256, the paper's)")
    parser.add_argument("--device", default="auto",
                        help="where the projection runs: auto (cuda when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images projected together when they share a size (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_workers(args.workers)
    db = load_database(args.database, args.data_root, check_files=True)
    summary = extract_database(db, args.size, args.device, args.workers, batch_size=args.batch_size,
                               force=args.force, progress=not args.no_progress)
    print(summary.line(f"{db.name} cube faces {args.size}x{args.size}", db.faces_dir(args.size)))
    return 0


if __name__ == "__main__":
    run_cli(main)
