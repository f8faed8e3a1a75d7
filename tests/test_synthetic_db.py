"""Tests of make_synthetic_db.py: layout, determinism, pseudo-MOS, seams, --sources, refusals.

Tiny settings (2 contents, 128x64) keep the whole file to a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import make_synthetic_db as msd
from kdoiqa.common import UserError

SIZE = (128, 64)
TINY = ["--contents", "2", "--size", f"{SIZE[0]}x{SIZE[1]}", "--workers", "1"]
COLUMNS = ["image", "mos", "ref", "distortion", "level"]


def build(out: Path, *extra: str) -> Path:
    assert msd.main(["--out", str(out), *TINY, *extra]) == 0
    return out


def load_pixels(db: Path, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(db / name)) for name in frame["image"]}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "make_synthetic_db.py"), *args], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("synth") / "db", "--seed", "0")


@pytest.fixture(scope="module")
def meta(db: Path) -> pd.DataFrame:
    return pd.read_csv(db / "meta.csv")


# ----------------------------------------------------------------------------------------------
# Layout and values.

def test_layout_and_meta(db: Path, meta: pd.DataFrame) -> None:
    assert list(meta.columns) == COLUMNS
    assert len(meta) == 2 * 21
    assert sorted(p.name for p in (db / "images").iterdir()) == sorted(Path(i).name for i in meta["image"])
    assert set(meta["ref"]) == {"c00", "c01"}
    assert set(meta["distortion"]) == {"reference", "jpeg", "jp2k", "wgn", "blur"}
    for ref, group in meta.groupby("ref"):
        assert len(group) == 21
        assert (group["distortion"] == "reference").sum() == 1
        for name in ("jpeg", "jp2k", "wgn", "blur"):
            rows = group[group["distortion"] == name]
            assert sorted(rows["level"]) == [1, 2, 3, 4, 5]
            for _, row in rows.iterrows():
                assert row["image"] == f"images/{ref}_{name}_{row['level']}.png"
        refrow = group[group["distortion"] == "reference"].iloc[0]
        assert refrow["image"] == f"images/{ref}_ref.png" and refrow["level"] == 0
    assert meta["mos"].between(0, 100).all()
    assert not any(p.name.startswith(".") for p in db.parent.iterdir()), "staging folder left behind"


def test_images_exist_with_size(db: Path, meta: pd.DataFrame) -> None:
    for name in meta["image"]:
        assert "\\" not in name
        with Image.open(db / name) as img:
            assert img.format == "PNG"
            assert img.size == SIZE
            assert img.mode == "RGB"


def test_database_json(db: Path) -> None:
    info = json.loads((db / "database.json").read_text())
    assert info["name"] == "db"  # named after its folder: two such databases never share a run or cache folder
    assert info["higher_is_better"] is True
    assert info["score_range"] == [0, 100]
    assert "cube faces" in info["description"] and "SSIM" in info["description"]


def test_mos_monotone_and_spread(meta: pd.DataFrame) -> None:
    for _, group in meta.groupby("ref"):
        ref_mos = group.loc[group["distortion"] == "reference", "mos"].iloc[0]
        assert ref_mos == 100.0
        assert (group.loc[group["distortion"] != "reference", "mos"] < ref_mos).all()
        for name in ("jpeg", "jp2k", "wgn", "blur"):
            series = group[group["distortion"] == name].sort_values("level")["mos"].to_numpy()
            assert np.all(np.diff(series) < 0), (name, series)
    distorted = meta[meta["distortion"] != "reference"]["mos"]
    assert distorted.max() - distorted.min() > 40, "pseudo-MOS bunched together"


def test_distortions_change_pixels(db: Path, meta: pd.DataFrame) -> None:
    pixels = load_pixels(db, meta)
    ref = pixels["images/c00_ref.png"].astype(int)
    for name in ("jpeg", "jp2k", "wgn", "blur"):
        err = [np.abs(pixels[f"images/c00_{name}_{lvl}.png"].astype(int) - ref).mean() for lvl in (1, 5)]
        assert 0 < err[0] < err[1], (name, err)


def test_contents_differ(db: Path) -> None:
    a = np.asarray(Image.open(db / "images/c00_ref.png")).astype(float)
    b = np.asarray(Image.open(db / "images/c01_ref.png")).astype(float)
    assert np.abs(a - b).mean() > 20


# ----------------------------------------------------------------------------------------------
# Determinism.

def test_same_seed_identical_any_workers(db: Path, meta: pd.DataFrame, tmp_path: Path) -> None:
    again = build(tmp_path / "again", "--seed", "0", "--workers", "2")   # last --workers wins
    assert (again / "meta.csv").read_bytes() == (db / "meta.csv").read_bytes()
    first, second = load_pixels(db, meta), load_pixels(again, meta)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    named = lambda path: {**json.loads((path / "database.json").read_text()), "name": None}  # noqa: E731
    assert named(again) == named(db)


def test_other_seed_differs(db: Path, meta: pd.DataFrame, tmp_path: Path) -> None:
    other = build(tmp_path / "other", "--seed", "1")
    assert (other / "meta.csv").read_bytes() != (db / "meta.csv").read_bytes()
    first = np.asarray(Image.open(db / "images/c00_ref.png"))
    second = np.asarray(Image.open(other / "images/c00_ref.png"))
    assert not np.array_equal(first, second)


# ----------------------------------------------------------------------------------------------
# Sphere consistency.

def _seam_ratio(image: np.ndarray) -> float:
    """Mean |first - last column| relative to the typical column-to-column difference (the larger
    of the median over the image and the mean over the 4 columns each side of the seam)."""
    x = image.astype(float)
    seam = np.abs(x[:, 0] - x[:, -1]).mean()
    steps = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2))
    local = np.concatenate([steps[:4], steps[-4:]]).mean()
    return seam / max(local, float(np.median(steps)))


def test_reference_seam_continuous(db: Path) -> None:
    for cid in ("c00", "c01"):
        ref = np.asarray(Image.open(db / f"images/{cid}_ref.png"))
        assert _seam_ratio(ref) < 2.5
        blurred = np.asarray(Image.open(db / f"images/{cid}_blur_5.png"))
        assert _seam_ratio(blurred) < 2.5


def test_scene_defined_on_sphere() -> None:
    """The top and bottom ERP rows are tiny circles around the poles: nearly constant."""
    pole, typical = [], []
    for k in range(8):
        image = msd.render_scene(np.random.default_rng([3, k, 0]), 256, 128).astype(float)
        spread = image.std(axis=1).mean(axis=1)          # per row, over the columns
        pole += [spread[0], spread[-1]]
        typical.append(np.median(spread))
    assert np.median(pole) < 0.1 * np.median(typical)


def test_spherical_pad_continuation() -> None:
    image = np.arange(8 * 16 * 3, dtype=np.uint8).reshape(8, 16, 3)
    padded = msd.spherical_pad(image, 2)
    assert padded.shape == (12, 20, 3)
    np.testing.assert_array_equal(padded[2:10, 2:18], image)
    np.testing.assert_array_equal(padded[2:10, 0], image[:, -2])          # left of column 0: the last columns
    np.testing.assert_array_equal(padded[2:10, 19], image[:, 1])
    np.testing.assert_array_equal(padded[1, 2:18], np.roll(image[0], 8, axis=0))   # over the north pole


# ----------------------------------------------------------------------------------------------
# Pseudo-MOS on cube faces.

def test_pseudo_mos_uses_cube_faces() -> None:
    """Distorting only the polar cap changes the top face alone; the equatorial belt F only."""
    rng = np.random.default_rng(0)
    ref = msd.render_scene(np.random.default_rng([0, 5, 0]), 256, 128)
    polar = ref.copy()
    polar[:12] = np.clip(polar[:12] + rng.normal(0, 30, polar[:12].shape), 0, 255).astype(np.uint8)
    front = ref.copy()
    front[60:68, 120:136] = 255 - front[60:68, 120:136]
    per_face = msd.face_ssim(ref, np.stack([polar, front, ref]))
    assert per_face.shape == (3, 6)
    top = 4          # F, R, BA, L, T, BO
    assert per_face[0, top] < 0.98
    np.testing.assert_allclose(np.delete(per_face[0], top), 1.0, atol=1e-9)
    assert per_face[1, 0] < 0.98
    np.testing.assert_allclose(per_face[1, 1:], 1.0, atol=1e-9)
    np.testing.assert_allclose(per_face[2], 1.0, atol=1e-12)
    mos = msd.ssim_to_mos(per_face.mean(axis=1))
    assert mos[0] < 100 and mos[1] < 100 and mos[2] == 100


def test_ssim_basics() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, (2, 32, 32))
    np.testing.assert_allclose(msd.ssim(a, a), 1.0)
    noisy = a + rng.normal(0, 40, a.shape)
    assert (msd.ssim(a, noisy) < 0.9).all()


def test_observer_noise_keeps_order() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        series = np.concatenate([[100.0], np.sort(rng.uniform(0, 100, 5))[::-1]])
        noisy = series + msd.observer_noise(series, rng)
        assert noisy[0] == 100.0
        assert np.all(np.diff(noisy) < 0)
        assert np.all(np.abs(noisy - series) <= msd.NOISE_MAX)


# ----------------------------------------------------------------------------------------------
# --sources.

def test_sources(tmp_path: Path) -> None:
    src = tmp_path / "my_panos"
    src.mkdir()
    yy, xx = np.mgrid[0:100, 0:200]
    pattern = ((np.sin(xx / 3.0) * np.cos(yy / 5.0) + 1) * 120).astype(np.uint8)
    Image.fromarray(np.stack([pattern, pattern[:, ::-1], 255 - pattern], -1)).save(src / "b.png")
    Image.fromarray(np.stack([xx.astype(np.uint8), yy.astype(np.uint8), pattern], -1)).save(src / "a.jpg")
    (src / "notes.txt").write_text("not an image")
    out = build(tmp_path / "out", "--sources", str(src), "--contents", "5")
    frame = pd.read_csv(out / "meta.csv")
    assert len(frame) == 2 * 21 and set(frame["ref"]) == {"c00", "c01"}
    info = json.loads((out / "database.json").read_text())
    assert info["name"] == "out"
    named = build(tmp_path / "out2", "--sources", str(src), "--contents", "1", "--name", "MyPanos")
    assert json.loads((named / "database.json").read_text())["name"] == "MyPanos"
    assert info["sources"] == {"c00": "a.jpg", "c01": "b.png"}
    with Image.open(out / "images/c01_ref.png") as img:
        assert img.size == SIZE
        expected = Image.open(src / "b.png").convert("RGB").resize(SIZE, Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(np.asarray(img), np.asarray(expected))


# ----------------------------------------------------------------------------------------------
# Refusals and atomicity.

def test_refuses_existing_database(db: Path) -> None:
    result = run_script("--out", str(db), *TINY)
    assert result.returncode == 2
    assert "meta.csv" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_out_file(tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("x")
    result = run_script("--out", str(target), *TINY)
    assert result.returncode == 2
    assert "is a file" in result.stderr and "Traceback" not in result.stderr


def test_refuses_empty_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    result = run_script("--out", str(tmp_path / "out"), "--sources", str(tmp_path / "empty"), *TINY)
    assert result.returncode == 2
    assert "no images" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--size", "128x128"], "twice as wide"),
    (["--size", "64x32"], "too small"),
    (["--sources", "/nonexistent/panos"], "no such folder"),
])
def test_refuses_bad_arguments(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        msd.main(["--out", str(tmp_path / "out"), *TINY, *argv])


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = build(tmp_path / "db", "--seed", "0")
    (out / "images" / "stale.png").write_bytes(b"old")
    with pytest.raises(UserError, match="--overwrite"):
        msd.main(["--out", str(out), *TINY])
    build(out, "--seed", "1", "--overwrite")
    frame = pd.read_csv(out / "meta.csv")
    assert json.loads((out / "database.json").read_text())["generator"]["seed"] == 1
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(i).name for i in frame["image"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"], "staging folder left behind"


def test_failure_leaves_no_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = msd.make_content

    def failing(job: msd.ContentJob) -> tuple:
        calls.append(job.index)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(job)

    monkeypatch.setattr(msd, "make_content", failing)
    with pytest.raises(OSError):
        msd.main(["--out", str(tmp_path / "fresh"), *TINY])
    assert not (tmp_path / "fresh").exists()
    # an existing folder (here: empty) is left without meta.csv as well
    (tmp_path / "existing").mkdir()
    calls.clear()
    with pytest.raises(OSError):
        msd.main(["--out", str(tmp_path / "existing"), *TINY])
    assert os.listdir(tmp_path / "existing") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_help_has_example() -> None:
    result = run_script("--help")
    assert result.returncode == 0
    assert "python make_synthetic_db.py --out" in result.stdout
    assert "Pseudo-MOS" in result.stdout
