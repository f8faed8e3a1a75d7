"""Equirectangular (ERP) tensors to rectilinear viewports with one batched ``grid_sample``: ours.

Conventions (py360convert's, and the paper's face order and orientation): longitude 0 is the ERP
centre column, positive to the right; latitude positive up; output row 0 is the top of the view. Cube
faces come in the order F, R, BA, L, T, BO = (lon, lat) (0, 0), (90, 0), (180, 0), (-90, 0), (0, 90),
(0, -90), 90 degrees.

The geometry is py360convert's, not the paper's: ``antialias=False`` equals ``py360convert.e2p``
(bilinear) up to float rounding, including its one-pixel padding across the +-180 degree seam and over
the poles (recomputed from four wrapped taps, without copying the ERP). ``antialias=True`` samples that
geometry at the native size (8 * floor(W / pi / 8) for a 90-degree face, the paper's face size), then
downscales with ``F.interpolate(antialias=True)``. The paper's own faces (its equi2cubic.m: an
asymmetric grid, lookup tables, the seam clamped) are `viewport.equi2cubic`; the two differ by
about 32 dB PSNR on the side faces and 23-24 dB on T and BO (README, "Two protocols"). Large batches
are processed in chunks of bounded memory; grids are cached per geometry, dtype and device. Accuracy
against py360convert and speed: benchmarks/NOTES.md (tests/test_viewport.py holds the tolerances).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdoiqa.viewport.layout import FACE_CENTERS_DEG, FACE_NAMES

__all__ = [
    "FACE_CENTERS_DEG",
    "FACE_NAMES",
    "clear_cache",
    "cube_faces",
    "extract",
    "native_face_size",
    "native_size",
]

Size = int | Sequence[int]
Fov = float | Sequence[float]

_CACHE_MAX = 32
# Largest intermediate (in elements) one chunk of the batch may allocate: the float32 copy of
# uint8 / half inputs plus the sampled viewports (at native size when antialiasing).
_CHUNK_ELEMS = {"cpu": 1 << 26, "cuda": 1 << 28}


# ----------------------------------------------------------------------------------------------
# Argument parsing.

def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"viewport size must be positive, got {size!r}")
    return h, w


def _fov_rad(fov_deg: Fov) -> tuple[float, float]:
    """(h_fov, v_fov) in radians; a scalar is used for both axes, as py360convert does."""
    if isinstance(fov_deg, (int, float, np.integer, np.floating)):
        h_fov = v_fov = float(fov_deg)
    else:
        h_fov, v_fov = (float(v) for v in fov_deg)
    for f in (h_fov, v_fov):
        if not 0.0 < f < 180.0:
            raise ValueError(f"field of view must be in (0, 180) degrees, got {fov_deg!r}")
    return math.radians(h_fov), math.radians(v_fov)


def _centers(centers_deg: Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    out = tuple((float(c[0]), float(c[1])) for c in centers_deg)
    if not out:
        raise ValueError("centers_deg is empty: give at least one (lon, lat) pair")
    return out


def _rolls(roll_deg: float | Sequence[float], n: int) -> tuple[float, ...]:
    if isinstance(roll_deg, (int, float, np.integer, np.floating)):
        return (float(roll_deg),) * n
    out = tuple(float(r) for r in roll_deg)
    if len(out) != n:
        raise ValueError(f"roll_deg has {len(out)} values for {n} centres")
    return out


def native_face_size(width: int) -> int:
    """The paper's native cube-face size for an ERP `width` pixels wide: ``8 * floor(W / pi / 8)``."""
    return 8 * math.floor(width / math.pi / 8)


def native_size(width: int, fov_deg: Fov, size: Size) -> tuple[int, int]:
    """(h, w) at which `extract(..., antialias=True)` samples before its antialiased resize.

    Per axis: ``8 * floor(W * tan(fov / 2) / pi / 8)`` (the paper's rule, which is
    `native_face_size` for 90 degrees), or the requested size where that is not larger.
    """
    h, w = _hw(size)
    h_fov, v_fov = _fov_rad(fov_deg)

    def one(fov: float, n: int) -> int:
        n0 = 8 * math.floor(width * math.tan(fov / 2) / math.pi / 8)
        return max(n0, n)

    return one(v_fov, h), one(h_fov, w)


# ----------------------------------------------------------------------------------------------
# Sampling grids (float64 numpy, then cached on the device in the compute dtype).

def _rotation(angle: float, axis: np.ndarray) -> np.ndarray:
    """Active rotation by `angle` (rad) about unit `axis` (Rodrigues; = scipy from_rotvec)."""
    a = np.asarray(axis, dtype=np.float64)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return math.cos(angle) * np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * np.outer(a, a)


def _erp_coords(h_fov: float, v_fov: float, lon_deg: float, lat_deg: float, roll_deg: float,
                out_h: int, out_w: int, in_h: int, in_w: int) -> tuple[np.ndarray, np.ndarray]:
    """ERP pixel coordinates (x, y), pixel centres at integers, of one viewport (py360convert's maths)."""
    x_max, y_max = math.tan(h_fov / 2), math.tan(v_fov / 2)
    xs = np.linspace(-x_max, x_max, num=out_w)
    ys = np.linspace(-y_max, y_max, num=out_h)
    pts = np.ones((out_h, out_w, 3))
    pts[..., 0] = xs[None, :]
    pts[..., 1] = -ys[:, None]
    u = -math.radians(lon_deg)
    v = math.radians(lat_deg)
    rx = _rotation(v, np.array([1.0, 0.0, 0.0]))
    ry = _rotation(u, np.array([0.0, 1.0, 0.0]))
    ri = _rotation(math.radians(roll_deg), np.array([0.0, 0.0, 1.0]) @ rx @ ry)
    xyz = pts @ (rx @ ry @ ri)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lon = np.arctan2(x, z)
    lat = np.arctan2(y, np.hypot(x, z))
    coor_x = (lon / (2 * np.pi) + 0.5) * in_w - 0.5
    coor_y = (-lat / np.pi + 0.5) * in_h - 0.5
    return coor_x, coor_y


@dataclass(frozen=True)
class _Grid:
    grid: torch.Tensor   # [1, N*h, w, 2] normalised for align_corners=False
    index: torch.Tensor  # [M] flat output positions (over N*h*w) needing the wrapped taps
    tap_rows: torch.Tensor  # [M, 4] ERP rows of the four taps
    tap_cols: torch.Tensor  # [M, 4] ERP columns of the four taps
    weights: torch.Tensor  # [M, 4] bilinear weights


_cache: OrderedDict[tuple, _Grid] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Drop every cached sampling grid."""
    with _cache_lock:
        _cache.clear()


def _build_grid(in_h: int, in_w: int, out_h: int, out_w: int, centers: tuple[tuple[float, float], ...],
                fov: tuple[float, float], rolls: tuple[float, ...], dtype: torch.dtype,
                device: torch.device) -> _Grid:
    cxs, cys = [], []
    for (lon, lat), roll in zip(centers, rolls):
        cx, cy = _erp_coords(fov[0], fov[1], lon, lat, roll, out_h, out_w, in_h, in_w)
        cxs.append(cx)
        cys.append(cy)
    cx = np.concatenate(cxs, 0)  # [N*h, w]
    cy = np.concatenate(cys, 0)
    grid = np.stack([(2 * cx + 1) / in_w - 1, (2 * cy + 1) / in_h - 1], -1)[None]

    # Output pixels whose bilinear footprint leaves the image: four taps on the virtual padded
    # ERP (wrapped columns; rows -1 and H are the pole rows rolled by W // 2), mapped to pixels.
    fx, fy = cx.ravel(), cy.ravel()
    edge = np.flatnonzero((fx < 0) | (fx > in_w - 1) | (fy < 0) | (fy > in_h - 1))
    ex, ey = fx[edge], fy[edge]
    x0, y0 = np.floor(ex), np.floor(ey)
    ax, ay = ex - x0, ey - y0
    rows, cols, weights = [], [], []
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            r = (y0 + dy).astype(np.int64)
            c = (x0 + dx).astype(np.int64)
            beyond_pole = (r < 0) | (r > in_h - 1)
            rows.append(np.clip(r, 0, in_h - 1))
            cols.append(np.where(beyond_pole, c - in_w // 2, c) % in_w)
            weights.append(wy * wx)
    return _Grid(
        grid=torch.from_numpy(grid).to(device=device, dtype=dtype).contiguous(),
        index=torch.from_numpy(edge.astype(np.int64)).to(device),
        tap_rows=torch.from_numpy(np.stack(rows, -1).reshape(-1, 4)).to(device),
        tap_cols=torch.from_numpy(np.stack(cols, -1).reshape(-1, 4)).to(device),
        weights=torch.from_numpy(np.stack(weights, -1).reshape(-1, 4)).to(device=device, dtype=dtype),
    )


def _get_grid(in_h: int, in_w: int, out_h: int, out_w: int, centers: tuple[tuple[float, float], ...],
              fov: tuple[float, float], rolls: tuple[float, ...], dtype: torch.dtype,
              device: torch.device) -> _Grid:
    key = (in_h, in_w, out_h, out_w, centers, fov, rolls, dtype, str(device))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    # Cached grids outlive the caller's mode: built under inference_mode they would be inference
    # tensors, which a later projection with gradients may not use.
    with torch.inference_mode(False):
        built = _build_grid(in_h, in_w, out_h, out_w, centers, fov, rolls, dtype, device)
    with _cache_lock:
        _cache[key] = built
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
    return built


# ----------------------------------------------------------------------------------------------
# Sampling.

def _cpu_groups(rows: int) -> int:
    """How many pieces to cut the grid into on CPU: grid_sample parallelises over the batch only."""
    target = 4 * max(1, torch.get_num_threads())
    if target <= 1:
        return 1
    best = 1
    for g in range(1, min(rows, target) + 1):
        if rows % g == 0:
            best = g
    return best


def _sample(src: torch.Tensor, g: _Grid, n: int, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear viewports of `src` [B, C, H, W] (compute dtype, any strides) -> [B, C, N * h * w]."""
    b, c, in_h, in_w = src.shape
    rows = n * out_h
    if src.device.type == "cpu" and (b == 1 or src.is_contiguous()):
        # CPU grid_sample parallelises over its batch dimension only: fold the images into the
        # channels (one coordinate computation serves all of them), and cut the grid into
        # `groups` pieces that share the input through a stride-0 batch (no copy).
        flat = src if b == 1 else src.reshape(1, b * c, in_h, in_w)
        groups = _cpu_groups(rows)
        grid = g.grid.reshape(groups, rows // groups, out_w, 2)
        out = F.grid_sample(flat.expand(groups, b * c, in_h, in_w), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)  # [G, B*C, rows/G, w]
        if groups > 1:
            out = out.permute(1, 0, 2, 3)
        out = out.reshape(b, c, rows * out_w)
    else:
        grid = g.grid.reshape(1, rows, out_w, 2).expand(b, rows, out_w, 2)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False).reshape(b, c, rows * out_w)
    if g.index.numel():
        taps = src[:, :, g.tap_rows, g.tap_cols]  # [B, C, M, 4]
        out[:, :, g.index] = (taps * g.weights).sum(-1)
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def extract(erp: torch.Tensor, centers_deg: Sequence[Sequence[float]], fov_deg: Fov, size: Size,
            roll_deg: float | Sequence[float] = 0.0, antialias: bool = True) -> torch.Tensor:
    """Rectilinear viewports of ERP images.

    Args:
        erp: [B, 3, H, W] or [3, H, W] (any channel count works), float of any dtype (values as
            given) or uint8, on any device.
        centers_deg: (lon, lat) pairs in degrees: lon positive to the right of the ERP centre
            column, lat positive up.
        fov_deg: field of view in degrees, a scalar (used for both axes, as py360convert does,
            also for non-square sizes) or (h_fov, v_fov); each in (0, 180).
        size: output size, int (square) or (h, w).
        roll_deg: in-plane rotation in degrees (py360convert's ``in_rot_deg``), one value or one
            per centre.
        antialias: sample at the native resolution (the paper's face size rule) and downscale with
            an antialiased bilinear resize (ours); False samples the output grid directly
            (= ``py360convert.e2p``).

    Returns:
        [B, N, C, h, w] (or [N, C, h, w] for unbatched input), dtype of `erp`; uint8 results are
        rounded and clamped to 0..255. Row 0 is the top of each view.
    """
    if not isinstance(erp, torch.Tensor):
        raise TypeError(f"erp must be a torch.Tensor, got {type(erp).__name__}")
    if erp.dim() not in (3, 4):
        raise ValueError(f"erp must be [B, C, H, W] or [C, H, W], got shape {tuple(erp.shape)}")
    if erp.dtype != torch.uint8 and not erp.is_floating_point():
        raise TypeError(f"erp must be uint8 or floating point, got {erp.dtype}")
    unbatched = erp.dim() == 3
    x = erp.unsqueeze(0) if unbatched else erp
    b, c, in_h, in_w = x.shape
    if in_h < 2 or in_w < 2:
        raise ValueError(f"ERP image too small: {in_h}x{in_w}")
    out_h, out_w = _hw(size)
    fov = _fov_rad(fov_deg)
    centers = _centers(centers_deg)
    rolls = _rolls(roll_deg, len(centers))
    n = len(centers)

    s_h, s_w = native_size(in_w, fov_deg, (out_h, out_w)) if antialias else (out_h, out_w)
    resize = (s_h, s_w) != (out_h, out_w)
    cdt = _compute_dtype(x.dtype)
    g = _get_grid(in_h, in_w, s_h, s_w, centers, fov, rolls, cdt, x.device)

    convert = x.dtype != cdt
    per_image = (c * in_h * in_w if convert else 0) + n * c * (s_h * s_w + (out_h * out_w if resize else 0))
    budget = _CHUNK_ELEMS.get(x.device.type, _CHUNK_ELEMS["cuda"])
    chunk = max(1, budget // max(1, per_image))

    outs = []
    for start in range(0, b, chunk):
        src = x[start:start + chunk]
        if convert:  # uint8 / half: one float copy of this chunk, contiguous for the folding
            src = src.to(cdt, memory_format=torch.contiguous_format)
        bb = src.shape[0]
        views = _sample(src, g, n, s_h, s_w).view(bb, c * n, s_h, s_w)
        if resize:
            views = F.interpolate(views, size=(out_h, out_w), mode="bilinear", antialias=True,
                                  align_corners=False)
        views = views.view(bb, c, n, out_h, out_w).transpose(1, 2)
        if x.dtype == torch.uint8:
            views = views.round().clamp_(0, 255).to(torch.uint8)
        else:
            views = views.to(x.dtype)
        outs.append(views.contiguous())
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out[0] if unbatched else out


def cube_faces(erp: torch.Tensor, size: Size, *, antialias: bool = True) -> torch.Tensor:
    """The six 90 degree cube faces F, R, BA, L, T, BO of ERP images.

    `erp` is [B, 3, H, W] or [3, H, W] (float of any dtype, or uint8), on any device; returns
    [B, 6, 3, size, size] (or [6, 3, size, size]) in `FACE_NAMES` order, in py360convert's geometry
    (ours; the paper's faces are `viewport.equi2cubic.equi2cubic`). ``antialias=True``: faces sampled
    at ``native_face_size(W)``, then an antialiased resize; False equals
    ``py360convert.e2p(img, 90, lon, lat, (size, size))`` per face.
    """
    return extract(erp, FACE_CENTERS_DEG, 90.0, size, 0.0, antialias=antialias)
