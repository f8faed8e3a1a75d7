"""Make a small OIQA-style omnidirectional image quality database, for the demo and the tests.

Each content is a procedural 360-degree ERP reference plus 20 distorted versions (JPEG, JPEG2000,
white noise, blur; 5 levels each), scored with a pseudo-MOS computed on the six cube faces
(`--help` and DETAILS below say how). Lossless PNGs; built in a staging folder and moved into
place, meta.csv last, so a failed run leaves no half-written database. The database is named
after its folder (`--name` to choose), so two such databases never share a run or cache folder.

    python make_synthetic_db.py --out data/Synthetic               # 8 contents x 21 images, 512x256
    python make_synthetic_db.py --out data/Synthetic --contents 16 --size 1024x512 --seed 1 --overwrite
    python make_synthetic_db.py --out data/MyPanos --sources ~/panoramas --contents 4   # your panoramas

Output: DIR/images/c00_ref.png, c00_{jpeg,jp2k,wgn,blur}_{1..5}.png, ...; DIR/meta.csv (image, mos,
ref, distortion, level; level 0 = the reference); DIR/database.json (name, score direction, range).
"""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from kdoiqa.cli import Parser, non_negative, positive, size_type
from kdoiqa.common import run_cli
from kdoiqa.synthetic import (
    DETAILS,
    MIN_WIDTH,
    NOISE_MAX,
    ContentJob,
    face_ssim,
    make_content,
    make_database,
    observer_noise,
    render_scene,
    spherical_pad,
    ssim,
    ssim_to_mos,
)

# The generator is kdoiqa.synthetic; its names stay importable from here.
__all__ = ["NOISE_MAX", "ContentJob", "build_parser", "face_ssim", "main", "make_content", "make_database",
           "observer_noise", "render_scene", "spherical_pad", "ssim", "ssim_to_mos"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="make_synthetic_db.py",
        description=__doc__,
        epilog=DETAILS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="database folder to write (created)")
    parser.add_argument("--contents", type=positive, default=8,
                        help="number of reference contents (with --sources: at most this many) [8]")
    parser.add_argument("--size", type=size_type("--size"), default=(512, 256),
                        metavar="WxH", help=f"ERP size, width = 2 x height, width >= {MIN_WIDTH} [512x256]")
    parser.add_argument("--seed", type=non_negative, default=0, help="seed for contents and noise [0]")
    parser.add_argument("--name", default=None,
                        help="the database's name in database.json and in run folders [the --out folder's name]")
    parser.add_argument("--sources", type=Path, default=None,
                        help="folder of your own ERP panoramas to use instead of procedural scenes (any image mode; "
                             "one that is not 2:1 is stretched to 2:1 with a warning) [procedural]")
    parser.add_argument("--workers", type=positive, default=min(4, os.cpu_count() or 1),
                        help="parallel processes (one content each) [min(4, CPUs)]")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing database in --out (its images/, meta.csv, database.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    width, height = args.size
    out: Path = args.out
    # make_content is looked up here, when main runs: a replaced make_synthetic_db.make_content is the one used.
    frame = make_database(out, contents=args.contents, size=args.size, seed=args.seed, name=args.name,
                          sources=args.sources, workers=args.workers, overwrite=args.overwrite, make=make_content)
    count = frame["ref"].nunique()
    mos = frame["mos"].to_numpy()
    print(f"wrote {out}: {count} contents, {len(frame)} images ({width}x{height}), "
          f"MOS {mos.min():.1f}..{mos.max():.1f} (mean {mos.mean():.1f})")
    if count < 2:
        print("note: one content cannot be split into content-disjoint folds; train on a database of two or more "
              "(--contents 2)")
    else:  # as many folds as contents allow (at most the paper's 5); faces of the paper's ratio (1024 -> 256)
        words = ["python", "teacher_train.py", "--database", str(out), "--folds", str(min(5, count))]
        print("next: " + shlex.join(words + (["--face-size", str(width // 4)] if width // 4 < 256 else [])))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main())
