"""The paper's cube faces: its ``viewport/equi2cubic.m`` (rayryeng's equi2cubic) in torch.

`equi2cubic` reproduces that MATLAB function step by step, batched, on any device:

- face size ``n = 8 * floor(W / pi / 8)`` (the MATLAB default; `size` overrides it);
- face pixel (X, Y), 0-based, looks along ``(-t + 2tX/n, -t + 2tY/n, 1)`` with ``t = tan(fov / 2)``
  before the face's rotation ``roty(yaw) * rotx(pitch)``: the grid is not symmetric (its last
  column is at ``1 - 2/n``, not 1);
- latitude and longitude come from lookup tables of ``2H + 1`` tangents and ``2W + 1`` cosines,
  linearly interpolated (``interp1``, NaN outside the table, as at the exact pole of a face);
- 1-based ERP coordinates, clamped to ``[1, W]`` and ``[1, H]``: no wrap across the +-180 degree
  seam;
- ``interp2(..., 'linear')`` in its plane form ``a + b*x + c*y + d*x*y`` (GNU Octave's), then the
  cast to uint8 that rounds half away from zero, saturates and sends NaN to 0.

Everything runs in float64 with the reference's order of operations (the lookup tables from the C
library's ``cos``/``tan``, as Octave's), so the faces match the ones GNU Octave 7.3 computes from the
paper's file to a grey level (tests/test_equi2cubic.py). This is the geometry of ``--protocol
paper``; the default protocol's faces come from `viewport.project.cube_faces` (py360convert's
geometry, wrapped seam, antialiased), which is ours, not the paper's.
"""
from __future__ import annotations

import math
from functools import cache, lru_cache

import numpy as np
import torch

from kdoiqa.viewport.layout import FACE_CENTERS_DEG, FACE_NAMES

__all__ = ["FACE_NAMES", "equi2cubic", "equi2cubic_size"]

# Face pixels times images and channels sampled together: bounds the float64 temporaries.
_CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}


def equi2cubic_size(width: int) -> int:
    """The face side equi2cubic.m uses for an ERP `width` pixels wide: ``8 * floor(W / pi / 8)``."""
    return 8 * math.floor(width / math.pi / 8)


def _sind(deg: float) -> float:
    """MATLAB/Octave ``sind``: exactly 0 at multiples of 180 degrees."""
    i = deg / 180.0
    return 0.0 if i == math.trunc(i) else math.sin(i * math.pi)


def _cosd(deg: float) -> float:
    """MATLAB/Octave ``cosd``: exactly 0 at odd multiples of 90 degrees."""
    i = deg / 180.0 + 0.5
    return 0.0 if i == math.trunc(i) else math.cos((deg / 180.0) * math.pi)


def _matmul3(a: tuple, b: tuple) -> tuple:
    return tuple(tuple(sum(a[r][k] * b[k][c] for k in range(3)) for c in range(3)) for r in range(3))


@cache
def _transforms() -> tuple:
    """``roty(yaw) * rotx(pitch) * rotz(0)`` of each face, in `FACE_NAMES` order (entries 0 and +-1)."""
    out = []
    for yaw, pitch in FACE_CENTERS_DEG:
        rx = ((1.0, 0.0, 0.0), (0.0, _cosd(pitch), -_sind(pitch)), (0.0, _sind(pitch), _cosd(pitch)))
        ry = ((_cosd(yaw), 0.0, _sind(yaw)), (0.0, 1.0, 0.0), (-_sind(yaw), 0.0, _cosd(yaw)))
        out.append(_matmul3(ry, rx))
    return tuple(out)


@lru_cache(maxsize=16)
def _lookups(width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lookup_acos, lookup_atan) of equi2cubic.m, float64 on the CPU, from the C library's cos/tan."""
    res_acos, res_atan = 2 * width, 2 * height
    step_acos, step_atan = math.pi / res_acos, math.pi / res_atan
    acos = [-math.cos(k * step_acos) for k in range(res_acos)] + [1.0]
    atan = ([math.tan(step_atan / 2 - math.pi / 2)]
            + [math.tan(k * step_atan - math.pi / 2) for k in range(1, res_atan)]
            + [math.tan(-step_atan / 2 + math.pi / 2)])
    with torch.inference_mode(False):  # cached: usable outside the inference mode it may be made in
        return torch.tensor(acos, dtype=torch.float64), torch.tensor(atan, dtype=torch.float64)


def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float64 square root, as MATLAB's. torch's CPU kernel is not always (1 ulp low
    on ~0.8% of uniform random inputs, measured with torch 2.14 on AVX-512), which matters where
    ``-z / sqrt(x^2 + z^2)`` must stay within [-1, 1]; NumPy's CPU square root and CUDA's are IEEE-exact."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sqrt(values.numpy()))
    return torch.sqrt(values)


def _interp1_index(table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Octave's ``interp1(table, 0:numel(table)-1, values, 'linear')``: i + (v - t_i) / (t_{i+1} - t_i)
    as its piecewise polynomial evaluates it; NaN outside [t_0, t_end]."""
    n = table.numel()
    i = (torch.searchsorted(table, values, right=True) - 1).clamp_(0, n - 2)
    left = table[i]
    slope = 1.0 / (table[i + 1] - left)
    out = slope * (values - left) + i.to(torch.float64)
    return out.masked_fill_((values < table[0]) | ~(values <= table[-1]), math.nan)


def _coordinates(face: int, rows: tuple[int, int], n: int, width: int, height: int, fov_deg: float,
                 lookups: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based, clamped ERP coordinates (inX, inY), float64 [rows, n], of the rows ``rows[0]:rows[1]``
    of face number `face`.

    Every quantity is kept in the shape it varies in ([1, n] along a row, [r, 1] down a column, or a
    scalar) and broadcast only where it meets another, as equi2cubic.m's per-pixel vectors would be.
    """
    lookup_acos, lookup_atan = lookups
    device = lookup_acos.device
    f64 = torch.float64
    vfov = fov_deg * math.pi / 180.0
    top_left = (-math.tan(vfov / 2) * (n / n), -math.tan(vfov / 2), 1.0)
    uv = (-2 * top_left[0] / n, -2 * top_left[1] / n, 0.0)
    col = torch.arange(n, dtype=f64, device=device)[None, :]
    row = torch.arange(rows[0], rows[1], dtype=f64, device=device)[:, None]
    p = (top_left[0] + uv[0] * col, top_left[1] + uv[1] * row, torch.tensor(top_left[2] + uv[2], dtype=f64, device=device))

    def rotated(r: int) -> torch.Tensor:
        # The rotation's entries are 0 and +-1: the one nonzero term of each row is MATLAB's exact product.
        terms = [coef * p[j] for j, coef in enumerate(_transforms()[face][r]) if coef != 0.0]
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out

    x, y, z = rotated(0), rotated(1), rotated(2)
    nxz = _sqrt(x * x + z * z)
    pole = nxz < torch.finfo(f64).tiny  # MATLAB's realmin
    safe = torch.where(pole, 1.0, nxz)
    step_acos, step_atan = math.pi / (2 * width), math.pi / (2 * height)
    phi = _interp1_index(lookup_atan, y / safe) * step_atan - (math.pi / 2)
    theta = _interp1_index(lookup_acos, -z / safe) * step_acos
    theta = torch.where(x < 0, -theta, theta)
    phi = torch.where(pole, torch.where(y > 0, math.pi / 2, -math.pi / 2), phi)
    theta = torch.where(pole, 0.0, theta)

    in_x = (theta / math.pi) * (width / 2) + (width / 2) + 1
    in_y = (phi / (math.pi / 2)) * (height / 2) + (height / 2) + 1
    in_x = torch.where(in_x < 1, 1.0, torch.where(in_x >= width, float(width), in_x))
    in_y = torch.where(in_y < 1, 1.0, torch.where(in_y >= height, float(height), in_y))
    shape = (rows[1] - rows[0], n)
    return in_x.expand(shape), in_y.expand(shape)


def _interp2(flat_erp: torch.Tensor, in_x: torch.Tensor, in_y: torch.Tensor, width: int,
             height: int) -> torch.Tensor:
    """Octave's ``interp2(1:W, 1:H, Z, inX, inY, 'linear')`` of every image and channel of
    `flat_erp` [B, C, H*W] (uint8) -> [B, C, P] float64 (NaN where a coordinate is NaN)."""
    bad = torch.isnan(in_x) | torch.isnan(in_y)
    xs = torch.where(bad, 1.0, in_x)
    ys = torch.where(bad, 1.0, in_y)
    x0 = torch.floor(xs).clamp_(1, width - 1)  # lookup(1:W, x, "lr")
    y0 = torch.floor(ys).clamp_(1, height - 1)
    x_sc, y_sc = xs - x0, ys - y0
    base = (y0.long() - 1) * width + (x0.long() - 1)

    def tap(offset: int) -> torch.Tensor:
        return flat_erp[:, :, base + offset].to(torch.float64)

    a = tap(0)
    b = tap(1) - a
    c = tap(width) - a
    d = ((tap(width + 1) - a) - b) - c
    out = ((a + b * x_sc) + c * y_sc) + (d * x_sc) * y_sc
    return out.masked_fill_(bad, math.nan)


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """MATLAB's ``cast(x, 'uint8')``: round half away from zero, saturate to 0..255, NaN to 0."""
    whole = torch.floor(values)
    rounded = whole + (values - whole >= 0.5).to(values.dtype)
    return torch.nan_to_num(rounded, nan=0.0).clamp_(0, 255).to(torch.uint8)


def equi2cubic(erp: torch.Tensor, size: int | None = None, fov_deg: float = 90.0) -> torch.Tensor:
    """The six cube faces that the paper's ``equi2cubic.m`` returns, for a batch of ERP images.

    Args:
        erp: [B, C, H, W] or [C, H, W] uint8 (C = 3 for RGB; any count works), on any device.
        size: face side in pixels; default ``equi2cubic_size(W)`` (the paper's use).
        fov_deg: the field of view of each face in degrees (equi2cubic.m's ``vfov``, 90 by default).

    Returns:
        [B, 6, C, n, n] (or [6, C, n, n] for unbatched input) uint8 on `erp`'s device, faces in the
        order F, R, BA, L, T, BO; row 0 is the top of each face.
    """
    if not isinstance(erp, torch.Tensor):
        raise TypeError(f"erp must be a torch.Tensor, got {type(erp).__name__}")
    if erp.dim() not in (3, 4):
        raise ValueError(f"erp must be [B, C, H, W] or [C, H, W], got shape {tuple(erp.shape)}")
    if erp.dtype != torch.uint8:
        raise TypeError(f"erp must be uint8 (as the paper's images), got {erp.dtype}")
    unbatched = erp.dim() == 3
    x = erp.unsqueeze(0) if unbatched else erp
    b, c, height, width = x.shape
    if height < 2 or width < 2:
        raise ValueError(f"ERP image too small: {height}x{width}")
    n = equi2cubic_size(width) if size is None else int(size)
    if n < 1:
        raise ValueError(f"face size must be at least 1 pixel, got {n} (an ERP {width} pixels wide gives "
                         f"8*floor(W/pi/8) = {equi2cubic_size(width)}; pass size=)")
    if not 0.0 < float(fov_deg) < 180.0:
        raise ValueError(f"field of view must be in (0, 180) degrees, got {fov_deg!r}")

    # float64 is what the matching needs; devices without it (MPS) compute on the CPU.
    work = torch.device("cpu") if x.device.type == "mps" else x.device
    flat_erp = x.to(work).reshape(b, c, height * width)
    lookups = tuple(t.to(work) for t in _lookups(width, height))
    step = max(1, _CHUNK_ELEMS.get(work.type, _CHUNK_ELEMS["cuda"]) // max(1, b * c * n))  # face rows a chunk
    out = torch.empty((b, 6, c, n, n), dtype=torch.uint8, device=work)
    for face in range(6):
        for start in range(0, n, step):
            rows = (start, min(n, start + step))
            in_x, in_y = _coordinates(face, rows, n, width, height, float(fov_deg), lookups)
            values = _interp2(flat_erp, in_x.reshape(-1), in_y.reshape(-1), width, height)
            out[:, face, :, rows[0]:rows[1]] = _to_uint8(values).view(b, c, rows[1] - rows[0], n)
    faces = out.to(x.device)
    return faces[0] if unbatched else faces
