"""Pre-compute a database's network inputs once, as lossless PNGs: the student's resized ERP images,
or with --faces the teacher's six cube faces (the paper's img_resize.py and its MATLAB viewport script).

ERP: `<db>/erp_<W>x<H>/<stem>.png`. Faces: `<db>/faces_<size>/<stem>_{F,R,BA,L,T,BO}.png`, ours:
py360convert's geometry sampled at the native size 8*floor(W/pi/8) and antialiased to the face size,
projected batched on the device. `--protocol paper` (or `--face-jpeg-quality 75`) writes the paper's chain
instead, to `faces_<size>_equi2cubic_jpeg75/`: the faces of its equi2cubic.m (viewport/equi2cubic.py) at
the native size, stored as JPEG 75, then resized with PIL's bicubic filter.
Up-to-date files are skipped, so a re-run only redoes what changed. Training reads these files when
present (else it computes the same pixels on the fly).

    python img_resize.py --database OIQA                             # data/OIQA/erp_1024x512/...
    python img_resize.py --database OIQA --faces                     # data/OIQA/faces_256/...
    python img_resize.py --database OIQA --faces --protocol paper    # data/OIQA/faces_256_equi2cubic_jpeg75/...
    python img_resize.py --database data/my_db --erp-size 512x256 --threads 8
"""
from __future__ import annotations

import shlex

from kdoiqa.cli import Parser, database_parser, default_threads, erp_size_type, parse, positive
from kdoiqa.common import UserError, run_cli
from kdoiqa.databases import load_database
from kdoiqa.derived_files import extract_database, resize_database
from kdoiqa.settings import PROTOCOLS

FACE_ONLY = ("face_size", "protocol", "face_jpeg_quality", "device", "batch_size")


def build_parser() -> Parser:
    parser = Parser(description=__doc__, parents=[database_parser()])
    parser.add_argument("--erp-size", type=erp_size_type, default=(1024, 512), metavar="WxH",
                        help="ERP output size, 2:1 (the paper's 1024x512)")
    g = parser.add_argument_group("cube faces (with --faces)")
    g.add_argument("--faces", action="store_true", help="write the six cube faces instead of the resized ERP")
    g.add_argument("--face-size", type=positive, default=256, help="face side in pixels (the paper's 256)")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="ours",
                   help="ours: lossless faces (py360convert's geometry); paper: its equi2cubic.m's faces through JPEG 75")
    g.add_argument("--face-jpeg-quality", type=positive, default=None, metavar="N",
                   help="store the native-size faces as JPEG of quality N first (default by --protocol: ours "
                        "lossless, paper 75)")
    g.add_argument("--device", default="auto", help="where the projection runs: auto (cuda when present), cpu, cuda:1 ...")
    g.add_argument("--batch-size", type=positive, default=8, help="images projected together when they share a size")
    parser.add_argument("--threads", type=positive, default=default_threads(),
                        help="threads decoding, resizing and writing images")
    parser.add_argument("--force", action="store_true", help="rewrite files even when up to date")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, explicit = parse(build_parser(), argv)
    db = load_database(args.database, args.data_root, check_files=True)
    if not args.faces:
        misplaced = sorted(explicit & set(FACE_ONLY))
        if misplaced:
            raise UserError(f"--{misplaced[0].replace('_', '-')} applies to the cube faces: add --faces")
        summary = resize_database(db, args.erp_size, args.threads, force=args.force, progress=args.progress)
        print(summary.line(f"{db.name} ERP {args.erp_size[0]}x{args.erp_size[1]}", db.erp_dir(args.erp_size)))
        print(f"next: python mask_train.py --database {shlex.quote(args.database)} "
              f"--erp-size {args.erp_size[0]}x{args.erp_size[1]}")
        return 0
    if "erp_size" in explicit:
        raise UserError("--erp-size applies to the resized ERP images, not to --faces")
    quality = args.face_jpeg_quality if args.face_jpeg_quality is not None else PROTOCOLS[args.protocol]["face_jpeg_quality"]
    summary = extract_database(db, args.face_size, args.device, args.threads, jpeg_quality=quality,
                               batch_size=args.batch_size, force=args.force, progress=args.progress)
    print(summary.line(f"{db.name} cube faces {args.face_size}x{args.face_size}", db.faces_dir(args.face_size, quality)))
    protocol = " --protocol paper" if args.protocol == "paper" else ""
    print(f"next: python teacher_train.py --database {shlex.quote(args.database)} --face-size {args.face_size}{protocol}")
    return 0


if __name__ == "__main__":
    run_cli(main)
