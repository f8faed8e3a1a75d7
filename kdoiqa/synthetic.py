"""The synthetic database of the demo and the tests (make_synthetic_db.py is its command line).

Each content is a procedural 360-degree ERP reference (or a panorama of the user's, `sources`) plus 20
distorted versions (JPEG, JPEG2000, white noise, blur; 5 levels each), scored with a pseudo-MOS computed on
the six cube faces (DETAILS says how). Lossless PNGs; built in a staging folder and moved into place, meta.csv
last, so a failed run leaves no half-written database.

    from kdoiqa.synthetic import make_database
    make_database(Path("data/Synthetic"), contents=8, size=(512, 256), seed=0)

Output: DIR/images/c00_ref.png, c00_{jpeg,jp2k,wgn,blur}_{1..5}.png, ...; DIR/meta.csv (image, mos,
ref, distortion, level; level 0 = the reference); DIR/database.json (name, score direction, range).
"""
from __future__ import annotations

import colorsys
import concurrent.futures
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from kdoiqa.common import UserError, atomic_path, atomic_write_csv, completed
from kdoiqa.databases import IMAGE_SUFFIXES
from kdoiqa.images import read_rgb, warn_not_two_to_one

# ----------------------------------------------------------------------------------------------
# Parameters (documented in the module docstring and in database.json).

DISTORTIONS: tuple[str, ...] = ("jpeg", "jp2k", "wgn", "blur")
JPEG_QUALITY: tuple[int, ...] = (30, 15, 8, 5, 2)
JP2K_RATIO: tuple[float, ...] = (40.0, 100.0, 200.0, 400.0, 1000.0)
WGN_SIGMA: tuple[float, ...] = (2.5, 4.5, 6.5, 9.0, 13.0)
BLUR_RADIUS: tuple[float, ...] = (0.9, 1.5, 2.4, 4.0, 8.0)
LEVELS = 5
JP2K_REFERENCE_PIXELS = 512 * 256
MOS_EXPONENT = 6.0
NOISE_MAX = 1.0
MOS_DECIMALS = 3
SOURCE_SUFFIXES = IMAGE_SUFFIXES
MIN_WIDTH = 128
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


DETAILS = """\
Content. Procedural scenes are defined on the sphere, not on the ERP grid: every ERP pixel's
direction (longitude 0 at the centre column, positive to the right; latitude positive up) is
turned into a unit vector and the scene is evaluated on it, so the image is continuous across
the +-180 degree seam and at the poles. A scene is a sky gradient with a sun and clouds above a
slightly tilted horizon, a textured ground (sums of random 3-D sinusoids of the unit vector,
octaves up to a few pixels' wavelength), and 4-9 objects (spherical caps at random directions
with random angular radii; solid, striped, checkered or ringed), with a random palette. The
content of index k depends only on (--seed, k) and --size: numpy Generator seeded [seed, k, 0].

Distortions, levels 1..5 (pixel / PIL units, the same at every --size but for jp2k):

    jpeg  PIL JPEG quality                (30, 15, 8, 5, 2)
    jp2k  PIL JPEG2000 compression ratio  (40.0, 100.0, 200.0, 400.0, 1000.0)
          (quality_mode="rates", 9/7 wavelet; below 512x256 pixels the ratios shrink with the
          pixel count - the same byte budget - since the codestream's fixed overhead leaves
          nothing of a small image at high ratios)
    wgn   white Gaussian noise, sigma     (2.5, 4.5, 6.5, 9.0, 13.0)
          (0..255 units; numpy Generator seeded [seed, k, 1, level])
    blur  PIL GaussianBlur radius (px)    (0.9, 1.5, 2.4, 4.0, 8.0)
          (padded with the image's own continuation across the seam and over the poles, so the
          blurred ERP stays continuous on the sphere)

Pseudo-MOS (higher is better, 0..100). Reference and distorted ERP images are projected onto the
six 90-degree cube faces (F, R, BA, L, T, BO; `viewport.project.cube_faces`, antialiased, face
side = the paper's native size 8 * floor(W / pi / 8), 160 px for a 512 px wide ERP, where a face
centre has the ERP's own resolution) - the viewports an observer in a headset sees, so the
over-sampled polar rows of the ERP count no more than the equator. On each face, SSIM (Wang et
al. 2004: luma Y = 0.299 R + 0.587 G + 0.114 B in 0..255, 11x11 Gaussian window with sigma 1.5,
C1 = (0.01*255)^2, C2 = (0.03*255)^2, mean over the valid region) compares the distorted face
with the reference face; the six are averaged into S, and

    mos = 100 * clip(S, 0, 1) ** 6.0

(the exponent spreads the high SSIM values of mild distortions over the scale), plus a small
seeded "observer noise" on the distorted images: uniform in +-a where
a = min(1.0, 0.45 * the smaller MOS gap to the neighbouring levels of the same content and
distortion, the reference counting as level 0), so it never changes the order within a series.
The reference scores 100. MOS values are rounded to 3 decimals. For procedural contents the
generator checks that MOS strictly decreases with the level in every series (and fails if not);
for --sources it warns.

Deterministic: the same arguments give byte-identical meta.csv and identical images, whatever
--workers is (torch runs single-threaded inside the measure).
"""

DESCRIPTION = (
    "Pseudo-MOS, higher is better, 0..100: reference and distorted ERP are projected onto the six "
    "90-degree cube faces (viewport.project.cube_faces, antialiased, face side 8*floor(W/pi/8)); "
    "per face SSIM on luma (0.299R+0.587G+0.114B, 11x11 Gaussian window sigma 1.5, "
    f"C1=(0.01*255)^2, C2=(0.03*255)^2); S = mean over the 6 faces; mos = 100 * clip(S,0,1)**{MOS_EXPONENT}; "
    f"plus seeded uniform observer noise of amplitude min({NOISE_MAX}, 0.45 * smaller gap to the "
    "neighbouring levels) on distorted images, which keeps MOS strictly decreasing with the level. "
    f"Reference = 100. Distortions: jpeg quality {list(JPEG_QUALITY)}; jp2k compression ratio "
    f"{list(JP2K_RATIO)} (scaled by the pixel count below 512x256); wgn sigma {list(WGN_SIGMA)} "
    f"(0..255); blur PIL GaussianBlur radius {list(BLUR_RADIUS)} with wrap-around padding; "
    "level 5 is the strongest."
)


# ----------------------------------------------------------------------------------------------
# Procedural 360-degree scenes, evaluated on unit vectors.

def erp_directions(width: int, height: int) -> np.ndarray:
    """Unit direction of every ERP pixel centre, [H, W, 3] float64, (x right, y up, z forward).

    Longitude 0 is the centre column, positive to the right; latitude positive up (row 0 = top).
    """
    lon = ((np.arange(width) + 0.5) / width - 0.5) * 2.0 * np.pi
    lat = (0.5 - (np.arange(height) + 0.5) / height) * np.pi
    lon, lat = np.meshgrid(lon, lat)
    return np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)], axis=-1)


def _unit(vec: np.ndarray) -> np.ndarray:
    return vec / np.linalg.norm(vec)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.normal(size=3))


def _perpendicular_basis(axis: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors orthogonal to `axis` and to each other, at a random rotation."""
    helper = _random_unit(rng)
    u = _unit(np.cross(axis, helper))
    return u, np.cross(axis, u)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _color(rng: np.random.Generator, hue: float | None = None, sat: tuple[float, float] = (0.3, 0.9),
           val: tuple[float, float] = (0.3, 0.95)) -> np.ndarray:
    h = rng.random() if hue is None else hue % 1.0
    s = rng.uniform(*sat)
    v = rng.uniform(*val)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _sinusoid_field(dirs: np.ndarray, rng: np.random.Generator, base_freq: float, octaves: int,
                    max_freq: float, per_octave: int = 3) -> np.ndarray:
    """Seamless band-limited texture on the sphere: sums of sin(f * k.v + phase), in [-1, 1] roughly.

    The random draws do not depend on the resolution; octaves above `max_freq` (radians^-1)
    are dropped, so a small image is not aliased.
    """
    total = np.zeros(dirs.shape[:2])
    norm = 0.0
    for octave in range(octaves):
        freq = base_freq * 2.0 ** octave
        amp = 0.78 ** octave
        for _ in range(per_octave):
            k = _random_unit(rng)
            phase = rng.uniform(0, 2 * np.pi)
            jitter = rng.uniform(0.8, 1.25)
            if freq * jitter <= max_freq:
                total += amp * np.sin(freq * jitter * (dirs @ k) + phase)
                norm += amp
    return total / max(norm, 1e-9) * 1.7


def render_scene(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One procedural 360-degree scene as an ERP image, uint8 [H, W, 3]."""
    dirs = erp_directions(width, height)
    pixel = np.pi / height                       # angular size of one pixel
    max_freq = 2.0 * np.pi / (3.0 * pixel)       # shortest wavelength: 3 pixels

    # Palette: random hues for sky, ground and a two-colour ground texture.
    sky_hue = rng.uniform(0.0, 1.0)
    zenith = _color(rng, sky_hue, sat=(0.4, 0.9), val=(0.35, 0.8))
    horizon_col = _color(rng, sky_hue + rng.uniform(-0.15, 0.15), sat=(0.1, 0.5), val=(0.75, 1.0))
    ground_hue = rng.uniform(0.0, 1.0)
    ground_a = _color(rng, ground_hue, sat=(0.3, 0.8), val=(0.25, 0.6))
    ground_b = _color(rng, ground_hue + rng.uniform(0.05, 0.4), sat=(0.2, 0.8), val=(0.4, 0.9))
    sun_col = _color(rng, rng.uniform(0.05, 0.17), sat=(0.0, 0.4), val=(0.95, 1.0))
    cloud_col = _color(rng, sky_hue, sat=(0.0, 0.2), val=(0.85, 1.0))

    # Horizon: the plane orthogonal to a slightly tilted "up".
    tilt = rng.uniform(0.0, math.radians(8.0))
    tilt_dir = rng.uniform(0, 2 * np.pi)
    up = _unit(np.array([math.sin(tilt) * math.cos(tilt_dir), math.cos(tilt),
                         math.sin(tilt) * math.sin(tilt_dir)]))
    elev = np.arcsin(np.clip(dirs @ up, -1.0, 1.0))

    # Sky: gradient, clouds, sun glow and disc.
    t = np.clip(elev / (np.pi / 2), 0.0, 1.0) ** 0.6
    sky = horizon_col * (1 - t)[..., None] + zenith * t[..., None]
    clouds = _sinusoid_field(dirs, rng, base_freq=2.0, octaves=5, max_freq=max_freq)
    cover = rng.uniform(0.1, 0.7)
    cloud_mask = _smoothstep(0.8 - cover, 1.2 - cover, clouds) * np.clip(elev / 0.15, 0, 1)
    sky = sky * (1 - cloud_mask[..., None]) + cloud_col * cloud_mask[..., None]
    sun_axis, _ = _perpendicular_basis(up, rng)
    sun_elev = rng.uniform(math.radians(8), math.radians(65))
    sun = _unit(math.cos(sun_elev) * sun_axis + math.sin(sun_elev) * up)
    sun_dist = np.arccos(np.clip(dirs @ sun, -1.0, 1.0))
    sun_radius = rng.uniform(0.03, 0.08)
    glow = 0.55 * np.exp(-(sun_dist / rng.uniform(0.15, 0.4)) ** 2)
    disc = _smoothstep(sun_radius + pixel, sun_radius - pixel, sun_dist)
    sky = sky + glow[..., None] * sun_col
    sky = sky * (1 - disc[..., None]) + sun_col * disc[..., None]

    # Ground: two colours mixed by a multi-octave texture, darker towards the nadir.
    tex = _sinusoid_field(dirs, rng, base_freq=rng.uniform(3.0, 6.0), octaves=8, max_freq=max_freq)
    mix = np.clip(0.5 + 0.5 * tex, 0.0, 1.0)[..., None]
    ground = ground_a * (1 - mix) + ground_b * mix
    ground = ground * (0.55 + 0.45 * np.clip(1 + elev / (np.pi / 2), 0, 1))[..., None]

    land = _smoothstep(pixel, -pixel, elev)[..., None]
    image = sky * (1 - land) + ground * land

    # Objects: spherical caps at random directions, painted in order.
    for _ in range(int(rng.integers(4, 10))):
        centre = _random_unit(rng)
        radius = rng.uniform(0.08, 0.5)
        u, v = _perpendicular_basis(centre, rng)
        col1 = _color(rng)
        col2 = _color(rng)
        kind = int(rng.choice(4, p=[0.1, 0.3, 0.3, 0.3]))   # 0 solid, 1 stripes, 2 checker, 3 rings
        period_px = rng.uniform(3.0, 14.0)
        freq = 2.0 * np.pi / (period_px * pixel)
        sharp = rng.uniform(1.5, 4.0)
        dist = np.arccos(np.clip(dirs @ centre, -1.0, 1.0))
        mask = _smoothstep(radius + pixel, radius - pixel, dist)
        if not mask.any():
            continue
        if kind == 0:
            pattern = np.zeros_like(dist)
        elif kind == 1:
            pattern = 0.5 + 0.5 * np.tanh(sharp * np.sin(freq * (dirs @ u)))
        elif kind == 2:
            pattern = 0.5 + 0.5 * (np.tanh(sharp * np.sin(freq * (dirs @ u)))
                                   * np.tanh(sharp * np.sin(freq * (dirs @ v))))
        else:
            pattern = 0.5 + 0.5 * np.tanh(sharp * np.sin(freq * dist))
        shade = 1.0 - 0.35 * (dist / radius) ** 2
        obj = (col1 * (1 - pattern)[..., None] + col2 * pattern[..., None]) * shade[..., None]
        image = image * (1 - mask[..., None]) + obj * mask[..., None]

    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Distortions: uint8 [H, W, 3] -> uint8 [H, W, 3], decoded back to pixels.

def _codec_roundtrip(image: np.ndarray, **save: Any) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **save)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return read_rgb(decoded)


def distort_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    return _codec_roundtrip(image, format="JPEG", quality=int(quality))


def jp2k_ratio(ratio: float, width: int, height: int) -> float:
    """The compression ratio used at this size: `ratio` from 512x256 up; for smaller images scaled
    down by the pixel count (the same byte budget), since the codestream's fixed overhead makes
    high ratios meaningless on a few thousand pixels."""
    return max(1.0, ratio * min(1.0, (width * height) / float(JP2K_REFERENCE_PIXELS)))


def distort_jp2k(image: np.ndarray, ratio: float) -> np.ndarray:
    effective = jp2k_ratio(ratio, image.shape[1], image.shape[0])
    return _codec_roundtrip(image, format="JPEG2000", quality_mode="rates", quality_layers=[effective],
                            irreversible=True)


def distort_wgn(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float64) + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def spherical_pad(image: np.ndarray, pad: int) -> np.ndarray:
    """Pad an ERP image by `pad` pixels on every side with its continuation on the sphere.

    Left/right wrap around the +-180 degree seam; above the top row (and below the bottom row)
    lie the rows on the other side of the pole, i.e. mirrored rows shifted by half the width.
    """
    height, width = image.shape[:2]
    pad_v = min(pad, height)
    top = np.roll(image[:pad_v][::-1], width // 2, axis=1)
    bottom = np.roll(image[height - pad_v:][::-1], width // 2, axis=1)
    tall = np.concatenate([top, image, bottom], axis=0)
    pad_h = min(pad, width)
    return np.concatenate([tall[:, width - pad_h:], tall, tall[:, :pad_h]], axis=1)


def distort_blur(image: np.ndarray, radius: float) -> np.ndarray:
    pad = math.ceil(3.0 * radius) + 2
    padded = spherical_pad(image, pad)
    blurred = np.asarray(Image.fromarray(padded).filter(ImageFilter.GaussianBlur(radius)))
    pad_v = min(pad, image.shape[0])
    pad_h = min(pad, image.shape[1])
    return blurred[pad_v:pad_v + image.shape[0], pad_h:pad_h + image.shape[1]].copy()


def distortion_params(name: str) -> tuple[float, ...]:
    return {"jpeg": JPEG_QUALITY, "jp2k": JP2K_RATIO, "wgn": WGN_SIGMA, "blur": BLUR_RADIUS}[name]


def apply_distortion(image: np.ndarray, name: str, level: int, *, seed: int, content: int) -> np.ndarray:
    """Distort `image` with `name` at `level` (1..5, 5 the strongest)."""
    param = distortion_params(name)[level - 1]
    if name == "jpeg":
        return distort_jpeg(image, int(param))
    if name == "jp2k":
        return distort_jp2k(image, param)
    if name == "wgn":
        return distort_wgn(image, param, np.random.default_rng([seed, content, 1, level]))
    if name == "blur":
        return distort_blur(image, param)
    raise ValueError(f"unknown distortion {name!r}")


# ----------------------------------------------------------------------------------------------
# Pseudo-MOS: SSIM on the six cube faces.

def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over the last two axes."""
    half = len(window) // 2
    y = ndimage.correlate1d(x, window, axis=-1, mode="constant")
    y = ndimage.correlate1d(y, window, axis=-2, mode="constant")
    return y[..., half:x.shape[-2] - half, half:x.shape[-1] - half]


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean SSIM over the last two axes of same-shaped luma arrays in 0..255 (any leading axes)."""
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[-2:]}")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    window = _gaussian_window()
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    mu_a = _filter_valid(a, window)
    mu_b = _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a ** 2
    var_b = _filter_valid(b * b, window) - mu_b ** 2
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return smap.mean(axis=(-2, -1))


def face_size_for(width: int) -> int:
    """Cube-face side used by the measure: the paper's native face size 8 * floor(W / pi / 8),
    at which a face centre has the ERP's own resolution (so the measure sees every ERP detail)."""
    from kdoiqa.viewport.project import native_face_size

    return max(SSIM_WINDOW + 5, native_face_size(width))


def cube_face_luma(images: np.ndarray, face_size: int) -> np.ndarray:
    """Luma of the six cube faces of ERP images: uint8 [N, H, W, 3] -> float64 [N, 6, s, s] in 0..255."""
    import torch

    from kdoiqa.viewport.project import cube_faces

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # deterministic whatever the worker count
    try:
        erp = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0
        with torch.no_grad():
            faces = cube_faces(erp, face_size, antialias=True)      # [N, 6, 3, s, s], 0..1
        faces = faces.numpy() * 255.0
    finally:
        torch.set_num_threads(threads)
    return 0.299 * faces[:, :, 0] + 0.587 * faces[:, :, 1] + 0.114 * faces[:, :, 2]


def face_ssim(reference: np.ndarray, distorted: np.ndarray, face_size: int | None = None) -> np.ndarray:
    """Per-face SSIM of distorted ERP images against a reference.

    reference: uint8 [H, W, 3]; distorted: uint8 [H, W, 3] or [N, H, W, 3].
    Returns [6] or [N, 6] in the face order F, R, BA, L, T, BO.
    """
    single = distorted.ndim == 3
    batch = distorted[None] if single else distorted
    size = face_size_for(reference.shape[1]) if face_size is None else face_size
    luma = cube_face_luma(np.concatenate([reference[None], batch]), size)
    scores = ssim(np.broadcast_to(luma[:1], luma[1:].shape), luma[1:])
    return scores[0] if single else scores


def ssim_to_mos(score: np.ndarray | float) -> np.ndarray:
    """The fixed monotone map from mean face SSIM to the 0..100 pseudo-MOS."""
    return 100.0 * np.clip(score, 0.0, 1.0) ** MOS_EXPONENT


def observer_noise(series: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order-preserving noise for one series [reference, level 1, ..., level 5] of MOS values.

    Each distorted value moves by at most a = min(NOISE_MAX, 0.45 * its smaller gap to a
    neighbour), so two neighbours together move less than the gap between them.
    """
    noise = np.zeros_like(series)
    draws = rng.uniform(-1.0, 1.0, size=len(series))
    for i in range(1, len(series)):
        gaps = [abs(series[i] - series[i - 1])]
        if i + 1 < len(series):
            gaps.append(abs(series[i + 1] - series[i]))
        noise[i] = draws[i] * min(NOISE_MAX, 0.45 * min(gaps))
    return noise


# ----------------------------------------------------------------------------------------------
# One content: reference, 20 distortions, PNGs, MOS rows.

@dataclass(frozen=True)
class ContentJob:
    index: int
    seed: int
    width: int
    height: int
    images_dir: str
    source: str | None = None


# What making one content gives: its meta.csv rows and the warnings for the user.
Made = tuple[list[dict[str, Any]], list[str]]


def content_id(index: int) -> str:
    return f"c{index:02d}"


def load_source(path: str, width: int, height: int, warnings: list[str] | None = None) -> np.ndarray:
    """A user panorama as uint8 [H, W, 3] (decoded by `images.read_rgb`: any mode, EXIF orientation),
    resized with LANCZOS. One that is not 2:1 is stretched to 2:1, with the shared rule's warning
    (`images.warn_not_two_to_one`) added to `warnings`."""
    try:
        pixels = read_rgb(path)
    except UserError as err:
        raise UserError(f"cannot read source image: {err}") from None
    warn_not_two_to_one(path, pixels.shape[1], pixels.shape[0], (warnings if warnings is not None else []).append)
    if pixels.shape[1::-1] != (width, height):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS)).copy()
    return pixels


def make_content(job: ContentJob) -> tuple[list[dict[str, Any]], list[str]]:
    """Write one content's 21 PNGs into job.images_dir; return its meta rows (MOS included) and
    warnings for the user (printed by the parent process, below the progress bar)."""
    cid = content_id(job.index)
    warnings: list[str] = []
    if job.source is None:
        reference = render_scene(np.random.default_rng([job.seed, job.index, 0]), job.width, job.height)
    else:
        reference = load_source(job.source, job.width, job.height, warnings)

    names = [f"{cid}_ref.png"]
    images = [reference]
    kinds: list[tuple[str, int]] = [("reference", 0)]
    for name in DISTORTIONS:
        for level in range(1, LEVELS + 1):
            images.append(apply_distortion(reference, name, level, seed=job.seed, content=job.index))
            names.append(f"{cid}_{name}_{level}.png")
            kinds.append((name, level))

    scores = face_ssim(reference, np.stack(images[1:])).mean(axis=1)
    mos = np.concatenate([[100.0], ssim_to_mos(scores)])
    rng = np.random.default_rng([job.seed, job.index, 99])
    for d in range(len(DISTORTIONS)):
        rows = [0] + list(range(1 + d * LEVELS, 1 + (d + 1) * LEVELS))
        series = mos[rows]
        mos[rows] = series + observer_noise(series, rng)
    mos = np.round(np.clip(mos, 0.0, 100.0), MOS_DECIMALS)

    problems = check_monotone(kinds, mos)
    if problems and job.source is None:
        raise RuntimeError(f"pseudo-MOS is not monotone for procedural content {cid}: {problems}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "")
        warnings.append(f"warning: {Path(job.source).name} ({cid}): pseudo-MOS does not strictly decrease "
                        f"with the level: {shown}")

    images_dir = Path(job.images_dir)
    for name, image in zip(names, images):
        Image.fromarray(image).save(images_dir / name, format="PNG")
    rows = [{"image": f"images/{name}", "mos": float(value), "ref": cid, "distortion": kind, "level": level}
            for name, value, (kind, level) in zip(names, mos, kinds)]
    return rows, warnings


def check_monotone(kinds: list[tuple[str, int]], mos: np.ndarray) -> list[str]:
    """Descriptions of every place where MOS does not strictly decrease with the level."""
    problems = []
    for name in DISTORTIONS:
        series = [mos[0]] + [mos[i] for i, (kind, _) in enumerate(kinds) if kind == name]
        for level in range(1, len(series)):
            if not series[level] < series[level - 1]:
                problems.append(f"{name} level {level}: {series[level]:.3f} >= {series[level - 1]:.3f}")
    return problems


def _worker_main(job: ContentJob, make: Callable[[ContentJob], Made] = make_content) -> Made:
    import torch

    torch.set_num_threads(1)
    return make(job)


# ----------------------------------------------------------------------------------------------
# The database: staged, then moved into place.

def list_sources(folder: Path) -> list[Path]:
    if not folder.exists():
        raise UserError(f"--sources {folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"--sources {folder}: is a file, expected a folder of panoramas")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES)
    if not found:
        raise UserError(f"--sources {folder}: no images ({', '.join(SOURCE_SUFFIXES)}) in it")
    return found


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a folder")
    if out.is_dir() and not overwrite:
        if (out / "meta.csv").exists():
            raise UserError(f"--out {out} already holds a database (meta.csv); pass --overwrite to replace it")
        images = out / "images"
        if images.is_dir() and any(images.iterdir()):
            raise UserError(f"--out {out}: {images} is not empty; pass --overwrite to replace it")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {out}: {parent} is a file, expected a folder")


def run_jobs(jobs: list[ContentJob], workers: int, make: Callable[[ContentJob], Made] = make_content) -> list[dict[str, Any]]:
    """Make every content with `make` (in a process pool when workers > 1; `make` then a module-level function),
    with a progress bar."""
    from tqdm import tqdm

    results: dict[int, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(jobs), desc="contents", unit="content", file=sys.stderr)

    def done(index: int, result: tuple[list[dict[str, Any]], list[str]]) -> None:
        results[index] = result[0]
        for line in result[1]:
            bar.write(line, file=sys.stderr)
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                done(job.index, make(job))
        else:
            # spawn, not fork: a forked torch/OpenMP runtime can hang.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
                futures = {pool.submit(_worker_main, job, make): job.index for job in jobs}
                for index, rows in completed(futures):
                    done(index, rows)
    finally:
        bar.close()
    return [row for index in sorted(results) for row in results[index]]


def database_info(out: Path, name: str | None, seed: int, jobs: list[ContentJob], with_sources: bool) -> dict[str, Any]:
    """database.json: the name (default: the folder's), the score direction and range, how it was made."""
    width, height = jobs[0].width, jobs[0].height
    info: dict[str, Any] = {
        "name": name or out.resolve().name,
        "higher_is_better": True,
        "score_range": [0, 100],
        "description": DESCRIPTION,
        "generator": {
            "script": "make_synthetic_db.py",
            "seed": seed,
            "size": [width, height],
            "contents": len(jobs),
            "face_size": face_size_for(width),
            "mos": f"100 * mean_face_ssim ** {MOS_EXPONENT} + observer noise (<= {NOISE_MAX})",
            "distortions": {name: list(distortion_params(name)) for name in DISTORTIONS},
            "level_meaning": {"jpeg": "PIL quality", "jp2k": "compression ratio", "wgn": "sigma (0..255)",
                              "blur": "GaussianBlur radius (px)"},
        },
    }
    if with_sources:
        info["sources"] = {content_id(job.index): Path(job.source).name for job in jobs if job.source}
    return info


def make_database(out: Path, *, contents: int = 8, size: tuple[int, int] = (512, 256), seed: int = 0,
                  name: str | None = None, sources: Path | None = None, workers: int = 1, overwrite: bool = False,
                  make: Callable[[ContentJob], Made] = make_content) -> Any:
    """Write the database into `out` (staged beside it, meta.csv last: a failure leaves no meta.csv) and return
    its meta.csv as a DataFrame. `sources`: a folder of panoramas to use instead of procedural scenes (at most
    `contents` of them); `make`: what makes one content (`make_content`)."""
    out = Path(out)
    width, height = size
    if width != 2 * height:
        raise UserError(f"--size {width}x{height}: an ERP image is twice as wide as high (e.g. 512x256)")
    if width < MIN_WIDTH:
        raise UserError(f"--size {width}x{height}: too small, the width must be at least {MIN_WIDTH}")
    check_output(out, overwrite)
    found = list_sources(Path(sources)) if sources is not None else None
    count = min(contents, len(found)) if found is not None else contents

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)          # mkdtemp makes it 0700; it may become DIR itself
        (staging / "images").mkdir()
        jobs = [ContentJob(index=k, seed=seed, width=width, height=height,
                           images_dir=str(staging / "images"),
                           source=None if found is None else str(found[k])) for k in range(count)]
        rows = run_jobs(jobs, workers, make)

        import pandas as pd

        frame = pd.DataFrame(rows, columns=["image", "mos", "ref", "distortion", "level"])
        info = database_info(out, name, seed, jobs, found is not None)
        if not out.exists():
            # Fresh folder: complete it in staging and rename it into place in one step.
            (staging / "database.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            frame.to_csv(staging / "meta.csv", index=False)
            os.rename(staging, out)
        else:
            install_into(out, staging, frame, info)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    return frame


def install_into(out: Path, staging: Path, frame: Any, info: dict[str, Any]) -> None:
    """Move a staged database into an existing folder: meta.csv goes first and comes back last."""
    (out / "meta.csv").unlink(missing_ok=True)
    images = out / "images"
    if images.exists() or images.is_symlink():
        if images.is_dir() and not images.is_symlink():
            os.rename(images, staging / "old-images")   # removed with the staging folder
        else:
            images.unlink()
    os.rename(staging / "images", images)
    with atomic_path(out / "database.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    atomic_write_csv(out / "meta.csv", frame)
