"""Pre-resize a database's ERP images to lossless PNGs (the student's input; the paper's 1024x512).

Writes `<db>/erp_<W>x<H>/<stem>.png` for every image of meta.csv with `dataset.resize_rgb`, the
one resize the whole project uses: training from the originals (resized on the fly) and from
these files gives identical pixels. Up-to-date files (newer than their source) are skipped, so a
re-run only redoes what changed. Cube faces are written by `python -m viewport.extract`.

    python img_resize.py --database OIQA                       # data/OIQA/erp_1024x512/...
    python img_resize.py --database data/my_db --erp-size 512x256 --workers 8
    python img_resize.py --database CVIQ --data-root /datasets --force
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import UserError, atomic_path, completed, parse_size, run_cli
from dataset import (
    Database,
    check_files_exist,
    is_two_to_one,
    load_database,
    read_rgb,
    resize_rgb,
)

# ----------------------------------------------------------------------------------------------
# Shared by img_resize.py and viewport/extract.py: derived files beside the database.

@dataclass
class Summary:
    """What a run did, per meta.csv image."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_two_to_one: list[str] = field(default_factory=list)

    def line(self, what: str, where: Path) -> str:
        return (f"{what}: wrote {len(self.written)}, skipped {len(self.skipped)} up to date "
                f"({len(self.written) + len(self.skipped)} images) in {where}")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def write_png(path: Path, pixels: np.ndarray, compress_level: int = 6) -> None:
    """Lossless PNG, written atomically (a killed run never leaves a torn file)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", compress_level=compress_level)


def is_up_to_date(source: Path, outputs: Sequence[Path]) -> bool:
    """All outputs exist and none is older than the source."""
    try:
        src_time = source.stat().st_mtime_ns
        return all(out.stat().st_mtime_ns >= src_time for out in outputs)
    except FileNotFoundError:
        return False


def check_sources(db: Database, outputs_of: dict[str, Sequence[Path]]) -> None:
    """Every source exists and no two images share an output file (e.g. `a.jpg` and `a.png`)."""
    check_files_exist(db)
    owner: dict[Path, str] = {}
    for image, outputs in outputs_of.items():
        for out in outputs:
            if out in owner:
                raise UserError(f"{db.root / 'meta.csv'}: {owner[out]!r} and {image!r} would both write {out}; "
                                f"rename one of them")
            owner[out] = image


def check_readable(db: Database, images: Iterable[str]) -> None:
    """A cheap pass before anything is written: every source opens as an image and its chunks are whole
    (PIL's verify: PNG CRCs and truncation), so a bad file is reported before a half-made output folder."""
    from PIL import Image

    for image in images:
        path = db.path(image)
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds on a bad file
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"{path}: unreadable image ({type(err).__name__}: {detail})") from None


def warn(message: str) -> None:
    """One line on stderr that does not break a running progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def warn_not_two_to_one(path: Path, width: int, height: int) -> None:
    warn(f"{path}: {width}x{height} is not a 2:1 equirectangular image; treated as one anyway")


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or total == 0, dynamic_ncols=True)


def add_database_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", required=True, help="registered name (CVIQ, OIQA, IQA-ODI, Synthetic) "
                        "or a folder holding meta.csv")
    parser.add_argument("--data-root", default=None,
                        help="folder of the registered databases (default ./data or $KDOIQA_DATA)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="threads decoding, resizing and writing images (default: CPU count, at most 8)")
    parser.add_argument("--force", action="store_true", help="rewrite files even when up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_workers(workers: int) -> int:
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    return workers


# ----------------------------------------------------------------------------------------------
# ERP resizing.

def _resize_one(db: Database, image: str, erp_size: tuple[int, int]) -> bool:
    """Decode, resize, write; returns whether the source is 2:1."""
    source = db.path(image)
    pixels = read_rgb(source)
    height, width = pixels.shape[:2]
    two_to_one = is_two_to_one(width, height)
    if not two_to_one:
        warn_not_two_to_one(source, width, height)
    write_png(db.erp_path(image, erp_size), resize_rgb(pixels, erp_size))
    return two_to_one


def plan_outputs(db: Database, outputs: dict[str, list[Path]], force: bool) -> tuple[Summary, list[str]]:
    """Check the sources, skip the images whose outputs are up to date, and return what is left to do."""
    check_sources(db, outputs)
    summary = Summary()
    todo = []
    for image, paths in outputs.items():
        if not force and is_up_to_date(db.path(image), paths):
            summary.skipped.append(image)
        else:
            todo.append(image)
    check_readable(db, todo)
    return summary, todo


def resize_database(db: Database, erp_size: tuple[int, int] = (1024, 512), workers: int | None = None, *,
                    force: bool = False, progress: bool = True, images: Iterable[str] | None = None) -> Summary:
    """Write `db.erp_path(image, erp_size)` for every image (or `images`); skip up-to-date files."""
    erp_size = (int(erp_size[0]), int(erp_size[1]))
    if erp_size[0] < 1 or erp_size[1] < 1:
        raise UserError(f"--erp-size must be positive, got {erp_size[0]}x{erp_size[1]}")
    workers = check_workers(workers or default_workers())
    chosen = list(db.images if images is None else images)
    summary, todo = plan_outputs(db, {image: [db.erp_path(image, erp_size)] for image in chosen}, force)
    bar = progress_bar(len(todo), f"erp_{erp_size[0]}x{erp_size[1]}", progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_resize_one, db, image, erp_size): image for image in todo}
        try:
            for image, two_to_one in completed(futures):
                if not two_to_one:
                    summary.not_two_to_one.append(image)
                summary.written.append(image)
                bar.update(1)
        finally:
            bar.close()
    order = {image: i for i, image in enumerate(chosen)}
    summary.written.sort(key=order.__getitem__)
    summary.not_two_to_one.sort(key=order.__getitem__)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_args(parser)
    parser.add_argument("--erp-size", type=lambda s: parse_size(s, name="--erp-size"), default=(1024, 512),
                        metavar="WxH", help="output size (default 1024x512, the paper's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    db = load_database(args.database, args.data_root, check_files=True)
    summary = resize_database(db, args.erp_size, check_workers(args.workers), force=args.force,
                              progress=not args.no_progress)
    print(summary.line(f"{db.name} ERP {args.erp_size[0]}x{args.erp_size[1]}", db.erp_dir(args.erp_size)))
    return 0


if __name__ == "__main__":
    run_cli(main)
