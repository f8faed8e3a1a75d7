"""viewport.equi2cubic against the faces GNU Octave 7.3 computes with the paper's own equi2cubic.m.

The reference files (`../shared/reference/kd-oiqa-upstream/equi2cubic/`: two test panoramas and the
six faces of each, written losslessly by the paper's function) are read, never copied; the tests that
need them skip when they are absent.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdoiqa.viewport.equi2cubic as e2c
from kdoiqa.viewport.equi2cubic import equi2cubic, equi2cubic_size

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "kd-oiqa-upstream" / "equi2cubic"
NAMES = ("F", "R", "BA", "L", "T", "BO")
SIZES = ("1024x512", "1000x500")


def read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def reference_available(size: str) -> bool:
    return all((REFERENCE / f).is_file() for f in [f"erp_{size}.png", *(f"faces_{size}_{n}.png" for n in NAMES)])


def erp_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def random_erp(h: int, w: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (batch, 3, h, w), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_faces_match_octave_running_the_papers_file(size):
    """Within 1 grey level on all but 0.1% of the pixels and a mean absolute difference under 0.05,
    per face, against the paper's equi2cubic.m run in GNU Octave."""
    if not reference_available(size):
        pytest.skip(f"needs the reference faces of equi2cubic.m in {REFERENCE}, absent on this machine")
    erp = read(REFERENCE / f"erp_{size}.png")
    faces = equi2cubic(erp_tensor(erp)[None])
    n = 8 * math.floor(erp.shape[1] / math.pi / 8)  # equi2cubic.m's output_size
    assert faces.shape == (1, 6, 3, n, n) and faces.dtype == torch.uint8
    for k, name in enumerate(NAMES):
        expected = read(REFERENCE / f"faces_{size}_{name}.png").astype(np.int16)
        assert expected.shape == (n, n, 3)
        diff = np.abs(faces[0, k].permute(1, 2, 0).numpy().astype(np.int16) - expected)
        assert (diff > 1).mean() <= 1e-3, (size, name, (diff > 1).mean())
        assert diff.mean() < 0.05, (size, name, diff.mean())


def test_paper_protocol_faces_are_the_papers_chain_from_octaves_faces():
    """`--protocol paper`'s 256-pixel faces (`project_faces(..., jpeg_quality=75)`) against the paper's
    chain applied, here with PIL, to the faces Octave made with equi2cubic.m: each stored as JPEG 75
    (imwrite's default quality), decoded, and resized to 256 with PIL's bicubic filter (img_resize.py)."""
    import io

    from PIL import Image

    from kdoiqa.images import project_faces

    size = "1000x500"
    if not reference_available(size):
        pytest.skip(f"needs the reference faces of equi2cubic.m in {REFERENCE}, absent on this machine")
    ours = project_faces(erp_tensor(read(REFERENCE / f"erp_{size}.png"))[None], 256, 75)[0]
    assert ours.shape == (6, 3, 256, 256) and ours.dtype == torch.uint8
    for k, name in enumerate(NAMES):
        buffer = io.BytesIO()
        Image.open(REFERENCE / f"faces_{size}_{name}.png").convert("RGB").save(buffer, format="JPEG", quality=75)
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            expected = np.array(decoded.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC)).astype(np.int16)
        diff = np.abs(ours[k].permute(1, 2, 0).numpy().astype(np.int16) - expected)
        assert (diff > 1).mean() <= 1e-3 and diff.mean() < 0.05, (name, (diff > 1).mean(), diff.mean())


def test_face_size_formula():
    """8 * floor(W / pi / 8), worked by hand: 1024/pi = 325.9 -> 320; 1000/pi = 318.3 -> 312;
    4096/pi = 1303.8 -> 1296; 13320/pi = 4239.9 -> 4232; 50/pi = 15.9 -> 8."""
    for width, n in ((1024, 320), (1000, 312), (4096, 1296), (13320, 4232), (50, 8)):
        assert equi2cubic_size(width) == n
    faces = equi2cubic(random_erp(25, 50, 0))
    assert faces.shape == (1, 6, 3, 8, 8)
    assert equi2cubic(random_erp(25, 50, 0), size=5).shape == (1, 6, 3, 5, 5)
    unbatched = equi2cubic(random_erp(25, 50, 0)[0])
    assert unbatched.shape == (6, 3, 8, 8) and torch.equal(unbatched, faces[0])


def test_batch_equals_one_image_at_a_time():
    x = random_erp(60, 120, 1, batch=2)
    batched = equi2cubic(x)
    assert torch.equal(batched[0], equi2cubic(x[:1])[0])
    assert torch.equal(batched[1], equi2cubic(x[1:])[0])
    assert not torch.equal(batched[0], batched[1])


def test_inference_mode_first_then_a_normal_call():
    """The cached lookup tables made under inference mode (as img_resize.py may call it) serve later calls."""
    x = random_erp(30, 60, 5)
    e2c._lookups.cache_clear()
    with torch.inference_mode():
        first = equi2cubic(x)
    assert torch.equal(equi2cubic(x), first)
    assert not e2c._lookups(60, 30)[0].is_inference()


def test_chunked_device_path_on_cpu(monkeypatch):
    """Each face is sampled in chunks of rows whose budget depends on the device: the CUDA budget, and
    chunks of 3 rows (the last one a single row), give the same faces on the CPU."""
    x = random_erp(64, 128, 2, batch=2)
    plain = equi2cubic(x)
    monkeypatch.setitem(e2c._CHUNK_ELEMS, "cpu", e2c._CHUNK_ELEMS["cuda"])
    assert torch.equal(equi2cubic(x), plain)
    monkeypatch.setitem(e2c._CHUNK_ELEMS, "cpu", 2 * 3 * 40 * 3)  # faces are 40x40: chunks of 3 rows
    assert torch.equal(equi2cubic(x), plain)


# Where GNU Octave's run of equi2cubic.m on a constant image gives 0 (the lookup's NaN, cast to uint8):
# only the T and BO pixel (n/2, n/2) whose ray is the pole up to rounding, and only for some widths.
OCTAVE_ZEROS = {1000: (156, 156), 1024: None, 1200: (188, 188)}


@pytest.mark.parametrize("width", sorted(OCTAVE_ZEROS))
def test_constant_panorama(width):
    """A constant ERP gives constant faces (the interpolation weights sum to one), except where the
    paper's latitude lookup leaves a NaN, exactly where Octave's run of the paper's file has one.
    Width 1200 also needs a correctly rounded square root: one ulp low and -z / sqrt(x^2 + z^2) leaves
    [-1, 1] at T's pixel (256, 188), which becomes a black pixel that Octave does not have."""
    faces = equi2cubic(torch.full((1, 3, width // 2, width), 77, dtype=torch.uint8))[0]
    expected = torch.full_like(faces, 77)
    if OCTAVE_ZEROS[width] is not None:
        row, col = OCTAVE_ZEROS[width]
        expected[4:6, :, row, col] = 0
    assert torch.equal(faces, expected)


def test_errors():
    x = torch.full((1, 3, 50, 100), 77, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        equi2cubic(x.float())
    with pytest.raises(ValueError, match="shape"):
        equi2cubic(x[0, 0])
    with pytest.raises(ValueError, match="face size"):
        equi2cubic(torch.zeros((1, 3, 10, 20), dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu():
    x = random_erp(250, 500, 3, batch=2)
    assert torch.equal(equi2cubic(x.cuda()).cpu(), equi2cubic(x))
