"""Images: decoding, resizing, cube faces, and the Dataset that serves a database's pixels.

Pixels stay uint8 until the model (normalisation happens on the training device). The teacher's
cube faces come from `faces_<size>/` PNGs when present (`python img_resize.py --faces`), else they
are projected from the ERP with the same function (`project_faces`), so both give equal pixels.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from kdoiqa.common import UserError
from kdoiqa.databases import Database


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


def project_faces(erp, face_size: int, jpeg_quality: int | None = None):
    """The six cube faces [B, 6, 3, s, s] uint8 of ERP images [B, 3, H, W] uint8 (on any device).

    Lossless (ours, the default): py360convert's geometry (`viewport.project.cube_faces`), sampled at
    the native size 8*floor(W/pi/8) and antialiased to `face_size` on the device. With `jpeg_quality`
    (the paper's chain, `--protocol paper`): the paper's own faces at that native size
    (`viewport.equi2cubic`, its equi2cubic.m), each stored as JPEG of that quality and decoded (its
    MATLAB `imwrite(face, '*.jpg')`), then resized to `face_size` with PIL's bicubic filter (its
    img_resize.py)."""
    import torch

    from viewport.equi2cubic import equi2cubic
    from viewport.project import cube_faces

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
               jpeg_quality: int | None = None) -> np.ndarray:
    """Six cube faces [6, size, size, 3] uint8: from `faces_<size>[_jpeg<q>]/` or projected from the ERP."""
    paths = db.face_paths(image, face_size, jpeg_quality)
    if source in ("disk", "auto") and all(p.is_file() for p in paths):
        faces = [read_rgb(p) for p in paths]
        return np.stack([resize_rgb(f, (face_size, face_size)) for f in faces])
    if source == "disk":
        quality = f" --face-jpeg-quality {jpeg_quality}" if jpeg_quality is not None else ""
        raise UserError(f"{paths[0]}: face file missing; run `python img_resize.py --faces --database {db.root} "
                        f"--face-size {face_size}{quality}` or use --faces online")
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

    def __len__(self) -> int:
        return len(self.images)

    def load_pixels(self, index: int):
        image = self.images[index]
        if self.view == "erp":
            return to_chw(load_erp(self.db, image, self.erp_size))
        if self.view == "erp_native":
            return to_chw(read_rgb(self.db.path(image)))
        import torch

        faces = load_faces(self.db, image, self.face_size, self.faces_source, self.jpeg_quality)
        return torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "image": self.images[index], "pixels": self.load_pixels(index)}
