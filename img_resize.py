"""Pre-resize a database's ERP images to lossless PNGs: the student's input (the paper's 1024x512).

Writes `<db>/erp_<W>x<H>/<stem>.png` for every image of meta.csv; up-to-date files are skipped,
so a re-run only redoes what changed. Training reads these files when present (else it resizes
the originals with the same function: identical pixels). Cube faces: `python -m viewport.extract`.

    python img_resize.py --database OIQA                       # data/OIQA/erp_1024x512/...
    python img_resize.py --database data/my_db --erp-size 512x256 --threads 8
"""
from __future__ import annotations

from cli import Parser, database_parser, default_threads, erp_size_type, positive
from common import run_cli
from databases import load_database
from derived_files import resize_database


def build_parser() -> Parser:
    parser = Parser(description=__doc__, parents=[database_parser()])
    parser.add_argument("--erp-size", type=erp_size_type, default=(1024, 512), metavar="WxH",
                        help="output size, 2:1 (the paper's 1024x512)")
    parser.add_argument("--threads", type=positive, default=default_threads(),
                        help="threads decoding, resizing and writing images")
    parser.add_argument("--force", action="store_true", help="rewrite files even when up to date")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    db = load_database(args.database, args.data_root, check_files=True)
    summary = resize_database(db, args.erp_size, args.threads, force=args.force, progress=args.progress)
    print(summary.line(f"{db.name} ERP {args.erp_size[0]}x{args.erp_size[1]}", db.erp_dir(args.erp_size)))
    print(f"next: python mask_train.py --database {args.database} --erp-size {args.erp_size[0]}x{args.erp_size[1]}")
    return 0


if __name__ == "__main__":
    run_cli(main)
