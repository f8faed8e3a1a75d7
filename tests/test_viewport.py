"""viewport.project (ours) against py360convert, and its antialiased pipeline (the paper's faces: test_equi2cubic.py)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdoiqa.viewport.project as vp
from kdoiqa.viewport.project import (
    FACE_CENTERS_DEG,
    FACE_NAMES,
    cube_faces,
    extract,
    native_face_size,
    native_size,
)

py360convert = pytest.importorskip("py360convert")

TOL = 1e-3  # max abs difference to py360convert, [0, 1] units
AA_TOL = 1e-4  # max abs difference of antialias=True to the exact native-size pipeline


def directions(h: int, w: int) -> np.ndarray:
    """Unit view direction (x right, y up, z forward) of each ERP pixel centre: [H, W, 3]."""
    lon = (np.arange(w) + 0.5) / w * 2 * np.pi - np.pi
    lat = np.pi / 2 - (np.arange(h) + 0.5) / h * np.pi
    lo, la = np.meshgrid(lon, lat)
    return np.stack([np.cos(la) * np.sin(lo), np.sin(la), np.cos(la) * np.cos(lo)], -1)


def smooth_panorama(h: int, w: int) -> np.ndarray:
    """A smooth panorama made from spherical coordinates (continuous across seam and poles)."""
    d = directions(h, w)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    img = np.stack([0.5 + 0.4 * np.sin(3 * x + 2 * y), 0.5 + 0.4 * np.cos(4 * z - y),
                    0.5 + 0.4 * np.sin(5 * x * y + z)], -1)
    return img.astype(np.float32)


def noise_panorama(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def n_wrapped(h: int, w: int, centres, fov, size, roll=0.0) -> int:
    """How many output pixels of this layout use the seam / pole wrap (exercise check)."""
    out_h, out_w = vp._hw(size)
    g = vp._get_grid(h, w, out_h, out_w, vp._centers(centres), vp._fov_rad(fov), vp._rolls(roll, len(centres)),
                     torch.float32, torch.device("cpu"))
    return int(g.index.numel())


# ----------------------------------------------------------------------------------------------
# antialias=False equals py360convert.e2p.

def test_cube_faces_match_py360convert_smooth():
    img = smooth_panorama(256, 512)
    faces = cube_faces(chw(img), 64, antialias=False)
    assert faces.shape == (6, 3, 64, 64) and faces.dtype == torch.float32
    for k, (lon, lat) in enumerate(FACE_CENTERS_DEG):
        ref = py360convert.e2p(img, 90, lon, lat, (64, 64))
        assert np.abs(hwc(faces[k]) - ref).max() <= TOL, FACE_NAMES[k]


@pytest.mark.parametrize("lon,lat,size", [
    (179.9, 0.0, 128), (-180.0, 0.0, 129), (180.0, 0.0, 127), (-179.95, 20.0, (96, 130)),
    (0.0, 89.0, 128), (45.0, -89.0, 128), (0.0, 90.0, 128), (-30.0, -90.0, 128), (100.0, 89.9, 101),
])
def test_seam_and_poles_match_py360convert_noise(lon, lat, size):
    # A small ERP (1.4 degree pixels) and fine views, so that many output pixels fall within half
    # an ERP pixel of the seam or of a pole row: i.i.d. noise makes any wrong tap visible.
    img = noise_panorama(128, 256, seed=1)
    out = extract(chw(img), [(lon, lat)], 90, size, antialias=False)
    hw = vp._hw(size)
    assert out.shape == (1, 3, *hw)
    ref = py360convert.e2p(img, 90, lon, lat, hw)
    assert np.abs(hwc(out[0]) - ref).max() <= TOL
    assert n_wrapped(128, 256, [(lon, lat)], 90, size) > 0  # the wrap code ran
    # No black column or row: every column / row of the view averages like the noise (0.5).
    means = out[0].mean(0)
    assert means.mean(0).min() > 0.3 and means.mean(1).min() > 0.3


@pytest.mark.parametrize("fov,size,roll", [
    (60.0, (48, 80), 0.0),          # scalar fov, non-square: non-square pixels, as in py360convert
    (120.0, (80, 48), 0.0),
    ((100.0, 50.0), (40, 90), 0.0),  # (h_fov, v_fov)
    (75.0, 64, 30.0),               # roll
    ((90.0, 60.0), (33, 65), -120.0),
])
def test_extract_fov_size_roll_match_py360convert(fov, size, roll):
    img = noise_panorama(200, 400, seed=2)
    # (Centres chosen so that no output pixel lands exactly on a pole, where the longitude is
    # undefined and either implementation may pick any.)
    centres = [(0.0, 0.0), (37.5, 21.0), (-150.0, -55.0), (179.0, 80.0)]
    hw = vp._hw(size)
    out = extract(chw(img), centres, fov, size, roll_deg=roll, antialias=False)
    assert out.shape == (len(centres), 3, *hw)
    for k, (lon, lat) in enumerate(centres):
        ref = py360convert.e2p(img, fov, lon, lat, hw, in_rot_deg=roll)
        assert np.abs(hwc(out[k]) - ref).max() <= TOL, (lon, lat)


def test_per_centre_roll():
    img = noise_panorama(100, 200, seed=3)
    centres, rolls = [(10.0, 5.0), (-70.0, 40.0)], [15.0, -40.0]
    out = extract(chw(img), centres, 80, 48, roll_deg=rolls, antialias=False)
    for k, ((lon, lat), roll) in enumerate(zip(centres, rolls)):
        ref = py360convert.e2p(img, 80, lon, lat, (48, 48), in_rot_deg=roll)
        assert np.abs(hwc(out[k]) - ref).max() <= TOL


def test_uint8_within_one_grey_level():
    img = (noise_panorama(128, 256, seed=4) * 255).round().astype(np.uint8)
    centres = [*FACE_CENTERS_DEG, (179.9, 0.0), (20.0, 89.0)]
    out = extract(chw(img), centres, 90, 96, antialias=False)
    assert out.dtype == torch.uint8
    for k, (lon, lat) in enumerate(centres):
        ref = py360convert.e2p(img, 90, lon, lat, (96, 96))
        assert np.abs(hwc(out[k]).astype(int) - ref.astype(int)).max() <= 1


def test_uint8_equals_rounded_float():
    img = (noise_panorama(64, 128, seed=5) * 255).round().astype(np.uint8)
    out8 = cube_faces(chw(img), 40)
    outf = cube_faces(chw(img).float(), 40)
    assert torch.equal(out8, outf.round().clamp(0, 255).to(torch.uint8))


def test_batched_equals_single_and_unbatched():
    a, b = chw(smooth_panorama(128, 256)), chw(noise_panorama(128, 256, seed=6))
    batch = torch.stack([a, b])
    for aa in (False, True):
        out = cube_faces(batch, 32, antialias=aa)
        assert out.shape == (2, 6, 3, 32, 32)
        assert torch.allclose(out[0], cube_faces(a, 32, antialias=aa), atol=1e-6)
        assert torch.allclose(out[1], cube_faces(b, 32, antialias=aa), atol=1e-6)
        assert torch.equal(cube_faces(a[None], 32, antialias=aa)[0], cube_faces(a, 32, antialias=aa))


def test_chunked_batch_equals_whole(monkeypatch):
    batch = (torch.rand(3, 3, 64, 128) * 255).to(torch.uint8)
    whole = cube_faces(batch, 24, antialias=True)
    monkeypatch.setitem(vp._CHUNK_ELEMS, "cpu", 1)  # one image per chunk
    assert torch.equal(cube_faces(batch, 24, antialias=True), whole)


def test_dtypes_and_channels_last_input():
    img = chw(smooth_panorama(64, 128))
    ref = cube_faces(img, 16, antialias=False)
    out64 = cube_faces(img.double(), 16, antialias=False)
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), ref, atol=1e-5)
    out16 = cube_faces(img.half(), 16, antialias=False)
    assert out16.dtype == torch.float16 and torch.allclose(out16.float(), ref, atol=2e-3)
    strided = torch.from_numpy(smooth_panorama(64, 128)).permute(2, 0, 1)  # non-contiguous view
    assert torch.equal(cube_faces(strided, 16, antialias=False), ref)
    pair = torch.stack([img, img.flip(-1)]).contiguous(memory_format=torch.channels_last)
    out = cube_faces(pair, 16)  # batched, not contiguous: the unfolded path
    assert torch.allclose(out, cube_faces(pair.contiguous(), 16), atol=1e-6)
    assert torch.allclose(out[0], cube_faces(img, 16), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Conventions: face order and orientation.

def test_face_order_and_orientation():
    h, w = 64, 128
    noise = noise_panorama(h, w, seed=7)
    faces = cube_faces(chw(noise), 65, antialias=False)  # odd size: a pixel at the exact centre
    c = 32

    def erp_at(col: float) -> np.ndarray:  # bilinear value at the equator, ERP column `col`
        c0 = math.floor(col) % w
        c1 = (c0 + 1) % w
        return 0.25 * (noise[h // 2 - 1, c0] + noise[h // 2, c0] + noise[h // 2 - 1, c1] + noise[h // 2, c1])

    # F looks at the ERP centre, R at 3W/4, BA at the seam (W / 0), L at W/4.
    for k, col in zip(range(4), (w / 2 - 0.5, 3 * w / 4 - 0.5, w - 0.5, w / 4 - 0.5)):
        assert np.allclose(faces[k, :, c, c].numpy(), erp_at(col), atol=1e-5), FACE_NAMES[k]

    d = (directions(h, w) + 1) / 2  # colour = view direction
    dirs = cube_faces(chw(d.astype(np.float32)), 65, antialias=False).numpy() * 2 - 1
    centre = dirs[:, :, c, c]
    expected = np.array([[0, 0, 1], [1, 0, 0], [0, 0, -1], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], float)
    assert np.abs(centre - expected).max() < 0.05
    f = dirs[0]
    assert f[0, c, -1] > 0.5 and f[0, c, 0] < -0.5   # F: right of the view is +x (east)
    assert f[1, 0, c] > 0.5 and f[1, -1, c] < -0.5   # F: row 0 is the top (up)
    t = dirs[4]
    assert t[2, -1, c] > 0.5 and t[2, 0, c] < -0.5   # T: bottom edge touches F, top edge BA
    bo = dirs[5]
    assert bo[2, 0, c] > 0.5 and bo[2, -1, c] < -0.5  # BO: top edge touches F


def test_grid_is_cached():
    vp.clear_cache()
    img = chw(smooth_panorama(64, 128))
    cube_faces(img, 16, antialias=False)
    assert len(vp._cache) == 1
    key = next(iter(vp._cache))
    grid = vp._cache[key]
    cube_faces(img * 0.5, 16, antialias=False)
    assert len(vp._cache) == 1 and vp._cache[key] is grid
    cube_faces(img.double(), 16, antialias=False)
    assert len(vp._cache) == 2  # one per dtype


def test_bad_arguments():
    img = chw(smooth_panorama(32, 64))
    with pytest.raises(ValueError):
        extract(img[0], [(0, 0)], 90, 8)
    with pytest.raises(ValueError):
        extract(img, [(0, 0)], 180, 8)
    with pytest.raises(ValueError):
        extract(img, [], 90, 8)
    with pytest.raises(ValueError):
        extract(img, [(0, 0)], 90, (0, 8))
    with pytest.raises(ValueError):
        extract(img, [(0, 0), (1, 1)], 90, 8, roll_deg=[1.0])
    with pytest.raises(TypeError):
        extract(img.to(torch.int32), [(0, 0)], 90, 8)
    with pytest.raises(TypeError):
        extract(img.numpy(), [(0, 0)], 90, 8)


# ----------------------------------------------------------------------------------------------
# Antialiasing (ours): native-size bilinear faces, then an antialiased resize.

def exact_pipeline(img: np.ndarray, centres, fov, size, roll=0.0) -> torch.Tensor:
    """py360convert.e2p at the native size, then torch's antialiased bilinear resize: [N, C, h, w]."""
    hw = vp._hw(size)
    native = native_size(img.shape[1], fov, hw)
    views = torch.from_numpy(np.stack([py360convert.e2p(img, fov, lon, lat, native, in_rot_deg=roll)
                                       for lon, lat in centres])).permute(0, 3, 1, 2)
    if native == hw:
        return views
    return F.interpolate(views, size=hw, mode="bilinear", antialias=True, align_corners=False)


def test_native_sizes():
    assert native_face_size(4096) == 1296 and native_face_size(2048) == 648 and native_face_size(1024) == 320
    assert native_size(1024, 90, 64) == (320, 320)
    assert native_size(1024, 90, 400) == (400, 400)  # no upsampling: antialias is a no-op
    assert native_size(1024, (120, 60), (32, 48)) == (184, 560)


def test_antialias_matches_exact_pipeline():
    img = smooth_panorama(512, 1024)
    ours = cube_faces(chw(img), 64, antialias=True)
    ref = exact_pipeline(img, FACE_CENTERS_DEG, 90, 64)
    diff = (ours - ref).abs()
    assert diff.max() <= AA_TOL and diff.mean() <= 1e-5
    centres = [(12.0, 30.0), (-170.0, -75.0)]
    ours = extract(chw(img), centres, (120, 60), (32, 48), roll_deg=10.0, antialias=True)
    ref = exact_pipeline(img, centres, (120, 60), (32, 48), roll=10.0)
    assert (ours - ref).abs().max() <= AA_TOL


def test_antialias_noop_when_native_not_larger():
    img = chw(noise_panorama(64, 128, seed=8))  # native face size 40
    assert torch.equal(cube_faces(img, 48, antialias=True), cube_faces(img, 48, antialias=False))


def test_antialias_reduces_aliasing():
    h, w, size = 512, 1024, 32
    d = directions(h, w)
    # High-frequency pattern: stripes of ~3 ERP pixels period in longitude and latitude.
    lon = np.arctan2(d[..., 0], d[..., 2])
    lat = np.arcsin(d[..., 1])
    pattern = 0.5 + 0.25 * np.sin(lon * w / 3.1) + 0.25 * np.sin(lat * h / 1.55)
    img = np.repeat(pattern[..., None], 3, -1).astype(np.float32)
    x = chw(img)
    # Reference: faces sampled 32x finer than the output, then box-averaged (a clean low-pass).
    fine = cube_faces(x, size * 32, antialias=False)
    ref = F.avg_pool2d(fine.reshape(6 * 3, 1, size * 32, size * 32), 32).reshape(6, 3, size, size)
    err_aa = ((cube_faces(x, size, antialias=True) - ref) ** 2).mean()
    err_plain = ((cube_faces(x, size, antialias=False) - ref) ** 2).mean()
    assert err_aa < 0.25 * err_plain


# ----------------------------------------------------------------------------------------------
# A real photograph (matplotlib's sample image), made into a 2:1 panorama.

def real_panorama() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    try:
        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError):
        pytest.skip("matplotlib sample data not installed")
    if not Path(path).exists():
        pytest.skip("matplotlib sample data not installed")
    photo = Image.open(path).convert("RGB")
    half = photo.resize((384, 384), Image.BICUBIC)
    mirrored = half.transpose(Image.FLIP_LEFT_RIGHT)  # continuous across the seam
    pano = Image.new("RGB", (768, 384))
    pano.paste(half, (0, 0))
    pano.paste(mirrored, (384, 0))
    return np.array(pano)


def test_real_photo():
    img8 = real_panorama()
    img = img8.astype(np.float32) / 255
    faces = cube_faces(chw(img), 96, antialias=False)
    faces8 = cube_faces(chw(img8), 96, antialias=False)
    for k, (lon, lat) in enumerate(FACE_CENTERS_DEG):
        assert np.abs(hwc(faces[k]) - py360convert.e2p(img, 90, lon, lat, (96, 96))).max() <= TOL
        ref8 = py360convert.e2p(img8, 90, lon, lat, (96, 96)).astype(int)
        assert np.abs(hwc(faces8[k]).astype(int) - ref8).max() <= 1
    aa = cube_faces(chw(img), 48, antialias=True)  # native 240 -> 48
    assert (aa - exact_pipeline(img, FACE_CENTERS_DEG, 90, 48)).abs().max() <= AA_TOL


def test_grids_cached_under_inference_mode_serve_gradients_later():
    """A grid first built inside torch.inference_mode() (a user's scoring loop) must not break a later
    projection that needs gradients in the same process (inference tensors cannot enter autograd)."""
    from kdoiqa.viewport.project import clear_cache

    clear_cache()
    erp = torch.rand(1, 3, 40, 80)
    with torch.inference_mode():
        cube_faces(erp, 12, antialias=False)
    x = erp.clone().requires_grad_(True)
    cube_faces(x, 12, antialias=False).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
