"""Databases: the registry of known ones, `meta.csv`, and the loaded, validated `Database`.

A database is a folder holding `meta.csv` (columns `image`, `mos`, `ref`; optional `distortion`,
`level`) and optionally `database.json` ({"name", "higher_is_better", "score_range"}). The known
databases (CVIQ, OIQA, IQA-ODI, Synthetic) live under `--data-root` (default `./data`, env
`KDOIQA_DATA`); any other folder with a `meta.csv` works without code changes. A database is
identified by its name, its meta.csv and the sizes and modification times of its image files
(`database_key`), so two databases never share a run or feature folder, even when they share a name
or a copy shares the meta.csv but holds other images.

    python dataset.py info --database OIQA        # validate meta.csv and decode every image
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from kdoiqa.common import UserError
from kdoiqa.viewport.layout import FACE_NAMES

REQUIRED_COLUMNS = ("image", "mos", "ref")
OPTIONAL_COLUMNS = ("distortion", "level")
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
    meta_sha256: str = ""

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

    def faces_dir(self, face_size: int, jpeg_quality: int | None = None) -> Path:
        """`faces_<size>/` (lossless, ours), or `faces_<size>_equi2cubic_jpeg<q>/` (the paper's chain:
        equi2cubic.m's faces through JPEG q). The name says the geometry, so that the JPEG faces written
        before the paper's geometry existed (in `faces_<size>_jpeg<q>/`) are never read."""
        if jpeg_quality is None:
            return self.root / f"faces_{face_size}"
        return self.root / f"faces_{face_size}_equi2cubic_jpeg{jpeg_quality}"

    def face_paths(self, image: str, face_size: int, jpeg_quality: int | None = None) -> list[Path]:
        stem = image_stem(image)
        return [self.faces_dir(face_size, jpeg_quality) / f"{stem}_{face}.png" for face in FACE_NAMES]

    def folds_dir(self) -> Path:
        return self.root / "folds"

    def describe_scores(self) -> str:
        direction = "higher is better" if self.higher_is_better else "higher is worse (DMOS)"
        lo, hi = self.score_range
        return f"{self.name} scores, range {lo:g}-{hi:g}, {direction}"

    def identity(self) -> dict:
        """What names this database in run records and caches."""
        return {"name": self.name, "key": database_key(self), "root": str(self.root), "meta_sha256": self.meta_sha256,
                "files_sha256": self.files_fingerprint}

    @property
    def files_fingerprint(self) -> str:
        """SHA-256 of every image file's path, size and modification time (a stat per file, no reading):
        a copy whose images were re-encoded, or replaced, differs from the original. Copies that keep the
        times (mv, cp -a, rsync -a) keep it."""
        cached = self.__dict__.get("_files_fingerprint")
        if cached is None:
            digest = hashlib.sha256()
            if self.root is not None:
                for image in self.images:
                    try:
                        st = os.stat(Path(self.root) / image)
                        digest.update(f"{image}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
                    except OSError:
                        digest.update(f"{image}\tmissing\n".encode())
            cached = self.__dict__["_files_fingerprint"] = digest.hexdigest()
        return cached


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
        raise UserError(f"{meta_path}: no meta.csv; write one (columns image,mos,ref): see the README's "
                        f"'Databases' section")
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
        hint = ""
        if len(meta.columns) == 1 and any(sep in meta.columns[0] for sep in ";\t"):
            sep = "semicolons" if ";" in meta.columns[0] else "tabs"
            hint = f"; it looks separated by {sep}: meta.csv is comma-separated (save it as CSV with commas)"
        raise UserError(f"{meta_path}: missing column(s) {', '.join(missing)}; found {', '.join(meta.columns)} "
                        f"(expected image,mos,ref[,distortion,level]){hint}")
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


def setup_hint(spec: DatabaseSpec | None, root: Path) -> str:
    """How a registered database comes to exist at `root` (empty for other folders)."""
    if spec is None:
        return ""
    if spec.name == "Synthetic":
        return f"; make it with `python make_synthetic_db.py --out {root}`"
    return (f"; download {spec.name} there (see the README) and run `python dataset.py prepare --database "
            f"{spec.name} --root {root}`, or pass --data-root")


def load_database(database: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                  check_files: bool = True) -> Database:
    """Load and validate a registered database or a folder holding meta.csv."""
    root, spec = resolve_database_root(str(database), data_root)
    if not root.is_dir():
        raise UserError(f"{root}: database folder not found{setup_hint(spec, root)}")
    if spec is not None and not (root / "meta.csv").is_file():
        raise UserError(f"{root / 'meta.csv'}: no meta.csv{setup_hint(spec, root)}")
    meta = read_meta(root / "meta.csv")
    meta_sha256 = hashlib.sha256((root / "meta.csv").read_bytes()).hexdigest()
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
                  registered=spec is not None, info=info, meta_sha256=meta_sha256)
    if check_files:
        check_files_exist(db)
    return db


def database_key(db: Database) -> str:
    """`<name>-<8 hex digits>` of the SHA-256 of meta.csv and of the image files' fingerprint: the run and
    feature folder of a database.

    Two databases never share it, even with one name (two synthetic databases of other seeds, a
    database re-prepared with other scores, a copy whose images were re-encoded); a moved database
    keeps it."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", db.name)
    if not db.meta_sha256:
        return name
    digest = hashlib.sha256(f"{db.meta_sha256}\n{db.files_fingerprint}".encode()).hexdigest()
    return f"{name}-{digest[:8]}"
