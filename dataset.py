"""Databases, folds and Dataset classes.

A database is a folder holding `meta.csv` (columns `image`, `mos`, `ref`; optional `distortion`,
`level`) and optionally `database.json` ({"name", "higher_is_better", "score_range"}). The known
databases (CVIQ, OIQA, IQA-ODI, Synthetic) live under `--data-root` (default `./data`, env
`KDOIQA_DATA`); any other folder with a `meta.csv` works without code changes.

    python dataset.py prepare --database OIQA --root data/OIQA --scores path/to/360IQA_MOS.mat
    python dataset.py prepare --database CVIQ --root data/CVIQ --scores path/to/CVIQ.csv
    python dataset.py prepare --database IQA-ODI --root data/IQA-ODI --scores path/to/IQA-ODI_1080.csv
    python dataset.py folds --database OIQA                     # data/OIQA/folds/k5_seed2023.json
    python dataset.py folds --database OIQA --authors path/to/OIQA/   # the paper's exact folds
    python dataset.py info --database data/my_db
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from common import UserError, atomic_write_json, run_cli

REQUIRED_COLUMNS = ("image", "mos", "ref")
OPTIONAL_COLUMNS = ("distortion", "level")
FACE_NAMES = ("F", "R", "BA", "L", "T", "BO")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatabaseSpec:
    """A registered database: its folder under the data root and its score convention."""

    name: str
    folder: str
    higher_is_better: bool
    score_range: tuple[float, float]
    score: str
    source: str


REGISTRY: dict[str, DatabaseSpec] = {
    spec.name: spec
    for spec in (
        DatabaseSpec("CVIQ", "CVIQ", True, (0.0, 100.0), "MOS",
                     "Sun et al., CVIQD2018: 16 references, 528 JPEG/H.264/H.265 images, 4096x2048"),
        DatabaseSpec("OIQA", "OIQA", True, (0.0, 100.0), "MOSz (z-scored MOS, as the paper)",
                     "Duan et al., OIQA 2018: 16 references, 320 JPEG/JP2K/noise/blur images"),
        DatabaseSpec("IQA-ODI", "IQA-ODI", False, (0.0, 100.0), "DMOS (higher is worse)",
                     "Yang et al., IQA-ODI: 120 references, 960 JPEG/projection-impaired images"),
        DatabaseSpec("Synthetic", "Synthetic", True, (0.0, 100.0), "pseudo-MOS",
                     "make_synthetic_db.py: procedural 360-degree scenes"),
    )
}


def default_data_root() -> Path:
    return Path(os.environ.get("KDOIQA_DATA", "data"))


def registry_lookup(name: str) -> DatabaseSpec | None:
    """Case-insensitive lookup that also accepts IQA_ODI / iqaodi spellings."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for spec in REGISTRY.values():
        if re.sub(r"[^a-z0-9]", "", spec.name.lower()) == key:
            return spec
    return None


def image_stem(image: str) -> str:
    """`distorted_images/img1.jpg` -> `distorted_images/img1`: derived files mirror subfolders."""
    return str(PurePosixPath(image).with_suffix(""))


@dataclass
class Database:
    """A loaded, validated database."""

    name: str
    root: Path
    meta: pd.DataFrame
    higher_is_better: bool
    score_range: tuple[float, float]
    registered: bool = False
    info: dict = field(default_factory=dict)

    # -- rows ----------------------------------------------------------------------------------
    @property
    def images(self) -> list[str]:
        return self.meta["image"].tolist()

    def __len__(self) -> int:
        return len(self.meta)

    def scores(self, images: Sequence[str] | None = None) -> np.ndarray:
        if images is None:
            return self.meta["mos"].to_numpy(np.float64)
        return self.meta.set_index("image").loc[list(images), "mos"].to_numpy(np.float64, copy=True)

    def refs(self, images: Sequence[str] | None = None) -> list[str]:
        if images is None:
            return self.meta["ref"].tolist()
        return self.meta.set_index("image").loc[list(images), "ref"].tolist()

    # -- paths ---------------------------------------------------------------------------------
    def path(self, image: str) -> Path:
        return self.root / image

    def erp_dir(self, erp_size: tuple[int, int]) -> Path:
        return self.root / f"erp_{erp_size[0]}x{erp_size[1]}"

    def erp_path(self, image: str, erp_size: tuple[int, int]) -> Path:
        return self.erp_dir(erp_size) / f"{image_stem(image)}.png"

    def faces_dir(self, face_size: int) -> Path:
        return self.root / f"faces_{face_size}"

    def face_paths(self, image: str, face_size: int) -> list[Path]:
        stem = image_stem(image)
        return [self.faces_dir(face_size) / f"{stem}_{face}.png" for face in FACE_NAMES]

    def folds_dir(self) -> Path:
        return self.root / "folds"

    def default_folds_path(self, k: int = 5, seed: int = 2023) -> Path:
        return self.folds_dir() / f"k{k}_seed{seed}.json"

    def describe_scores(self) -> str:
        direction = "higher is better" if self.higher_is_better else "higher is worse (DMOS)"
        lo, hi = self.score_range
        return f"{self.name} scores, range {lo:g}-{hi:g}, {direction}"


def resolve_database_root(database: str, data_root: str | os.PathLike | None = None) -> tuple[Path, DatabaseSpec | None]:
    """A registered name -> (data_root/folder, spec); a folder path -> (path, spec or None)."""
    candidate = Path(database)
    if candidate.is_dir() or (candidate.suffix == "" and ("/" in database or os.sep in database)):
        if not candidate.is_dir():
            raise UserError(f"{database}: no such database folder")
        return candidate, registry_lookup(candidate.name)
    spec = registry_lookup(database)
    if spec is None:
        if candidate.exists() and not candidate.is_dir():
            raise UserError(f"{database}: is a file; --database takes a registered name or a folder holding meta.csv")
        known = ", ".join(REGISTRY)
        raise UserError(f"unknown database {database!r}: use one of {known}, or a folder holding meta.csv")
    root = Path(data_root) if data_root is not None else default_data_root()
    return root / spec.folder, spec


def read_meta(meta_path: Path) -> pd.DataFrame:
    """Read and validate a meta.csv. Every problem is one UserError naming the file and row."""
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: no meta.csv; write one (columns image,mos,ref) or run "
                        f"`python dataset.py prepare --database NAME --root {meta_path.parent} --scores FILE`")
    try:
        meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                           skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"{meta_path}: empty file; expected a header image,mos,ref and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{meta_path}: not a readable CSV ({msg})") from None
    meta.columns = [str(c).strip() for c in meta.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise UserError(f"{meta_path}: missing column(s) {', '.join(missing)}; found {', '.join(meta.columns)} "
                        f"(expected image,mos,ref[,distortion,level])")
    extra = [c for c in meta.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        raise UserError(f"{meta_path}: unexpected column(s) {', '.join(map(repr, extra))}; allowed: "
                        f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
    if meta.empty:
        raise UserError(f"{meta_path}: no rows; expected one row per scored image")
    meta = meta.copy()
    for column in meta.columns:
        meta[column] = meta[column].str.strip()
    for idx, row in enumerate(meta.itertuples(index=False), start=2):  # row 1 is the header
        image, mos, ref = row.image, row.mos, row.ref
        where = f"{meta_path} row {idx}"
        if not image:
            raise UserError(f"{where}: empty image path")
        if image.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", image):
            raise UserError(f"{where}: absolute image path {image!r}; paths must be relative to {meta_path.parent}")
        parts = PurePosixPath(image.replace("\\", "/")).parts
        if ".." in parts:
            raise UserError(f"{where}: image path {image!r} leaves the database folder")
        if PurePosixPath(image).suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{where}: {image!r} is not an image file name ({', '.join(IMAGE_SUFFIXES)})")
        try:
            value = float(mos)
        except ValueError:
            raise UserError(f"{where}: mos {mos!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: mos is {mos!r}; every image needs a finite score")
        if not ref:
            raise UserError(f"{where}: empty ref (content id)")
        if "level" in meta.columns and row.level not in ("",):
            try:
                float(row.level)
            except ValueError:
                raise UserError(f"{where}: level {row.level!r} is not a number") from None
    meta["image"] = meta["image"].str.replace("\\", "/", regex=False)
    dup = meta["image"].duplicated(keep="first")
    if dup.any():
        first = int(np.flatnonzero(dup.to_numpy())[0])
        raise UserError(f"{meta_path} row {first + 2}: duplicate image {meta['image'].iloc[first]!r}")
    meta["mos"] = meta["mos"].astype(np.float64)
    if "level" in meta.columns:
        meta["level"] = pd.to_numeric(meta["level"], errors="coerce")
    return meta.reset_index(drop=True)


def check_files_exist(db: Database, images: Iterable[str] | None = None) -> None:
    missing = [im for im in (db.images if images is None else images) if not db.path(im).is_file()]
    if missing:
        shown = ", ".join(missing[:3])
        raise UserError(f"{db.root / 'meta.csv'}: {len(missing)} image file(s) missing, e.g. {shown}")


def load_database(database: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                  check_files: bool = True) -> Database:
    """Load and validate a registered database or a folder holding meta.csv."""
    root, spec = resolve_database_root(str(database), data_root)
    if not root.is_dir():
        hint = (f"; download {spec.name} and run `python dataset.py prepare --database {spec.name} --root {root} "
                f"--scores FILE`, or pass --data-root" if spec else "")
        raise UserError(f"{root}: database folder not found{hint}")
    meta = read_meta(root / "meta.csv")
    info: dict = {}
    json_path = root / "database.json"
    if json_path.is_file():
        try:
            info = json.loads(json_path.read_text(encoding="utf-8-sig"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise UserError(f"{json_path}: not valid JSON ({err})") from None
    name = str(info.get("name") or (spec.name if spec else root.resolve().name))
    hib = info.get("higher_is_better", spec.higher_is_better if spec else True)
    if not isinstance(hib, bool):
        raise UserError(f"{json_path}: higher_is_better must be true or false, got {hib!r}")
    if "score_range" in info:
        rng = info["score_range"]
        if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(v, (int, float)) for v in rng)
                or rng[0] >= rng[1]):
            raise UserError(f"{json_path}: score_range must be [low, high] with low < high, got {rng!r}")
        score_range = (float(rng[0]), float(rng[1]))
    elif spec is not None:
        score_range = spec.score_range
    else:
        score_range = (float(meta["mos"].min()), float(meta["mos"].max()))
        if score_range[0] == score_range[1]:
            score_range = (score_range[0] - 1.0, score_range[1] + 1.0)
    db = Database(name=name, root=root, meta=meta, higher_is_better=hib, score_range=score_range,
                  registered=spec is not None, info=info)
    if check_files:
        check_files_exist(db)
    return db


def database_key(db: Database) -> str:
    """A file-system-safe name for run and feature folders."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", db.name)


# ----------------------------------------------------------------------------------------------
# Folds: content-disjoint, deterministic from `ref` and the seed, saved as JSON beside the data.

@dataclass
class FoldSplit:
    """One fold: images (as in meta.csv) to train on and to test on."""

    train: list[str]
    test: list[str]


@dataclass
class FoldSet:
    folds: list[FoldSplit]
    source: str
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.folds)

    def to_json(self) -> dict:
        return {"folds": [{"train": f.train, "test": f.test} for f in self.folds], "source": self.source}


def make_folds(db: Database, k: int = 5, seed: int = 2023) -> FoldSet:
    """Split the contents (`ref`) into k groups with a seeded permutation; fold i tests group i."""
    refs = sorted(set(db.meta["ref"]))
    if k < 2:
        raise UserError(f"--k must be at least 2, got {k}")
    if len(refs) < k:
        raise UserError(f"{db.root / 'meta.csv'}: {len(refs)} contents (ref) cannot make {k} content-disjoint folds")
    order = np.random.default_rng(seed).permutation(len(refs))
    groups = np.array_split(np.asarray(refs, dtype=object)[order], k)
    folds = []
    for group in groups:
        test_refs = set(group.tolist())
        is_test = db.meta["ref"].isin(test_refs).to_numpy()
        folds.append(FoldSplit(train=db.meta["image"][~is_test].tolist(), test=db.meta["image"][is_test].tolist()))
    return FoldSet(folds, source=f"dataset.py folds: {k} content-disjoint folds of {db.name}, seed {seed}")


def write_folds(folds: FoldSet, path: Path) -> Path:
    atomic_write_json(path, folds.to_json())
    folds.path = path
    return path


def load_folds(path: str | os.PathLike, db: Database) -> FoldSet:
    """Read a fold file and check it against the database's meta.csv."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such fold file; make one with `python dataset.py folds --database {db.root}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("folds"), list) or not data["folds"]:
        raise UserError(f"{path}: expected {{\"folds\": [{{\"train\": [...], \"test\": [...]}}, ...]}}")
    known = set(db.images)
    ref_of = dict(zip(db.meta["image"], db.meta["ref"]))
    folds = []
    for i, fold in enumerate(data["folds"]):
        if not isinstance(fold, dict) or not all(isinstance(fold.get(key), list) for key in ("train", "test")):
            raise UserError(f"{path}: fold {i} needs lists 'train' and 'test'")
        for key in ("train", "test"):
            bad = [x for x in fold[key] if not isinstance(x, str)]
            if bad:
                raise UserError(f"{path}: fold {i} {key} holds a non-string entry {bad[0]!r}")
            unknown = [x for x in fold[key] if x not in known]
            if unknown:
                raise UserError(f"{path}: fold {i} {key} names {len(unknown)} image(s) not in "
                                f"{db.root / 'meta.csv'}, e.g. {unknown[0]!r}; the fold file belongs to another database")
            if len(set(fold[key])) != len(fold[key]):
                raise UserError(f"{path}: fold {i} {key} lists an image twice")
        if not fold["test"] or not fold["train"]:
            raise UserError(f"{path}: fold {i} has an empty train or test list")
        overlap = set(fold["train"]) & set(fold["test"])
        if overlap:
            raise UserError(f"{path}: fold {i}: {len(overlap)} image(s) both in train and test, e.g. {sorted(overlap)[0]!r}")
        shared = {ref_of[x] for x in fold["train"]} & {ref_of[x] for x in fold["test"]}
        if shared:
            warnings.warn(f"{path}: fold {i} is not content-disjoint ({len(shared)} content(s) in train and test)",
                          stacklevel=2)
        folds.append(FoldSplit(train=list(fold["train"]), test=list(fold["test"])))
    return FoldSet(folds, source=str(data.get("source", "")), path=path)


def resolve_folds(db: Database, folds_file: str | os.PathLike | None, *, k: int = 5, seed: int = 2023) -> FoldSet:
    """`--folds-file` when given; else the database's default fold file, made (and saved) if absent."""
    if folds_file:
        return load_folds(folds_file, db)
    path = db.default_folds_path(k, seed)
    if path.is_file():
        return load_folds(path, db)
    folds = make_folds(db, k, seed)
    write_folds(folds, path)
    print(f"wrote {path} (content-disjoint, seed {seed})", file=sys.stderr)
    return folds


def holdout_validation(db: Database, train: Sequence[str], fraction: float = 0.15,
                       seed: int = 2023) -> tuple[list[str], list[str]]:
    """Hold out ~`fraction` of the training contents (never images of a test content) as validation."""
    ref_of = dict(zip(db.meta["image"], db.meta["ref"]))
    refs = sorted({ref_of[x] for x in train})
    if len(refs) < 2:
        raise UserError("--select val needs at least two training contents to hold one out")
    n_val = min(len(refs) - 1, max(1, round(fraction * len(refs))))
    val_refs = set(np.asarray(refs, dtype=object)[np.random.default_rng(seed).permutation(len(refs))[:n_val]].tolist())
    return ([x for x in train if ref_of[x] not in val_refs], [x for x in train if ref_of[x] in val_refs])


# ----------------------------------------------------------------------------------------------
# Images.

def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image as HxWx3 uint8 RGB (grayscale, RGBA and palette images are converted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: unreadable image ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize to (width, height); a no-op when already at that size."""
    from PIL import Image

    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return pixels
    return np.array(Image.fromarray(pixels).resize(tuple(size), Image.Resampling.BICUBIC))


def is_two_to_one(width: int, height: int) -> bool:
    return abs(width - 2 * height) <= 1


def to_chw(pixels: np.ndarray):
    """HxWx3 -> a new [3,H,W] tensor (one copy; decoded images are read-only, torch warns on those)."""
    import torch

    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


def load_erp(db: Database, image: str, erp_size: tuple[int, int]) -> np.ndarray:
    """The ERP image at `erp_size`: the pre-resized PNG when present, else decoded and resized."""
    cached = db.erp_path(image, erp_size)
    if cached.is_file():
        pixels = read_rgb(cached)
        if pixels.shape[1::-1] == tuple(erp_size):
            return pixels
    return resize_rgb(read_rgb(db.path(image)), erp_size)


def load_faces(db: Database, image: str, face_size: int, source: str = "auto") -> np.ndarray:
    """Six cube faces [6, size, size, 3] uint8: from `faces_<size>/` or extracted from the ERP."""
    paths = db.face_paths(image, face_size)
    if source in ("disk", "auto") and all(p.is_file() for p in paths):
        faces = [read_rgb(p) for p in paths]
        return np.stack([resize_rgb(f, (face_size, face_size)) for f in faces])
    if source == "disk":
        raise UserError(f"{paths[0]}: face file missing; run `python -m viewport.extract --database {db.root} "
                        f"--size {face_size}` or use --faces online")
    from viewport.project import cube_faces

    erp = to_chw(read_rgb(db.path(image)))
    return cube_faces(erp, face_size, antialias=True).permute(0, 2, 3, 1).numpy()


class ImageDataset:
    """A torch-style Dataset over some images of a database, returning dicts of tensors.

    `view` is "erp" (the ERP image at `erp_size`, [3,H,W] uint8) or "faces" (six cube faces at
    `face_size`, [6,3,s,s] uint8). With `features` (name -> [D] tensor) each item also carries
    the cached teacher feature. Images stay uint8 until the model: normalisation happens on the
    device, and uint8 halves nothing but quarters the host-to-device traffic.
    """

    def __init__(self, db: Database, images: Sequence[str], view: str, *, erp_size: tuple[int, int] = (1024, 512),
                 face_size: int = 256, faces_source: str = "auto", features: dict | None = None) -> None:
        if view not in ("erp", "faces", "erp_native"):
            raise ValueError(f"view must be 'erp', 'faces' or 'erp_native', got {view!r}")
        self.db, self.images, self.view = db, list(images), view
        self.erp_size, self.face_size, self.faces_source = tuple(erp_size), int(face_size), faces_source
        self.features = features
        self.mos = db.scores(self.images).astype(np.float32)
        if features is not None:
            missing = [x for x in self.images if x not in features]
            if missing:
                raise UserError(f"teacher features lack {len(missing)} image(s), e.g. {missing[0]!r}")

    def __len__(self) -> int:
        return len(self.images)

    def load_pixels(self, index: int):
        image = self.images[index]
        if self.view == "erp":
            return to_chw(load_erp(self.db, image, self.erp_size))
        if self.view == "erp_native":  # the original ERP, for face extraction on the training device
            return to_chw(read_rgb(self.db.path(image)))
        import torch

        faces = load_faces(self.db, image, self.face_size, self.faces_source)
        return torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, index: int) -> dict:
        import torch

        item = {"index": index, "image": self.images[index], "pixels": self.load_pixels(index),
                "mos": torch.tensor(self.mos[index])}
        if self.features is not None:
            item["teacher_feature"] = self.features[self.images[index]]
        return item


# ----------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="write meta.csv from a database's own release or the authors' CSV")
    prep.add_argument("--database", required=True, help=f"one of {', '.join(n for n in REGISTRY if n != 'Synthetic')}")
    prep.add_argument("--root", required=True, type=Path, help="the database folder (holding its images)")
    prep.add_argument("--scores", type=Path, help="score file (360IQA_MOS.mat, CVIQ.csv, IQA-ODI_1080.csv) "
                      "or the folder holding it; default: look in --root")
    prep.add_argument("--score", choices=("mosz", "mos"), default="mosz",
                      help="OIQA only: MOSz as the paper (default) or the raw 1-10 MOS")
    prep.add_argument("--with-references", action="store_true",
                      help="OIQA only: keep the 16 reference images (their files must exist)")
    prep.add_argument("--no-check-files", action="store_true", help="write meta.csv even if image files are missing")

    folds = sub.add_parser("folds", help="write content-disjoint folds (or import the authors')")
    folds.add_argument("--database", required=True, help="registered name or folder holding meta.csv")
    folds.add_argument("--data-root", default=None, help="where registered databases live (default ./data or $KDOIQA_DATA)")
    folds.add_argument("--k", type=int, default=5)
    folds.add_argument("--seed", type=int, default=2023)
    folds.add_argument("--authors", type=Path, default=None,
                       help="folder with the authors' <DB>_trainc_k.csv / <DB>_testc_k.csv: reproduce their folds")
    folds.add_argument("--out", type=Path, default=None, help="fold file (default <db>/folds/k5_seed2023.json or authors.json)")

    info = sub.add_parser("info", help="validate a database and print a summary")
    info.add_argument("--database", required=True)
    info.add_argument("--data-root", default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        from dataset_prepare import prepare

        path = prepare(args.database, args.root, args.scores, score=args.score,
                       with_references=args.with_references, check_files=not args.no_check_files)
        print(path)
    elif args.command == "folds":
        db = load_database(args.database, args.data_root, check_files=False)
        if args.authors is not None:
            from dataset_prepare import import_author_folds

            fold_set = import_author_folds(db, args.authors)
            out = args.out or db.folds_dir() / "authors.json"
        else:
            fold_set = make_folds(db, args.k, args.seed)
            out = args.out or db.default_folds_path(args.k, args.seed)
        if out.is_dir():
            raise UserError(f"{out}: is a folder; --out takes a .json file path")
        print(write_folds(fold_set, out))
    elif args.command == "info":
        db = load_database(args.database, args.data_root)
        refs = db.meta["ref"].nunique()
        lo, hi = db.meta["mos"].min(), db.meta["mos"].max()
        print(f"{db.name}: {len(db)} images of {refs} contents in {db.root}; {db.describe_scores()}; "
              f"observed {lo:.4g}-{hi:.4g}")


if __name__ == "__main__":
    run_cli(main)
