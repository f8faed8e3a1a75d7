"""Prepare a database, make or import its folds, and check it.

    python dataset.py prepare --database OIQA --root data/OIQA      # 360IQA_MOS.mat found in the folder
    python dataset.py prepare --database CVIQ --root data/CVIQ --score-file path/to/CVIQ.csv
    python dataset.py prepare --database IQA-ODI --root data/IQA-ODI --score-file path/to/IQA-ODI_1080.csv
    python dataset.py folds --database OIQA                         # data/OIQA/folds/k5_seed2023.json
    python dataset.py folds --database OIQA --authors path/to/OIQA/ # folds/authors.json: the paper's folds
    python dataset.py info --database OIQA                          # validate meta.csv, decode every image
    python dataset.py pair --database-train CVIQ --database-test IQA-ODI   # a cross-database pair
"""
from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kdoiqa.cli import Parser, cross_parser, default_threads, positive
from kdoiqa.common import DEFAULT_SEED, UserError, first_line, run_cli
from kdoiqa.databases import REGISTRY, load_database
from kdoiqa.folds import AUTHORS_FILE, default_folds_path, make_folds, write_folds
from kdoiqa.images import read_rgb
from kdoiqa.pairs import load_pair
from kdoiqa.prepare import import_author_folds, prepare


def build_parser() -> Parser:
    parser = Parser(prog="dataset.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    prep = sub.add_parser("prepare", help="write meta.csv from a database's own release or the authors' CSV")
    prep.add_argument("--database", required=True, help=f"one of {', '.join(n for n in REGISTRY if n != 'Synthetic')}")
    prep.add_argument("--root", required=True, type=Path, help="the database folder (holding its images)")
    prep.add_argument("--score-file", type=Path, default=None,
                      help="360IQA_MOS.mat, CVIQ.csv or IQA-ODI_1080.csv, or the folder holding it (default: "
                           "looked for in --root and one folder below)")
    prep.add_argument("--score-kind", choices=("mosz", "mos"), default="mosz",
                      help="OIQA only: MOSz as the paper, or the raw 1-10 MOS")
    prep.add_argument("--with-references", action="store_true",
                      help="OIQA only: keep the 16 reference images (their files must exist)")
    prep.add_argument("--no-check-files", action="store_true", help="write meta.csv even if image files are missing")

    folds = sub.add_parser("folds", help="write the database's content-disjoint split (or import the authors')")
    folds.add_argument("--database", required=True, help="registered name or folder holding meta.csv")
    folds.add_argument("--data-root", default=None, help="folder of the registered databases (default ./data or $KDOIQA_DATA)")
    folds.add_argument("--folds", "--k", dest="folds", type=positive, default=5, help="number of folds")
    folds.add_argument("--split-seed", type=int, default=DEFAULT_SEED, help="seed of the split")
    folds.add_argument("--authors", type=Path, default=None,
                       help="folder with the authors' <DB>_trainc_k.csv / <DB>_testc_k.csv: their exact folds")
    folds.add_argument("--out", type=Path, default=None,
                       help="fold file (default <db>/folds/k<folds>_seed<split-seed>.json, or folds/authors.json)")

    info = sub.add_parser("info", help="validate meta.csv and decode every image, reporting unreadable ones")
    info.add_argument("--database", required=True, help="registered name or folder holding meta.csv")
    info.add_argument("--data-root", default=None, help="folder of the registered databases (default ./data or $KDOIQA_DATA)")
    info.add_argument("--threads", type=positive, default=default_threads(), help="decoding threads")

    sub.add_parser("pair", parents=[cross_parser()], help="describe a cross-database pair (score directions)")
    return parser


def check_images(db, threads: int) -> list[str]:
    """Decode every image of `db`; the unreadable ones as 'path (reason)'."""
    from tqdm import tqdm

    def decode(image: str) -> str | None:
        try:
            read_rgb(db.path(image))
        except UserError as err:
            return first_line(err)
        return None

    bad = []
    with ThreadPoolExecutor(threads) as pool:
        for problem in tqdm(pool.map(decode, db.images), total=len(db), desc="decode", unit="img", leave=False):
            if problem:
                bad.append(problem)
    return bad


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        path = prepare(args.database, args.root, args.score_file, score=args.score_kind,
                       with_references=args.with_references, check_files=not args.no_check_files)
        print(path)
        print(f"next: python dataset.py folds --database {shlex.quote(str(args.root))}")
        print("      (add --authors DIR, the folder of the authors' <DB>_trainc_k.csv files, for the paper's folds)")
    elif args.command == "folds":
        db = load_database(args.database, args.data_root, check_files=False)
        if args.authors is not None:
            fold_set = import_author_folds(db, args.authors)
            out = args.out or db.folds_dir() / AUTHORS_FILE
        else:
            fold_set = make_folds(db, args.folds, args.split_seed)
            out = args.out or default_folds_path(db, args.folds, args.split_seed)
        if out.is_dir():
            raise UserError(f"{out}: is a folder; --out takes a .json file path")
        print(write_folds(fold_set, out))
    elif args.command == "info":
        db = load_database(args.database, args.data_root)
        bad = check_images(db, args.threads)
        refs = db.meta["ref"].nunique()
        lo, hi = db.meta["mos"].min(), db.meta["mos"].max()
        print(f"{db.name}: {len(db)} images of {refs} contents in {db.root}; {db.describe_scores()}; "
              f"observed {lo:.4g}-{hi:.4g}")
        if bad:
            raise UserError(f"{len(bad)} of {len(db)} images unreadable: {'; '.join(bad[:3])}"
                            + (f"; and {len(bad) - 3} more" if len(bad) > 3 else ""))
        print(f"all {len(db)} images decode")
    elif args.command == "pair":
        print(load_pair(args.database_train, args.database_test, args.data_root, check_files=False).describe())


if __name__ == "__main__":
    run_cli(main)
