"""Write a database's `meta.csv` from its own release, and import the authors' fold files
(used by `python dataset.py prepare` and `python dataset.py folds --authors DIR`).

Each parser writes one row per scored image; `level` 1 is always the mildest. What each reads:
* OIQA: `360IQA_MOS.mat` (`MOS` 1-10 and `MOSz`, 336x1): rows 1-320 are `distorted_images/img<i>.*`,
  content `oiqa_c<(i-1)//20>`, 20 per content (JPEG, JPEG2000, noise, blur, 5 levels each); rows
  321-336 the references (kept with `with_references`). Score: MOSz (the paper) or `score="mos"`.
* CVIQ: the authors' `CVIQ.csv` (`path,score`): `<root>/001.png`...`544.png`, content `(id-1)//34`;
  in each block of 34: ids 1-11 JPEG, 12-22 H.264/AVC, 23-33 H.265/HEVC, 34 the reference; `level`
  is the position in the codec's group (1 mildest, 11 strongest: the scores fall with it).
* IQA-ODI: the authors' `IQA-ODI_1080.csv` (`name,score`): `all_ref_test_img/<name>.jpg`, content the
  trailing `<category>_P<n>`; `QF<q>_ERP_...` -> `jpeg_erp`, `QF<q>_<proj>_...` -> `<proj>`, bare
  names -> `reference`; `level` the JPEG quality factor. DMOS 0-100, higher is worse.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from kdoiqa.common import UserError, atomic_write_csv, atomic_write_json
from kdoiqa.databases import IMAGE_SUFFIXES, Database, DatabaseSpec, image_stem, read_meta, registry_lookup
from kdoiqa.folds import FoldSet, FoldSplit

META_COLUMNS = ("image", "mos", "ref", "distortion", "level")


@dataclass
class Parsed:
    """What a parser returns: the rows of meta.csv and the database.json fields it decides."""

    rows: list[dict]
    score: str
    score_range: tuple[float, float]
    layout: str  # where the images are expected, for error messages


@dataclass(frozen=True)
class Preparer:
    """How to find and parse one registered database's score file."""

    score_files: tuple[str, ...]
    parse: Callable[[Path, Path, PrepareOptions], Parsed]


@dataclass(frozen=True)
class PrepareOptions:
    score: str = "mosz"
    with_references: bool = False
    check_files: bool = True


# ----------------------------------------------------------------------------------------------
# Small helpers.

class FolderIndex:
    """Case-insensitive look-up of image files by stem in a folder (listed once)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.by_lower: dict[str, str] = {}
        if folder.is_dir():
            with os.scandir(folder) as entries:
                self.by_lower = {e.name.lower(): e.name for e in entries if e.is_file()}

    def find(self, stem: str, suffixes: Sequence[str] = (".jpg", ".png", ".jpeg", ".bmp", ".tif", ".tiff")) -> str | None:
        for suffix in suffixes:
            name = self.by_lower.get((stem + suffix).lower())
            if name is not None:
                return name
        return None


def _read_two_column_csv(path: Path) -> list[tuple[int, str, float]]:
    """Rows of a headerless `name,score` file as (line number, name, score); malformed -> UserError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file (expected rows `name,score` without a header)") from None
    rows = []
    for number, fields in enumerate(lines, start=1):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) < 2 or not fields[0].strip():
            raise UserError(f"{path} row {number}: expected `name,score`, got {','.join(fields)!r}")
        name, text = fields[0].strip(), fields[1].strip()
        try:
            value = float(text)
        except ValueError:
            hint = " (these files have no header row)" if number == 1 else ""
            raise UserError(f"{path} row {number}: score {text!r} is not a number{hint}") from None
        if not math.isfinite(value):
            raise UserError(f"{path} row {number}: score is {text!r}; every image needs a finite score")
        rows.append((number, name, value))
    if not rows:
        raise UserError(f"{path}: no rows; expected `name,score` lines")
    return rows


def _file_name(path_text: str) -> str:
    """The last component of a path written with / or \\ (the authors' absolute paths)."""
    return re.split(r"[\\/]", path_text.strip())[-1]


def _strip_image_suffix(name: str) -> str:
    suffix = PurePosixPath(name).suffix
    return name[: -len(suffix)] if suffix and suffix.lower() in IMAGE_SUFFIXES else name


def _only_oiqa_options(opts: PrepareOptions, name: str) -> None:
    if opts.with_references:
        raise UserError(f"--with-references is for OIQA only: {name}'s score file lists its references already")
    if opts.score != "mosz":
        raise UserError(f"--score-kind {opts.score} is for OIQA only: {name} has one score per image")


def _expect_count(path: Path, rows: Sequence, expected: int, what: str) -> None:
    if len(rows) != expected:
        raise UserError(f"{path}: {len(rows)} rows, expected {expected} ({what}); is the file complete?")


# ----------------------------------------------------------------------------------------------
# OIQA: its own 360IQA_MOS.mat.

OIQA_DISTORTIONS = ("JPEG", "JPEG2000", "Gaussian noise", "Gaussian blur")
OIQA_REFERENCE_DIRS = ("reference_images", "ref_images")


def _oiqa_array(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise UserError(f"{path}: no array {key!r} (found {found}); expected OIQA's 360IQA_MOS.mat")
    try:
        values = np.asarray(mat[key], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise UserError(f"{path}: array {key!r} is not numeric") from None
    if values.size != 336:
        raise UserError(f"{path}: array {key!r} holds {values.size} values, expected 336 "
                        f"(320 distorted images, then 16 references)")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise UserError(f"{path}: {key} row {bad[0] + 1} is {values[bad[0]]}; every image needs a finite score")
    return values


def parse_oiqa(root: Path, scores: Path, opts: PrepareOptions) -> Parsed:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(scores))
    except NotImplementedError:  # MATLAB v7.3 (HDF5) files
        raise UserError(f"{scores}: a MATLAB v7.3 file; save it with `save(..., '-v7')` or use the original "
                        f"360IQA_MOS.mat") from None
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError) as err:
        raise UserError(f"{scores}: not a readable MATLAB .mat file ({str(err).splitlines()[0] if str(err) else ''})") from None
    key = {"mosz": "MOSz", "mos": "MOS"}.get(opts.score)
    if key is None:
        raise UserError(f"--score-kind must be mosz or mos, got {opts.score!r}")
    values = _oiqa_array(mat, key, scores)
    distorted = FolderIndex(root / "distorted_images")
    rows = []
    for i in range(1, 321):
        name = distorted.find(f"img{i}") or f"img{i}.jpg"
        block = (i - 1) % 20
        rows.append({"image": f"distorted_images/{name}", "mos": float(values[i - 1]), "ref": f"oiqa_c{(i - 1) // 20:02d}",
                     "distortion": OIQA_DISTORTIONS[block // 5], "level": block % 5 + 1})
    if opts.with_references:
        rows += _oiqa_references(root, values)
    if key == "MOSz":
        return Parsed(rows, "MOSz (z-scored MOS, as the paper), higher is better", (0.0, 100.0),
                      "distorted_images/img<i>.jpg|png")
    return Parsed(rows, "MOS (1-10), higher is better", (1.0, 10.0), "distorted_images/img<i>.jpg|png")


def _oiqa_references(root: Path, values: np.ndarray) -> list[dict]:
    """Rows 321-336: the references, named img321..img336 or img1..img16 in reference_images/."""
    for folder in OIQA_REFERENCE_DIRS:
        index = FolderIndex(root / folder)
        for first in (321, 1):
            names = [index.find(f"img{first + j}") for j in range(16)]
            if all(names):
                return [{"image": f"{folder}/{name}", "mos": float(values[320 + j]), "ref": f"oiqa_c{j:02d}",
                         "distortion": "reference", "level": None} for j, name in enumerate(names)]
    raise UserError(f"{root}: --with-references needs the 16 OIQA references as "
                    f"{' or '.join(OIQA_REFERENCE_DIRS)}/img321..img336 (or img1..img16) .jpg/.png; "
                    f"not found (leave out --with-references to use the 320 distorted images, as the paper)")


# ----------------------------------------------------------------------------------------------
# CVIQ: the authors' CVIQ.csv.

CVIQ_GROUPS = ("JPEG", "H.264/AVC", "H.265/HEVC")


def parse_cviq(root: Path, scores: Path, opts: PrepareOptions) -> Parsed:
    _only_oiqa_options(opts, "CVIQ")
    entries = _read_two_column_csv(scores)
    index = FolderIndex(root)
    seen: dict[int, int] = {}
    rows = []
    for number, path_text, value in entries:
        name = _file_name(path_text)
        stem = _strip_image_suffix(name)
        if not stem.isdigit() or not 1 <= int(stem) <= 544:
            raise UserError(f"{scores} row {number}: {path_text!r} is not a CVIQ image (001.png ... 544.png)")
        ident = int(stem)
        if ident in seen:
            raise UserError(f"{scores} row {number}: image {ident:03d} already listed on row {seen[ident]}")
        seen[ident] = number
        image = index.find(f"{ident:03d}") or (name if name != stem else f"{ident:03d}.png")
        position = (ident - 1) % 34  # 0..33
        if position == 33:
            distortion, level = "reference", None
        else:
            distortion, level = CVIQ_GROUPS[position // 11], position % 11 + 1
        rows.append({"image": image, "mos": value, "ref": f"cviq_c{(ident - 1) // 34:02d}",
                     "distortion": distortion, "level": level})
    _expect_count(scores, rows, 544, "CVIQ has 16 references and 528 compressed images")
    return Parsed(rows, "MOS, higher is better", (0.0, 100.0), "001.png ... 544.png in the root folder")


# ----------------------------------------------------------------------------------------------
# IQA-ODI: the authors' IQA-ODI_1080.csv.

IQA_ODI_NAME = re.compile(r"^(?:QF(?P<qf>\d+)_(?P<proj>[A-Za-z]+)_)?(?P<ref>[A-Za-z]+_P\d+)$")


def parse_iqa_odi(root: Path, scores: Path, opts: PrepareOptions) -> Parsed:
    _only_oiqa_options(opts, "IQA-ODI")
    entries = _read_two_column_csv(scores)
    index = FolderIndex(root / "all_ref_test_img")
    seen: dict[str, int] = {}
    rows = []
    for number, path_text, value in entries:
        stem = _strip_image_suffix(_file_name(path_text))
        match = IQA_ODI_NAME.match(stem)
        if match is None:
            raise UserError(f"{scores} row {number}: {path_text!r} is not an IQA-ODI name "
                            f"(like human_P0 or QF5_ERP_human_P0)")
        if stem in seen:
            raise UserError(f"{scores} row {number}: {stem!r} already listed on row {seen[stem]}")
        seen[stem] = number
        if match["qf"] is None:
            distortion, level = "reference", None
        else:
            proj = match["proj"].lower()
            distortion, level = ("jpeg_erp" if proj == "erp" else proj), int(match["qf"])
        image = index.find(stem) or f"{stem}.jpg"
        rows.append({"image": f"all_ref_test_img/{image}", "mos": value, "ref": match["ref"],
                     "distortion": distortion, "level": level})
    _expect_count(scores, rows, 1080, "IQA-ODI has 120 references and 960 impaired images")
    return Parsed(rows, "DMOS (0-100), higher is worse; references score 0", (0.0, 100.0),
                  "all_ref_test_img/<name>.jpg")


# ----------------------------------------------------------------------------------------------
# The table every caller goes through.

PREPARERS: dict[str, Preparer] = {
    "OIQA": Preparer(("360IQA_MOS.mat",), parse_oiqa),
    "CVIQ": Preparer(("CVIQ.csv",), parse_cviq),
    "IQA-ODI": Preparer(("IQA-ODI_1080.csv",), parse_iqa_odi),
}


def preparer_for(database: str, root: Path) -> tuple[DatabaseSpec, Preparer]:
    spec = registry_lookup(database)
    if spec is None or spec.name not in PREPARERS:
        known = ", ".join(PREPARERS)
        extra = (f"; {spec.name} needs no preparation: make it with `python make_synthetic_db.py --out {root}`"
                 if spec is not None else "")
        raise UserError(f"cannot prepare {database!r}: known databases are {known}{extra}; "
                        f"any other database only needs a meta.csv (image,mos,ref)")
    return spec, PREPARERS[spec.name]


def find_score_file(scores: Path | None, root: Path, names: Sequence[str]) -> Path:
    """`scores` if it is a file; else the first of `names` in that folder (default: root) or one below."""
    if scores is not None and not scores.is_dir():
        if not scores.is_file():
            raise UserError(f"{scores}: score file not found")
        return scores
    folder = scores if scores is not None else root
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if folder.is_dir():
        for name in names:
            below = sorted(p for p in folder.glob(f"*/{name}") if p.is_file())
            if below:
                return below[0]
    raise UserError(f"{folder}: no {' or '.join(names)} here or one folder below; pass --score-file FILE")


def prepare(database: str, root: Path, scores: Path | None = None, *, score: str = "mosz",
            with_references: bool = False, check_files: bool = True) -> Path:
    """Write `root/meta.csv` and `root/database.json` for a registered database; return the meta path."""
    root = Path(root)
    spec, preparer = preparer_for(database, root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: is a file; --root takes the database folder")
    if check_files and not root.is_dir():
        raise UserError(f"{root}: no such folder; point --root at the {spec.name} images (or pass --no-check-files)")
    scores = find_score_file(Path(scores) if scores is not None else None, root, preparer.score_files)
    opts = PrepareOptions(score=score, with_references=with_references, check_files=check_files)
    parsed = preparer.parse(root, scores, opts)
    if check_files:
        missing = [row["image"] for row in parsed.rows if not (root / row["image"]).is_file()]
        if missing:
            raise UserError(f"{root}: {len(missing)} of {len(parsed.rows)} {spec.name} image file(s) missing, e.g. "
                            f"{', '.join(missing[:3])} (expected {parsed.layout}); fix --root or pass --no-check-files")
    meta = pd.DataFrame(parsed.rows, columns=list(META_COLUMNS))
    meta["level"] = meta["level"].astype("Int64")
    meta_path = root / "meta.csv"
    atomic_write_csv(meta_path, meta)
    atomic_write_json(root / "database.json", {
        "name": spec.name, "higher_is_better": spec.higher_is_better,
        "score_range": list(parsed.score_range), "score": parsed.score,
        "prepared_from": str(scores),
    })
    read_meta(meta_path)  # what we wrote must pass the same validation every reader applies
    return meta_path


# ----------------------------------------------------------------------------------------------
# The authors' folds.

FOLD_FILE = re.compile(r"^(?P<prefix>.*?)_?(?P<kind>trainc|testc)_(?P<k>\d+)\.csv$", re.IGNORECASE)


def match_key(name: str) -> tuple[str, object]:
    """The key that identifies an image across naming schemes.

    The file stem, case-folded; purely numeric stems and `img<digits>` stems become their integer
    (so the authors' OIQA `001.png` matches OIQA's own `distorted_images/img1.jpg`). Where several
    meta images share a key, the one with the entry's exact stem wins, else the only non-reference.
    """
    stem = _strip_image_suffix(_file_name(name)).lower()
    match = re.fullmatch(r"(?:img)?0*(\d+)", stem)
    if match:
        return ("n", int(match.group(1)))
    return ("s", stem)


def _fold_files(folder: Path, db: Database) -> dict[int, dict[str, Path]]:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; --authors takes the folder holding <DB>_trainc_k.csv / <DB>_testc_k.csv")
    by_prefix: dict[str, dict[int, dict[str, Path]]] = {}
    for path in sorted(folder.iterdir()):
        match = FOLD_FILE.match(path.name)
        if match and path.is_file():
            kind = match["kind"].lower()[:-1]  # train / test
            by_prefix.setdefault(match["prefix"], {}).setdefault(int(match["k"]), {})[kind] = path
    if not by_prefix:
        raise UserError(f"{folder}: no fold files (<prefix>_trainc_<k>.csv and <prefix>_testc_<k>.csv)")
    if len(by_prefix) > 1:
        norm = re.sub(r"[^a-z0-9]", "", db.name.lower())
        chosen = [p for p in by_prefix if re.sub(r"[^a-z0-9]", "", p.lower()) == norm]
        if len(chosen) != 1:
            raise UserError(f"{folder}: fold files of several databases ({', '.join(sorted(by_prefix))}); "
                            f"point --authors at a folder holding only {db.name}'s")
        by_prefix = {chosen[0]: by_prefix[chosen[0]]}
    (prefix, files), = by_prefix.items()
    ks = sorted(files)
    if ks != list(range(1, len(ks) + 1)):
        missing = sorted(set(range(1, max(ks) + 1)) - set(ks))
        raise UserError(f"{folder}: {prefix} fold files for k={', '.join(map(str, missing))} are missing "
                        f"(found k={', '.join(map(str, ks))})")
    for k in ks:
        for kind in ("train", "test"):
            if kind not in files[k]:
                raise UserError(f"{folder}: {prefix}_{kind}c_{k}.csv is missing (its partner exists)")
    if len(ks) < 2:
        raise UserError(f"{folder}: only one fold ({prefix}_trainc_1.csv); cross-validation needs at least two")
    return files


def _disambiguate(entry: str, hits: list[str], db: Database) -> list[str]:
    """Several images share the entry's key (e.g. OIQA `distorted_images/img1` and `reference_images/img1`):
    take the one with exactly the entry's stem, else the only one that is not a reference."""
    if len(hits) < 2:
        return hits
    stem = _strip_image_suffix(_file_name(entry)).lower()
    exact = [h for h in hits if PurePosixPath(image_stem(h)).name.lower() == stem]
    if len(exact) == 1:
        return exact
    if "distortion" in db.meta.columns:
        references = set(db.meta.loc[db.meta["distortion"] == "reference", "image"])
        distorted = [h for h in hits if h not in references]
        if len(distorted) == 1:
            return distorted
    return hits


def _read_fold_file(path: Path, index: dict[tuple[str, object], list[str]], db: Database) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    images: list[str] = []
    seen: dict[str, int] = {}
    for number, fields in enumerate(lines, start=1):
        if not fields or not fields[0].strip():
            if any(f.strip() for f in fields):
                raise UserError(f"{path} row {number}: empty path in the first column")
            continue
        entry = fields[0].strip()
        hits = _disambiguate(entry, index.get(match_key(entry), []), db)
        if len(hits) != 1:
            what = ("matches no image" if not hits
                    else f"matches {len(hits)} images ({', '.join(hits[:3])})")
            raise UserError(f"{path} row {number}: {entry!r} {what} of {db.root / 'meta.csv'}")
        image = hits[0]
        if image in seen:
            raise UserError(f"{path} row {number}: {entry!r} is {image!r} again (first on row {seen[image]})")
        seen[image] = number
        images.append(image)
    if not images:
        raise UserError(f"{path}: no rows")
    return images


def import_author_folds(db: Database, folder: Path) -> FoldSet:
    """The authors' `<prefix>_trainc_k.csv` / `<prefix>_testc_k.csv` (k = 1..K) mapped to meta.csv images."""
    folder = Path(folder)
    files = _fold_files(folder, db)
    index: dict[tuple[str, object], list[str]] = {}
    for image in db.images:
        index.setdefault(match_key(PurePosixPath(image_stem(image)).name), []).append(image)
    folds = []
    for k in sorted(files):
        train = _read_fold_file(files[k]["train"], index, db)
        test = _read_fold_file(files[k]["test"], index, db)
        overlap = sorted(set(train) & set(test))
        if overlap:
            raise UserError(f"{files[k]['test']}: {len(overlap)} image(s) also in {files[k]['train'].name}, "
                            f"e.g. {overlap[0]!r}")
        folds.append(FoldSplit(train=train, test=test))
    return FoldSet(folds, source=f"authors' folds from {folder}")
