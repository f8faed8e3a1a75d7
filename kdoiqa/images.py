"""Images: decoding, resizing, cube faces, and the Dataset that serves a database's pixels.

Pixels stay uint8 until the model (normalisation happens on the training device). The teacher's
cube faces come from `faces_<size>/` PNGs when present (`python img_resize.py --faces`), else they
are projected from the ERP with the same function (`project_faces`), so both give equal pixels.
"""
from __future__ import annotations

import io
import os
import re
import shlex
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdoiqa.common import UserError
from kdoiqa.databases import Database

if TYPE_CHECKING:
    from PIL import Image

# ----------------------------------------------------------------------------------------------
# The one decoder: every reader of pixels (predict.py and the scorer, training, img_resize.py's
# derived files, make_synthetic_db.py --sources, dataset.py info) goes through `read_rgb`.

EXIF_ORIENTATION = 0x0112
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
HALF_LEVEL = 0.5 / 255  # float values this far outside [0, 1] still round to 0 or 255
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def read_rgb(source: str | os.PathLike | Image.Image) -> np.ndarray:
    """Decode an image file (or an open PIL image) as HxWx3 uint8 RGB, by one rule for every mode.

    - EXIF orientation is applied (the pixels as a viewer shows them); an animated or multi-page
      file gives its first frame; an embedded colour profile is not applied (the values as stored).
    - RGB; L (grey, repeated); 1 (0 or 255); P (its palette); CMYK (PIL's conversion without a
      profile: R = (255 - C)(255 - K)/255, and so on); YCbCr (JFIF), HSV, LAB: PIL's conversion.
    - 16 bits (I;16, I;16B, I;16L, 16-bit RGB/RGBA PNGs) and I (32-bit integers, how PIL opens 16-bit
      grey PNG/PGM/TIFF files): values 0-65535 keep their high byte, v >> 8 (so v * 257 reads as v),
      as Pillow itself decodes 16-bit RGB; I values outside 0-65535 are refused.
    - F (32-bit float): values in [0, 1] (as the scorer's float tensors), times 255, rounded; values
      outside [0, 1] (by more than half an 8-bit level) or not finite are refused.
    - Transparency (RGBA, LA, PA, premultiplied RGBa/La, or P/L/RGB with a transparent colour) is
      composited over white: (c * a + 255 * (255 - a)) / 255, rounded.
    A file that cannot be decoded, or a folder, is one UserError line naming it.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        try:
            return _rgb_of(source, "PIL image")
        except DECODE_ERRORS as err:
            raise UserError(f"PIL image: cannot convert its mode {source.mode} ({type(err).__name__}: "
                            f"{_first(err)})") from None
    path = Path(source)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image file")
    try:
        with Image.open(path) as img:
            return _rgb_of(img, str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as err:
        count = re.search(r"\((\d+) pixels\)", str(err))
        raise UserError(f"{path}: {count.group(1) + ' pixels' if count else 'too many pixels'}, over Pillow's limit "
                        f"of {2 * (Image.MAX_IMAGE_PIXELS or 0)} (its check against decompression bombs); resize it, "
                        f"or raise PIL.Image.MAX_IMAGE_PIXELS in Python if you trust the file") from None
    except DECODE_ERRORS as err:  # PIL's UnidentifiedImageError is an OSError
        raise UserError(f"{path}: unreadable image ({type(err).__name__}: {_first(err)})") from None


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _rgb_of(img: Image.Image, what: str) -> np.ndarray:
    from PIL import ImageOps

    if img.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img)
        if values.dtype.kind == "i":
            low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
            if low < 0 or high > 65535:
                raise UserError(f"{what}: integer pixel values {low}..{high} outside 0-65535 (16-bit); "
                                f"save it as an 8- or 16-bit image")
        return _grey3((values.astype(np.uint32) >> 8).astype(np.uint8))
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        finite = bool(np.isfinite(values).all())
        low, high = (float(np.nanmin(values)), float(np.nanmax(values))) if values.size and finite else (0.0, 0.0)
        if not finite or low < -HALF_LEVEL or high > 1 + HALF_LEVEL:
            shown = f"{low:.4g}..{high:.4g}" if finite else "not all finite"
            raise UserError(f"{what}: float pixel values {shown}, outside [0, 1] (float images are read as 0-1): "
                            f"divide by 255 (or rescale) first")
        return _grey3(np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))
    if mode in ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray((img.convert("LA") if mode == "La" else img).convert("RGBA"))
        return over_white(rgba[..., :3], rgba[..., 3])
    return np.array(img if mode == "RGB" else img.convert("RGB"))


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colours with uint8 alpha composited over white: (c * a + 255 * (255 - a)) / 255, rounded."""
    a = alpha.astype(np.uint32)[..., None]
    return ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize to (width, height); a no-op when already at that size."""
    from PIL import Image

    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return pixels
    return np.array(Image.fromarray(pixels).resize(tuple(size), Image.Resampling.BICUBIC))


def is_two_to_one(width: int, height: int) -> bool:
    """An equirectangular (ERP) panorama is twice as wide as high (within a pixel: odd widths)."""
    return abs(width - 2 * height) <= 1


def not_two_to_one(what: str, width: int, height: int) -> str | None:
    """The one rule for panoramas that are not 2:1, shared by every reader: None when `width`x`height`
    is 2:1, else the message naming it. The commands (predict.py, img_resize.py, make_synthetic_db.py
    --sources) print it as a warning (`warn_not_two_to_one`) and stretch the image to 2:1, as training
    does; the Python scorer refuses such an image unless loaded with require_two_to_one=False, and then
    warns and stretches it the same way."""
    if is_two_to_one(width, height):
        return None
    return f"{what}: {width}x{height} is not a 2:1 equirectangular image"


def warn_not_two_to_one(what: str, width: int, height: int, write: Callable[[str], None] | None = None) -> bool:
    """Print the 2:1 rule's warning line (to stderr, or through `write`) when the image is not 2:1; whether it was."""
    message = not_two_to_one(what, width, height)
    if message is None:
        return False
    line = f"warning: {message}; stretched to 2:1"
    if write is None:
        print(line, file=sys.stderr, flush=True)
    else:
        write(line)
    return True


# ----------------------------------------------------------------------------------------------
# Derived files (`erp_<W>x<H>/`, `faces_<size>/`) stand for their source only while it is unchanged.

STAMP_KEY = "kdoiqa-source"  # a PNG text chunk: the size and modification time of the source it was made from
DERIVED_FOLDER = re.compile(r"erp_\d+x\d+|faces_\d+(_[A-Za-z0-9]+)*")


def is_derived_folder(name: str) -> bool:
    """Whether a folder name is one of the derived folders a database holds (`erp_<W>x<H>`, `faces_<size>`,
    `faces_<size>_<variant>`): copies of its images, never inputs of their own."""
    return DERIVED_FOLDER.fullmatch(name) is not None


def source_stamp(source: str | os.PathLike) -> str:
    """What a derived PNG records of its source (`size=... mtime_ns=...`), taken before the source is read."""
    st = os.stat(source)
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def derived_is_fresh(source: str | os.PathLike, derived: Sequence[Path]) -> bool:
    """Whether the files made from `source` (its resized ERP, or its six faces) may be read instead of it.

    Each must exist and record the size and modification time that the source had when it was made,
    equal to the source's now: a file made from another image, or from this one before it was replaced
    (newer or older, or with the same time but another size), never is. A file written without that
    record (by an earlier version) must not be older than its source. The one check of img_resize.py
    (which rewrites what is not fresh) and of every reader of derived files."""
    from PIL import Image

    try:
        now = source_stamp(source)
        source_time = os.stat(source).st_mtime_ns
        for path in derived:
            with Image.open(path) as img:
                stamp = img.info.get(STAMP_KEY)
            if stamp is None and path.stat().st_mtime_ns < source_time:
                return False
            if stamp is not None and stamp != now:
                return False
    except DECODE_ERRORS:  # missing or unreadable: not usable
        return False
    return bool(derived)


def rebuild_command(db: Database, erp_size: tuple[int, int] | None = None, face_size: int | None = None,
                    jpeg_quality: int | None = None) -> str:
    """The img_resize.py command that (re)writes a database's derived files (quoted to paste)."""
    where = f"--database {shlex.quote(str(db.root))}"
    if face_size is None:
        return f"python img_resize.py {where} --erp-size {erp_size[0]}x{erp_size[1]}"
    quality = f" --face-jpeg-quality {jpeg_quality}" if jpeg_quality is not None else ""
    return f"python img_resize.py --faces {where} --face-size {face_size}{quality}"


def fresh_derived(db: Database, images: Sequence[str], paths_of: Callable[[str], list[Path]], folder: Path,
                  rebuild: str, *, refuse: bool = False) -> set[str]:
    """The images whose derived files are fresh (`derived_is_fresh`). Those present but stale are said in
    one line for the whole run (a warning: the originals are read instead; or with `refuse` a UserError)."""
    fresh, stale = set(), []
    if not folder.is_dir():
        return fresh
    for image in images:
        paths = paths_of(image)
        if not all(p.is_file() for p in paths):
            continue
        if derived_is_fresh(db.path(image), paths):
            fresh.add(image)
        else:
            stale.append(image)
    if stale:
        what = (f"{len(stale)} of {len(images)} images have copies in {folder} older than their source or made "
                f"from another version of it (e.g. {stale[0]})")
        if refuse:
            raise UserError(f"{what}; run `{rebuild}` to rebuild them, or use --faces online")
        from kdoiqa.distributed import DIST

        if DIST.is_main:
            print(f"warning: {what}: reading the originals instead; `{rebuild}` rebuilds them",
                  file=sys.stderr, flush=True)
    return fresh


def to_chw(pixels: np.ndarray):
    """HxWx3 -> a new [3,H,W] tensor (one copy; decoded images are read-only, torch warns on those)."""
    import torch

    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


def load_erp(db: Database, image: str, erp_size: tuple[int, int], derived: bool | None = None) -> np.ndarray:
    """The ERP image at `erp_size`: the pre-resized PNG when it is fresh (`derived_is_fresh`; `derived`
    gives the answer when already known), else the original decoded and resized."""
    cached = db.erp_path(image, erp_size)
    if derived is None:
        derived = derived_is_fresh(db.path(image), [cached])
    if derived:
        pixels = read_rgb(cached)
        if pixels.shape[1::-1] == tuple(erp_size):
            return pixels
    return resize_rgb(read_rgb(db.path(image)), erp_size)


def project_faces(erp, face_size: int, jpeg_quality: int | None = None):
    """The six cube faces [B, 6, 3, s, s] uint8 of ERP images [B, 3, H, W] uint8 (on any device).

    Lossless (ours, the default): py360convert's geometry (`viewport.project.cube_faces`), sampled at
    the native size 8*floor(W/pi/8) and antialiased to `face_size` on the device. With `jpeg_quality`
    (the paper's chain, `--protocol paper`): the paper's own faces at that native size
    (`viewport.equi2cubic`, its equi2cubic.m), each stored as JPEG of that quality and decoded (its
    MATLAB `imwrite(face, '*.jpg')`), then resized to `face_size` with PIL's bicubic filter (its
    img_resize.py)."""
    import torch

    from kdoiqa.viewport.equi2cubic import equi2cubic
    from kdoiqa.viewport.project import cube_faces

    if jpeg_quality is None:
        return cube_faces(erp, face_size, antialias=True)
    native = equi2cubic(erp).cpu()
    out = torch.empty((*native.shape[:3], face_size, face_size), dtype=torch.uint8)
    for b in range(native.shape[0]):
        for f in range(native.shape[1]):
            face = native[b, f].permute(1, 2, 0).numpy()
            out[b, f] = to_chw(resize_rgb(jpeg_roundtrip(face, jpeg_quality), (face_size, face_size)))
    return out.to(erp.device)


def jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """`pixels` encoded as baseline JPEG of `quality` and decoded again, with PIL: libjpeg's standard
    quantisation tables scaled by the quality and 4:2:0 chroma subsampling (libjpeg's defaults). The
    paper's MATLAB `imwrite` used quality 75 (its documented default); its documentation does not say
    which subsampling or tables it writes, so those are libjpeg's defaults, not a verified match."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=int(quality), subsampling="4:2:0")
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.array(img.convert("RGB"))


def load_faces(db: Database, image: str, face_size: int, source: str = "auto",
               jpeg_quality: int | None = None, derived: bool | None = None) -> np.ndarray:
    """Six cube faces [6, size, size, 3] uint8: from `faces_<size>[_jpeg<q>]/` when they are fresh
    (`derived_is_fresh`; `derived` gives the answer when already known), or projected from the ERP."""
    paths = db.face_paths(image, face_size, jpeg_quality)
    if source in ("disk", "auto"):
        if derived is None:
            derived = derived_is_fresh(db.path(image), paths)
        if derived:
            faces = [read_rgb(p) for p in paths]
            return np.stack([resize_rgb(f, (face_size, face_size)) for f in faces])
    if source == "disk":
        rebuild = rebuild_command(db, face_size=face_size, jpeg_quality=jpeg_quality)
        missing = next((p for p in paths if not p.is_file()), None)
        problem = "face file missing" if missing is not None else "face files older than their source"
        raise UserError(f"{missing or paths[0]}: {problem}; run `{rebuild}` or use --faces online")
    erp = to_chw(read_rgb(db.path(image)))[None]
    return project_faces(erp, face_size, jpeg_quality)[0].permute(0, 2, 3, 1).numpy()


class ImageDataset:
    """A torch-style Dataset over some images of a database, returning dicts of tensors.

    `view` is "erp" (the ERP image at `erp_size`, [3,H,W] uint8), "faces" (six cube faces at
    `face_size`, [6,3,s,s] uint8) or "erp_native" (the original ERP, for projecting faces on the
    training device).
    """

    def __init__(self, db: Database, images: Sequence[str], view: str, *, erp_size: tuple[int, int] = (1024, 512),
                 face_size: int = 256, faces_source: str = "auto", jpeg_quality: int | None = None) -> None:
        if view not in ("erp", "faces", "erp_native"):
            raise ValueError(f"view must be 'erp', 'faces' or 'erp_native', got {view!r}")
        self.db, self.images, self.view = db, list(images), view
        self.erp_size, self.face_size, self.faces_source = tuple(erp_size), int(face_size), faces_source
        self.jpeg_quality = jpeg_quality
        # The images whose derived files are fresh; stale ones are said once, here (not per image).
        self.derived: set[str] = set()
        if view == "erp":
            self.derived = fresh_derived(db, self.images, lambda x: [db.erp_path(x, self.erp_size)],
                                         db.erp_dir(self.erp_size), rebuild_command(db, self.erp_size))
        elif view == "faces" and faces_source in ("disk", "auto"):
            self.derived = fresh_derived(db, self.images, lambda x: db.face_paths(x, self.face_size, jpeg_quality),
                                         db.faces_dir(self.face_size, jpeg_quality),
                                         rebuild_command(db, face_size=self.face_size, jpeg_quality=jpeg_quality),
                                         refuse=faces_source == "disk")

    def __len__(self) -> int:
        return len(self.images)

    def load_pixels(self, index: int):
        image = self.images[index]
        if self.view == "erp":
            return to_chw(load_erp(self.db, image, self.erp_size, image in self.derived))
        if self.view == "erp_native":
            return to_chw(read_rgb(self.db.path(image)))
        import torch

        faces = load_faces(self.db, image, self.face_size, self.faces_source, self.jpeg_quality,
                           image in self.derived)
        return torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "image": self.images[index], "pixels": self.load_pixels(index)}
