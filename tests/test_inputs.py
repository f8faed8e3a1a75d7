"""Image inputs: every PIL mode decoded into the right 8-bit RGB (one decoder for every reader), derived
files never read once their source changed, the scorer's float inputs (range, equal to uint8), the 2:1
rule, what `predict.py` takes from a folder, and the odd files a user has (truncated, links, names).

Expected pixels come from numpy written here (v * 257 >> 8, the alpha formula, EXIF's eight
orientations as array flips, PIL's documented CMYK and YCbCr formulas) or from a raw PNG encoder
written here; expected scores from the same picture given another way (its 8-bit version)."""
from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_db
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import img_resize
import kdoiqa
import make_synthetic_db as msd
import mask_train
import predict
import teacher_train
from kdoiqa import derived_files
from kdoiqa.api import InputError, Scorer
from kdoiqa.checkpoints import load_checkpoint, model_from_checkpoint
from kdoiqa.common import UserError
from kdoiqa.databases import load_database
from kdoiqa.images import ImageDataset, load_erp, project_faces, read_rgb, resize_rgb, to_chw

FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--erp-size", "32x16",
        "--batch-size", "4", "--epochs", "1", "--folds", "2"]


def png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (grey, grey+alpha, RGB or RGBA by the last axis), not by PIL."""
    arr = np.asarray(values, dtype=np.uint16)
    if arr.ndim == 2:
        arr = arr[..., None]
    height, width, channels = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def grey3(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v, dtype=np.uint8)[..., None], 3, axis=2)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """c * a + white * (1 - a), in 8-bit units, rounded (no ties: k/255 is never one half)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


RNG = np.random.default_rng(24)
V8 = RNG.integers(0, 256, (6, 10)).astype(np.uint16)       # 8-bit values; as 16-bit: v * 257


# ----------------------------------------------------------------------------------------------
# One decoder: every mode PIL opens.

def test_16_bit_grey_decodes_to_the_8_bit_values_in_every_encoding(tmp_path):
    v16 = V8 * 257
    files = {"I;16 PNG (PIL)": tmp_path / "pil.png", "raw PNG": png16(tmp_path / "raw.png", v16),
             "I;16 TIFF": tmp_path / "le.tif", "I;16B TIFF": tmp_path / "be.tif", "I TIFF": tmp_path / "i.tif",
             "PGM 16-bit": tmp_path / "g.pgm"}
    Image.fromarray(v16).save(files["I;16 PNG (PIL)"])
    Image.fromarray(v16).save(files["I;16 TIFF"])
    Image.fromarray(v16.astype(">u2")).save(files["I;16B TIFF"])
    Image.fromarray(v16.astype(np.int32)).save(files["I TIFF"])
    files["PGM 16-bit"].write_bytes(b"P5 10 6 65535\n" + v16.astype(">u2").tobytes())
    with Image.open(files["I;16B TIFF"]) as img:
        assert img.mode == "I;16B"
    for what, path in files.items():
        np.testing.assert_array_equal(read_rgb(path), grey3(V8), err_msg=what)
    for mode, order in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")):   # in-memory PIL images
        img = Image.frombytes(mode, (10, 6), v16.astype(order).tobytes())
        np.testing.assert_array_equal(read_rgb(img), grey3(V8), err_msg=mode)
    # Any 16-bit value: its high byte (v >> 8), as Pillow decodes 16-bit RGB PNGs.
    w = RNG.integers(0, 65536, (5, 7)).astype(np.uint16)
    np.testing.assert_array_equal(read_rgb(png16(tmp_path / "any.png", w)), grey3(w >> 8))


def test_16_bit_rgb_png_and_grey_agree(tmp_path):
    rgb = RNG.integers(0, 256, (6, 10, 3)).astype(np.uint16)
    np.testing.assert_array_equal(read_rgb(png16(tmp_path / "rgb.png", rgb * 257)), rgb.astype(np.uint8))
    w = RNG.integers(0, 65536, (6, 10)).astype(np.uint16)
    as_rgb = read_rgb(png16(tmp_path / "w_rgb.png", np.stack([w, w, w], -1)))
    np.testing.assert_array_equal(read_rgb(png16(tmp_path / "w_grey.png", w)), as_rgb)
    alpha = RNG.integers(0, 256, (6, 10)).astype(np.uint16)
    rgba = png16(tmp_path / "rgba.png", np.concatenate([rgb * 257, (alpha * 257)[..., None]], -1))
    np.testing.assert_array_equal(read_rgb(rgba), over_white(rgb, alpha))
    la = png16(tmp_path / "la.png", np.stack([V8 * 257, alpha * 257], -1))
    np.testing.assert_array_equal(read_rgb(la), over_white(grey3(V8), alpha))


def test_integer_and_float_modes_and_their_ranges(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(V8.astype(np.float32) / 255).save(path)      # float images are read as 0-1
    np.testing.assert_array_equal(read_rgb(path), grey3(V8))
    np.testing.assert_array_equal(read_rgb(Image.fromarray(np.float32(V8) / 255 + 1e-4)), grey3(V8))
    for values, words in ((np.float32(V8), "[0, 1]"), (np.full((4, 8), np.nan, np.float32), "[0, 1]"),
                          (np.int32(V8) - 300, "0-65535"), (np.int32(V8) * 1000, "0-65535")):
        path = tmp_path / f"bad{values.dtype}.tif"
        Image.fromarray(values).save(path)
        with pytest.raises(UserError) as info:
            read_rgb(path)
        assert words in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="divide by 255"):
        read_rgb(Image.fromarray(np.float32(V8)))


def test_alpha_is_composited_over_white(tmp_path):
    rgb = RNG.integers(0, 256, (6, 10, 3)).astype(np.uint8)
    alpha = RNG.integers(0, 256, (6, 10)).astype(np.uint8)
    alpha[0, :3] = (0, 255, 128)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), over_white(rgb, alpha))
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).save(tmp_path / "la.png")   # LA
    np.testing.assert_array_equal(read_rgb(tmp_path / "la.png"), over_white(grey3(rgb[..., 0]), alpha))
    # A palette with a transparent index: the palette's colour, except that index is white.
    palette = RNG.integers(0, 256, (16, 3)).astype(np.uint8)
    index = RNG.integers(0, 16, (6, 10)).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.tobytes())
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), palette[index])
    img.save(tmp_path / "pt.png", transparency=3)
    expected = palette[index].copy()
    expected[index == 3] = 255
    np.testing.assert_array_equal(read_rgb(tmp_path / "pt.png"), expected)
    # An RGB PNG with one transparent colour (tRNS).
    Image.fromarray(rgb).save(tmp_path / "trns.png", transparency=tuple(int(c) for c in rgb[1, 1]))
    expected = rgb.copy()
    expected[(rgb == rgb[1, 1]).all(-1)] = 255
    np.testing.assert_array_equal(read_rgb(tmp_path / "trns.png"), expected)
    # Premultiplied RGBa (in memory): un-premultiplied by PIL, then composited.
    premult = Image.fromarray(np.dstack([rgb, np.full((6, 10), 255, np.uint8)])).convert("RGBa")
    np.testing.assert_array_equal(read_rgb(premult), rgb)


def test_one_bit_grey_cmyk_ycbcr_and_multi_frame(tmp_path):
    bits = RNG.integers(0, 2, (6, 10)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "one.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "one.png"), grey3(bits * 255))
    Image.fromarray(V8.astype(np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "l.png"), grey3(V8))
    # CMYK: PIL's conversion (no colour profile): R = (255 - C)(255 - K)/255, rounded.
    cmyk = RNG.integers(0, 256, (6, 10, 4)).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    k = 255.0 - cmyk[..., 3:].astype(np.float64)
    np.testing.assert_array_equal(read_rgb(tmp_path / "c.tif"),
                                  np.round((255.0 - cmyk[..., :3]) * k / 255.0).astype(np.uint8))
    # YCbCr: the JFIF (full-range BT.601) formula, within PIL's fixed-point rounding.
    ycc = RNG.integers(16, 240, (6, 10, 3)).astype(np.float64)
    Image.fromarray(ycc.astype(np.uint8), "YCbCr").save(tmp_path / "y.tif")
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    jfif = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0, 255)
    assert np.abs(read_rgb(tmp_path / "y.tif").astype(np.float64) - jfif).max() <= 1.0
    # An animated file: its first frame.
    frames = [Image.fromarray(np.full((4, 8, 3), c, np.uint8)) for c in (10, 200)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(read_rgb(tmp_path / "anim.png"), np.full((4, 8, 3), 10, np.uint8))


# EXIF orientation -> how the stored rows become the displayed image (TIFF/EXIF 2.3, tag 0x0112).
ORIENTED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
            8: lambda a: np.rot90(a, 1)}


def test_exif_orientation_is_applied(tmp_path):
    stored = RNG.integers(0, 256, (4, 6, 3)).astype(np.uint8)
    for orientation, shown in ORIENTED.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        Image.fromarray(stored).save(path, exif=exif)
        np.testing.assert_array_equal(read_rgb(path), shown(stored), err_msg=f"orientation {orientation}")
        with Image.open(path) as img:                      # a PIL image given to the scorer: the same pixels
            np.testing.assert_array_equal(read_rgb(img), shown(stored))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = RNG.integers(0, 256, (16, 32, 3)).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "r.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "r.jpg") as img:
        raw = np.asarray(img.convert("RGB"))               # the JPEG's stored pixels
    np.testing.assert_array_equal(read_rgb(tmp_path / "r.jpg"), np.rot90(raw, -1))


# ----------------------------------------------------------------------------------------------
# Derived files (erp_<W>x<H>/, faces_<size>/) are never read once their source changed.

ERP = (32, 16)


def replace_image(path: Path, seed: int, mtime_ns: int | None = None) -> np.ndarray:
    """Write another picture over `path` (optionally with a given modification time); its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 96, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return pixels


def stale_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "img_resize.py" in line]


@pytest.fixture()
def resized(tmp_path):
    db = load_database(make_tiny_db(tmp_path / "Tiny", contents=2, levels=2, seed=5))
    derived_files.resize_database(db, ERP, 1, progress=False)
    return db


def test_training_reads_a_replaced_original_not_its_old_copy(resized, capsys):
    db = resized
    old = [read_rgb(db.erp_path(x, ERP)) for x in db.images]
    capsys.readouterr()
    changed = db.images[1]
    future = db.erp_path(changed, ERP).stat().st_mtime_ns + 5_000_000_000
    new = replace_image(db.path(changed), seed=1, mtime_ns=future)      # newer than its copy
    dataset = ImageDataset(db, db.images, "erp", erp_size=ERP)
    lines = stale_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "1 of 4" in lines[0] and changed in lines[0] and "erp_32x16" in lines[0]
    for i, image in enumerate(db.images):
        got = dataset[i]["pixels"].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, resize_rgb(new, ERP) if image == changed else old[i], err_msg=image)
    np.testing.assert_array_equal(load_erp(db, changed, ERP), resize_rgb(new, ERP))   # alone, the same check
    # img_resize rebuilds it; then the copy is read again, without a word.
    summary = derived_files.resize_database(db, ERP, 1, progress=False)
    assert summary.written == [changed]
    capsys.readouterr()
    dataset = ImageDataset(db, db.images, "erp", erp_size=ERP)
    assert stale_lines(capsys.readouterr().err) == []
    np.testing.assert_array_equal(read_rgb(db.erp_path(changed, ERP)), resize_rgb(new, ERP))


def test_a_copy_made_from_another_source_is_never_read(resized, capsys):
    db = resized
    first, second = db.images[0], db.images[2]
    same_time = db.path(first).stat().st_mtime_ns              # same mtime, other content (and size)
    new_first = replace_image(db.path(first), seed=2, mtime_ns=same_time)
    older = db.erp_path(second, ERP).stat().st_mtime_ns - 10_000_000_000   # older than the copy (cp -p of an old file)
    new_second = replace_image(db.path(second), seed=3, mtime_ns=older)
    capsys.readouterr()
    dataset = ImageDataset(db, db.images, "erp", erp_size=ERP)
    lines = stale_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "2 of 4" in lines[0]                    # one line per run, not per image
    np.testing.assert_array_equal(dataset[0]["pixels"].permute(1, 2, 0).numpy(), resize_rgb(new_first, ERP))
    np.testing.assert_array_equal(dataset[2]["pixels"].permute(1, 2, 0).numpy(), resize_rgb(new_second, ERP))
    assert sorted(derived_files.resize_database(db, ERP, 1, progress=False).written) == sorted([first, second])


def test_stale_faces_are_projected_from_the_new_original(tmp_path, capsys):
    db = load_database(make_tiny_db(tmp_path / "Tiny", contents=2, levels=2, seed=6))
    derived_files.extract_database(db, 16, "cpu", 1, progress=False)
    image = db.images[3]
    future = db.face_paths(image, 16)[0].stat().st_mtime_ns + 5_000_000_000
    new = replace_image(db.path(image), seed=4, mtime_ns=future)
    capsys.readouterr()
    dataset = ImageDataset(db, db.images, "faces", face_size=16)
    lines = stale_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "faces_16" in lines[0] and "--faces" in lines[0]
    expected = project_faces(to_chw(new)[None], 16)[0]
    torch.testing.assert_close(dataset[3]["pixels"], expected, atol=0, rtol=0)
    with pytest.raises(UserError, match=r"img_resize.py --faces --database .* --face-size 16"):
        ImageDataset(db, db.images, "faces", face_size=16, faces_source="disk")


def test_the_pixel_cache_of_training_holds_the_new_pixels(resized, capsys):
    from kdoiqa.image_store import ImageStore
    from kdoiqa.settings import DataSettings

    db = resized
    changed = db.images[0]
    future = db.erp_path(changed, ERP).stat().st_mtime_ns + 5_000_000_000
    new = replace_image(db.path(changed), seed=7, mtime_ns=future)
    store = ImageStore(db, db.images, "erp", DataSettings(erp_size=ERP, workers=0, cache="cpu"), torch.device("cpu"),
                       progress=False)
    np.testing.assert_array_equal(store.pixels[0].permute(1, 2, 0).numpy(), resize_rgb(new, ERP))
    assert len(stale_lines(capsys.readouterr().err)) == 1


def test_streaming_checks_the_file_it_will_read_not_the_stale_copy(resized, capsys):
    """--cache none checks every file before training: for a replaced original that is the original
    (its old copy is stale and will not be read), so a broken new original is reported up front."""
    from kdoiqa.image_store import ImageStore
    from kdoiqa.settings import DataSettings

    db = resized
    broken = db.path(db.images[1])
    future = db.erp_path(db.images[1], ERP).stat().st_mtime_ns + 5_000_000_000
    broken.write_bytes(broken.read_bytes()[:100])                   # truncated, newer than its copy
    os.utime(broken, ns=(future, future))
    with pytest.raises(UserError, match=str(broken.name)):
        ImageStore(db, db.images, "erp", DataSettings(erp_size=ERP, workers=0, cache="none"), torch.device("cpu"),
                   progress=False)


# ----------------------------------------------------------------------------------------------
# The scorer: 16-bit files, float tensors, repr, the 2:1 rule.

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("inputs")
    db = make_tiny_db(work / "Tiny", contents=4, levels=2, seed=31)
    teacher_train.main(["--database", str(db), "--fold", "0", *FAST, "--out", str(work / "teacher")])
    mask_train.main(["--database", str(db), "--kd", "none", *FAST, "--out", str(work / "student")])
    return {"db": db, "teacher": work / "teacher" / "fold0", "student": work / "student", "work": work}


def test_a_16_bit_grey_picture_scores_as_its_8_bit_version(trained, tmp_path):
    grey = np.random.default_rng(8).integers(0, 256, (48, 96)).astype(np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "grey8.png")
    Image.fromarray(grey * 257).save(tmp_path / "grey16.png")
    white = tmp_path / "white.png"
    Image.fromarray(np.full((48, 96), 255, np.uint8)).save(white)
    for target in (trained["student"], trained["teacher"]):
        metric = kdoiqa.load(target, "cpu")
        s8, s16, s_white = metric([tmp_path / "grey8.png", tmp_path / "grey16.png", white]).tolist()
        assert s16 == s8 and s16 != s_white, target
        with Image.open(tmp_path / "grey16.png") as img:
            assert metric(img).item() == s8


def images_u8(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size[1], size[0])).astype(np.uint8))


def test_a_float_image_scores_as_its_uint8_version(trained):
    for target in (trained["student"], trained["teacher"]):
        metric = kdoiqa.load(target, "cpu")
        span = metric.score_range[1] - metric.score_range[0]
        for size in ((96, 48), (32, 16), (50, 25)):          # resized, the training size, an odd width
            u8 = images_u8(3, size, seed=size[0])
            ref = metric(u8)
            for dtype in (torch.float32, torch.float64, torch.float16):
                got = metric(u8.to(dtype) / 255)
                assert (got - ref).abs().max() <= 1e-6 * span, (target, size, dtype)
            x = (u8.float() / 255).requires_grad_(True)      # as a loss: the same value, a gradient to the input
            value = metric(x)
            assert (value.detach() - ref).abs().max() <= 1e-5 * span, (target, size)
            value.sum().backward()
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        mixed = metric([trained["db"] / "images" / "c0_blur0.png", images_u8(1, (96, 48), 3)[0].float() / 255])
        alone = torch.cat([metric(trained["db"] / "images" / "c0_blur0.png"), metric(images_u8(1, (96, 48), 3))])
        assert (mixed - alone).abs().max() <= 1e-6 * span


def test_float_values_outside_0_1_are_refused(trained):
    metric = kdoiqa.load(trained["student"], "cpu")
    u8 = images_u8(2, (96, 48), seed=9)
    for bad in (u8.float(), torch.full((3, 48, 96), -1.0), torch.full((3, 48, 96), float("nan")),
                (u8.float() / 255 - 0.45) / 0.225):          # 0-255 floats, all -1, NaN, ImageNet-normalised
        with pytest.raises(InputError) as info:
            metric(bad)
        message = str(info.value)
        assert "[0, 1]" in message and "divide by 255" in message and "\n" not in message, message
    assert torch.isfinite(metric(torch.full((3, 48, 96), 1.0 + 1e-4))).all()   # within half an 8-bit level
    with pytest.raises(InputError, match=r"got \[48, 96, 3\]; channels last\? use .permute\(2, 0, 1\)"):
        metric(u8[0].permute(1, 2, 0))


def test_repr_is_one_line_and_lower_better(trained):
    metric = kdoiqa.load(trained["student"], "cpu")
    text = repr(metric)
    assert "\n" not in text and len(text) < 200, text
    assert "student" in text and "Tiny" in text and "higher is better" in text and "folds=[0, 1]" in text
    assert str(metric) == text and metric.lower_better is False and metric.higher_is_better is True
    record = load_checkpoint(metric.paths[0])
    record["database"] = {**record["database"], "higher_is_better": False}
    dmos = Scorer([model_from_checkpoint(record, metric.paths[0])], record, metric.paths[:1])
    assert dmos.lower_better is True and dmos.higher_is_better is False
    assert "lower is better" in repr(dmos) and "folds=[0]" in repr(dmos) and "\n" not in repr(dmos)


NOT_2_TO_1 = "200x50 is not a 2:1 equirectangular image"


def test_one_two_to_one_rule_for_the_scorer_predict_and_sources(trained, tmp_path, capsys):
    wide = RNG.integers(0, 256, (50, 200, 3)).astype(np.uint8)
    src = tmp_path / "sources"
    src.mkdir()
    Image.fromarray(wide).save(src / "wide.png")
    metric = kdoiqa.load(trained["student"], "cpu")
    with pytest.raises(InputError) as info:
        metric(src / "wide.png")
    assert NOT_2_TO_1 in str(info.value) and "require_two_to_one=False" in str(info.value)
    lenient = kdoiqa.load(trained["student"], "cpu", require_two_to_one=False)
    capsys.readouterr()
    score = lenient(src / "wide.png")
    line = capsys.readouterr().err.strip()
    assert NOT_2_TO_1 in line and "stretched" in line and line.count("\n") == 0
    stretched = torch.from_numpy(resize_rgb(wide, lenient.erp_size)).permute(2, 0, 1)   # straight to the 2:1 input
    assert score.item() == lenient(stretched).item()
    code = predict.main([str(trained["student"]), str(src / "wide.png"), "--no-progress", "--device", "cpu"])
    assert code == 0 and NOT_2_TO_1 in capsys.readouterr().err
    assert msd.main(["--out", str(tmp_path / "db"), "--contents", "1", "--size", "128x64", "--workers", "1",
                     "--sources", str(src)]) == 0
    err = capsys.readouterr().err
    assert NOT_2_TO_1 in err and "wide.png" in err and "stretched" in err


def test_sources_of_every_mode_make_the_same_reference(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    grey = np.random.default_rng(10).integers(0, 256, (64, 128)).astype(np.uint16)
    Image.fromarray(grey * 257).save(src / "grey16.png")                  # was an all-white content
    assert msd.main(["--out", str(tmp_path / "db"), "--contents", "1", "--size", "128x64", "--workers", "1",
                     "--sources", str(src)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "db" / "images" / "c00_ref.png")), grey3(grey))


# ----------------------------------------------------------------------------------------------
# predict.py: what a folder means.

def scored_names(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = predict.main([*argv, "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, [line.split("\t")[0] for line in out.splitlines() if not line.startswith("#")], err


def test_a_database_folder_means_its_meta_csv_images(trained, tmp_path, capsys):
    db_root = make_tiny_db(tmp_path / "Mine", contents=2, levels=2, seed=12)
    db = load_database(db_root)
    img_resize.main(["--database", str(db_root), "--erp-size", "32x16", "--no-progress"])
    img_resize.main(["--database", str(db_root), "--faces", "--face-size", "8", "--device", "cpu", "--no-progress"])
    (db_root / "images" / "unlisted.png").write_bytes((db_root / db.images[0]).read_bytes())
    capsys.readouterr()
    code, names, err = scored_names(capsys, str(trained["student"]), str(db_root))
    assert code == 0 and names == [str(db.path(x)) for x in db.images], names
    assert "2:1" not in err and "4 images listed in" in err and "meta.csv" in err
    with pytest.raises(UserError, match="a derived folder of the database"):
        predict.main([str(trained["student"]), str(db_root / "erp_32x16"), "--no-progress", "--device", "cpu"])
    # A plain folder holding derived folders named like ours, and a database inside it.
    photos = tmp_path / "photos"
    for sub in ("erp_32x16", "faces_8", "faces_16_jpeg75", "trip"):
        (photos / sub).mkdir(parents=True)
        Image.fromarray(images_u8(1, (32, 16), 1)[0].permute(1, 2, 0).numpy()).save(photos / sub / "x.png")
    Image.fromarray(images_u8(1, (64, 32), 2)[0].permute(1, 2, 0).numpy()).save(photos / "a.png")
    os.symlink(db_root, photos / "db")
    code, names, err = scored_names(capsys, str(trained["student"]), str(photos))
    expected = [str(photos / "a.png"), *[str(photos / "db" / x) for x in db.images], str(photos / "trip" / "x.png")]
    assert code == 0 and sorted(names) == sorted(expected), names
    assert "erp_32x16" in err and "faces_8" in err and "skipped" in err


def test_odd_files_a_user_has(trained, tmp_path, capsys):
    good = images_u8(1, (64, 32), 4)[0].permute(1, 2, 0).numpy()
    folder = tmp_path / "mixed"
    folder.mkdir()
    lossless = ("UPPER.PNG", "p.webp", "p.tif", "p.bmp", "panorâma 360° – été.png")
    for name in (*lossless, "photo.JPEG", "q.Jpg"):
        Image.fromarray(good).save(folder / name, **({"lossless": True} if name.endswith(".webp") else {}))
    (folder / "folder.png").mkdir()                          # a folder named like an image, holding one
    Image.fromarray(good).save(folder / "folder.png" / "inner.png")
    os.symlink(folder / "UPPER.PNG", folder / "link.png")
    os.symlink(folder / "missing.png", folder / "broken.png")
    os.symlink(folder, folder / "loop")                      # a link back up: each folder is searched once
    (folder / ".staging").mkdir()                            # hidden folders (make_synthetic_db's staging) are not
    Image.fromarray(good).save(folder / ".staging" / "x.png")
    (tmp_path / "cut.png").write_bytes((folder / "UPPER.PNG").read_bytes()[:200])   # truncated files
    jpeg = (folder / "photo.JPEG").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    code, names, err = scored_names(capsys, str(trained["student"]), str(folder))
    assert code == 1 and "broken.png" in err and "not found" in err
    assert len(names) == 9 and str(folder / "folder.png" / "inner.png") in names
    assert str(folder / "panorâma 360° – été.png") in names
    metric = kdoiqa.load(trained["student"], "cpu")
    scores = metric([folder / n for n in (*lossless, "link.png")])
    assert (scores == metric(torch.from_numpy(good).permute(2, 0, 1))).all()       # the same pixels, any format
    for bad, words in ((tmp_path / "cut.png", "unreadable image"), (tmp_path / "cut.jpg", "unreadable image"),
                       (folder / "folder.png", "is a folder"), (folder / "broken.png", "not found")):
        with pytest.raises(InputError) as info:
            metric(bad)
        assert words in str(info.value) and "\n" not in str(info.value), (bad, str(info.value))


@pytest.mark.parametrize("size", [(2, 1), (3, 1), (7, 3), (401, 200)])
def test_tiny_and_odd_sizes(trained, tmp_path, size):
    pixels = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    for target in (trained["student"], trained["teacher"]):
        metric = kdoiqa.load(target, "cpu", require_two_to_one=False)
        if metric.kind == "teacher" and size[1] < 2:            # no cube faces from one row: one clear line
            with pytest.raises(InputError, match=f"{size[0]}x{size[1]} is too small to score"):
                metric(tmp_path / "x.png")
            continue
        assert torch.isfinite(metric(tmp_path / "x.png")).all(), (target, size)
    with pytest.raises(InputError, match="0x0 is too small"):
        kdoiqa.load(trained["student"], "cpu")(torch.zeros(3, 0, 0, dtype=torch.uint8))


def test_huge_aspect_ratio_and_pixel_limit(trained, tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(tmp_path / "strip.png")
    metric = kdoiqa.load(trained["student"], "cpu", require_two_to_one=False)
    assert torch.isfinite(metric(tmp_path / "strip.png")).all()
    assert "3000x1 is not a 2:1" in capsys.readouterr().err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)        # a file over Pillow's decompression-bomb limit
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(UserError) as info:
        read_rgb(tmp_path / "big.png")
    assert "20000 pixels" in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value) and "\n" not in str(info.value)


def test_predict_output_for_a_16_bit_file(trained, tmp_path):
    grey = np.random.default_rng(13).integers(0, 256, (48, 96)).astype(np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "g16.png")
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "g8.png")
    code = predict.main([str(trained["student"]), str(tmp_path / "g16.png"), str(tmp_path / "g8.png"), "--no-progress",
                         "--device", "cpu", "--csv", str(tmp_path / "s.csv")])
    table = pd.read_csv(tmp_path / "s.csv")
    assert code == 0 and table["score"].iloc[0] == table["score"].iloc[1]
