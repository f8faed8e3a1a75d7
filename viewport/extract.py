"""Extract the six cube faces of every image of a database to PNGs: the teacher's input.

Writes `<db>/faces_<size>/<stem>_{F,R,BA,L,T,BO}.png`: faces sampled at the paper's native size
8*floor(W/pi/8) and antialiased to the face size, lossless. `--protocol paper` (or
`--face-jpeg-quality 75`) writes the paper's MATLAB pipeline instead, to `faces_<size>_jpeg75/`:
native-size faces stored as JPEG of quality 75, then resized with PIL's bicubic filter. The
projection runs batched on the device; up-to-date faces are skipped.

    python -m viewport.extract --database OIQA                         # data/OIQA/faces_256/...
    python -m viewport.extract --database OIQA --protocol paper        # data/OIQA/faces_256_jpeg75/...
    python -m viewport.extract --database data/my_db --face-size 128 --device cuda --batch-size 16
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import Parser, database_parser, default_threads, positive
from common import run_cli
from databases import load_database
from derived_files import extract_database
from settings import PROTOCOLS


def build_parser() -> Parser:
    parser = Parser(prog="python -m viewport.extract", description=__doc__, parents=[database_parser()])
    parser.add_argument("--face-size", type=positive, default=256, help="face side in pixels (the paper's 256)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="ours",
                        help="ours: lossless faces; paper: JPEG-75 faces as its MATLAB script")
    parser.add_argument("--face-jpeg-quality", type=positive, default=None, metavar="N",
                        help="store the native-size faces as JPEG of quality N first (default by --protocol: ours "
                             "lossless, paper 75)")
    parser.add_argument("--device", default="auto", help="where the projection runs: auto (cuda when present), cpu, cuda:1 ...")
    parser.add_argument("--batch-size", type=positive, default=8, help="images projected together when they share a size")
    parser.add_argument("--threads", type=positive, default=default_threads(), help="threads decoding and writing images")
    parser.add_argument("--force", action="store_true", help="rewrite files even when up to date")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quality = args.face_jpeg_quality if args.face_jpeg_quality is not None else PROTOCOLS[args.protocol]["face_jpeg_quality"]
    db = load_database(args.database, args.data_root, check_files=True)
    summary = extract_database(db, args.face_size, args.device, args.threads, jpeg_quality=quality,
                               batch_size=args.batch_size, force=args.force, progress=args.progress)
    where = db.faces_dir(args.face_size, quality)
    print(summary.line(f"{db.name} cube faces {args.face_size}x{args.face_size}", where))
    protocol = " --protocol paper" if args.protocol == "paper" else ""
    print(f"next: python teacher_train.py --database {args.database} --face-size {args.face_size}{protocol}")
    return 0


if __name__ == "__main__":
    run_cli(main)
