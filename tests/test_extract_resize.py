"""Tests of img_resize.py: cube faces to PNG (--faces) and the resized ERP to PNG, on a tiny database."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import img_resize
from kdoiqa import derived_files
from kdoiqa.common import UserError, run_cli
from kdoiqa.databases import load_database
from kdoiqa.images import load_erp, read_rgb, resize_rgb, to_chw


class extract:  # noqa: N801 - the cube-face command, `img_resize.py --faces`
    @staticmethod
    def main(argv: list[str]) -> int:
        return img_resize.main(["--faces", *argv])


FACE = 16
ERP = (32, 16)


def make_db(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """Random-noise PNGs (width, height) and a meta.csv listing them."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = []
    for i, (name, (width, height)) in enumerate(sizes.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        rows.append(f"{name},{i},c{i // 2}")
    (root / "meta.csv").write_text("image,mos,ref\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture()
def db(tmp_path):
    make_db(tmp_path / "tiny", {"a.png": (128, 64), "b.png": (128, 64), "sub/c.png": (128, 64),
                                "d.png": (64, 32), "e.png": (128, 64)})
    return load_database(tmp_path / "tiny")


def cli(capsys, module, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: module.main(list(argv)))
    out, err = capsys.readouterr()
    return int(stop.value.code or 0), out, err


def mtimes(paths) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def bump(source: Path, derived: list[Path]) -> None:
    """Make a source newer than the files derived from it (as an edit after the last run does)."""
    now = time.time()
    for path in derived:
        os.utime(path, (now - 100, now - 100))
    os.utime(source, (now - 50, now - 50))


# ----------------------------------------------------------------------------------------------
# img_resize.py --faces

def test_extract_faces_exact(db):
    from kdoiqa.viewport.project import cube_faces

    summary = derived_files.extract_database(db, FACE, "cpu", 2, batch_size=2, progress=False)
    assert summary.written == db.images and summary.skipped == [] and summary.not_two_to_one == []
    assert db.face_paths("sub/c.png", FACE)[0] == db.root / f"faces_{FACE}" / "sub" / "c_F.png"
    for image in db.images:
        expected = cube_faces(to_chw(read_rgb(db.path(image))), FACE, antialias=True)  # [6,3,s,s] uint8
        paths = db.face_paths(image, FACE)
        assert [p.name.rsplit("_", 1)[1] for p in paths] == ["F.png", "R.png", "BA.png", "L.png", "T.png", "BO.png"]
        for k, path in enumerate(paths):
            got = read_rgb(path)
            assert got.shape == (FACE, FACE, 3)
            assert np.array_equal(got, expected[k].permute(1, 2, 0).numpy()), (image, k)
    assert not list(db.faces_dir(FACE).rglob("*.tmp*"))


def test_extract_skips_and_redoes(db, capsys):
    code, out, _ = cli(capsys, extract, "--database", str(db.root), "--face-size", str(FACE), "--device", "cpu",
                       "--threads", "2", "--no-progress")
    assert code == 0 and "wrote 5, skipped 0" in out
    faces = {image: db.face_paths(image, FACE) for image in db.images}
    before = {image: mtimes(paths) for image, paths in faces.items()}
    summary = derived_files.extract_database(db, FACE, "cpu", 2, progress=False)
    assert summary.written == [] and summary.skipped == db.images
    bump(db.path("b.png"), faces["b.png"])
    before["b.png"] = mtimes(faces["b.png"])
    faces["e.png"][3].unlink()
    code, out, _ = cli(capsys, extract, "--database", str(db.root), "--face-size", str(FACE), "--device", "cpu",
                       "--no-progress")
    assert code == 0 and "wrote 2, skipped 3" in out
    for image in ("a.png", "sub/c.png", "d.png"):
        assert mtimes(faces[image]) == before[image]
    assert all(p.is_file() for p in faces["e.png"])
    assert min(mtimes(faces["b.png"])) > max(before["b.png"])
    assert derived_files.extract_database(db, FACE, "cpu", 2, progress=False).written == []
    summary = derived_files.extract_database(db, FACE, "cpu", 1, force=True, progress=False)
    assert len(summary.written) == 5


def test_extract_missing_and_unreadable(db, capsys):
    db.path("d.png").unlink()
    code, out, err = cli(capsys, extract, "--database", str(db.root), "--face-size", str(FACE), "--device", "cpu")
    assert code == 2 and out == "" and err.count("\n") == 1 and "1 image file(s) missing" in err and "d.png" in err
    assert not db.faces_dir(FACE).exists()  # nothing written at all
    with pytest.raises(UserError, match="missing"):
        derived_files.extract_database(db, FACE, "cpu", 2, progress=False)
    db.path("d.png").write_bytes(b"not a png")
    code, out, err = cli(capsys, extract, "--database", str(db.root), "--face-size", str(FACE), "--device", "cpu",
                         "--no-progress")
    assert code == 2 and err.strip().endswith(")") and "d.png: unreadable image" in err and err.count("\n") == 1
    assert not any(p.exists() for p in db.face_paths("d.png", FACE))


def test_extract_warns_not_two_to_one(tmp_path, capsys):
    odd = load_database(make_db(tmp_path / "odd", {"ok.png": (64, 32), "square.png": (48, 48)}))
    summary = derived_files.extract_database(odd, 8, "cpu", 2, progress=False)
    assert summary.not_two_to_one == ["square.png"] and len(summary.written) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and "square.png" in lines[0] and "48x48" in lines[0] and "2:1" in lines[0]
    assert all(p.is_file() for p in odd.face_paths("square.png", 8))


def test_extract_arguments(db, capsys):
    for argv, message in ((["--face-size", "0"], "--face-size"), (["--threads", "0"], "--threads"),
                          (["--batch-size", "0"], "--batch-size"), (["--device", "gpu0"], "not a device")):
        code, _, err = cli(capsys, extract, "--database", str(db.root), *argv)
        assert code == 2 and message in err and err.count("\n") == 1
    code, _, err = cli(capsys, img_resize, "--database", str(db.root), "--face-size", "8")
    assert code == 2 and "--face-size applies to the cube faces: add --faces" in err
    code, _, err = cli(capsys, extract, "--database", str(db.root), "--erp-size", "64x32")
    assert code == 2 and "--erp-size applies to the resized ERP images" in err


def test_extract_module_cli(db):
    result = subprocess.run([sys.executable, "img_resize.py", "--faces", "--database", str(db.root), "--face-size", "8",
                             "--device", "cpu", "--threads", "2"], check=False, capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 5, skipped 0" in result.stdout and "faces_8" in result.stdout
    assert len(list((db.root / "faces_8").rglob("*.png"))) == 30


# ----------------------------------------------------------------------------------------------
# img_resize.py

def test_resize_exact_and_load_erp(db):
    expected = {image: resize_rgb(read_rgb(db.path(image)), ERP) for image in db.images}
    summary = derived_files.resize_database(db, ERP, 2, progress=False)
    assert summary.written == db.images and summary.skipped == []
    assert db.erp_path("sub/c.png", ERP) == db.root / "erp_32x16" / "sub" / "c.png"
    for image in db.images:
        got = read_rgb(db.erp_path(image, ERP))
        assert got.shape == (16, 32, 3)
        assert np.array_equal(got, expected[image])
        assert np.array_equal(load_erp(db, image, ERP), expected[image])
    # at the source size the PNG is a lossless copy
    derived_files.resize_database(db, (64, 32), 2, progress=False, images=["d.png"])
    assert np.array_equal(read_rgb(db.erp_path("d.png", (64, 32))), read_rgb(db.path("d.png")))


def test_resizes_are_the_papers_pil_calls(db, tmp_path):
    """The paper's img_resize.py: `Image.open(erp).resize((1024, 512))` and, for each face JPEG that its
    MATLAB script wrote, `Image.open(face).resize((256, 256))`: PIL's default filter (bicubic since
    Pillow 7). Ours gives the same pixels, for the ERP files and for `--protocol paper`'s faces."""
    from PIL import Image

    from kdoiqa.images import jpeg_roundtrip

    path = db.path("a.png")
    with Image.open(path) as img:
        papers = np.array(img.resize(ERP))
    assert np.array_equal(resize_rgb(read_rgb(path), ERP), papers)
    assert np.array_equal(papers, np.array(Image.open(path).resize(ERP, Image.Resampling.BICUBIC)))
    face = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(face).save(tmp_path / "001F.jpg")  # imwrite(out{idx}, '...001F.jpg'): quality 75
    with Image.open(tmp_path / "001F.jpg") as img:
        papers = np.array(img.resize((FACE, FACE)))
    assert np.array_equal(resize_rgb(jpeg_roundtrip(face, 75), (FACE, FACE)), papers)


def test_resize_skips_and_redoes(db, capsys):
    code, out, _ = cli(capsys, img_resize, "--database", str(db.root), "--erp-size", "32x16", "--no-progress")
    assert code == 0 and "wrote 5, skipped 0" in out
    outs = {image: db.erp_path(image, ERP) for image in db.images}
    before = {image: path.stat().st_mtime_ns for image, path in outs.items()}
    code, out, _ = cli(capsys, img_resize, "--database", str(db.root), "--erp-size", "32x16", "--no-progress")
    assert code == 0 and "wrote 0, skipped 5" in out
    bump(db.path("a.png"), [outs["a.png"]])
    before["a.png"] = outs["a.png"].stat().st_mtime_ns
    summary = derived_files.resize_database(db, ERP, 2, progress=False)
    assert summary.written == ["a.png"] and len(summary.skipped) == 4
    assert all(outs[i].stat().st_mtime_ns == before[i] for i in db.images if i != "a.png")
    assert outs["a.png"].stat().st_mtime_ns > before["a.png"]
    assert derived_files.resize_database(db, ERP, 2, progress=False).written == []


def test_resize_missing_warn_and_errors(tmp_path, db, capsys):
    db.path("e.png").unlink()
    code, _, err = cli(capsys, img_resize, "--database", str(db.root), "--erp-size", "32x16")
    assert code == 2 and err.count("\n") == 1 and "1 image file(s) missing" in err and "e.png" in err
    assert not db.erp_dir(ERP).exists()
    code, _, err = cli(capsys, img_resize, "--database", str(db.root), "--erp-size", "32by16")
    assert code == 2 and "--erp-size" in err
    odd = load_database(make_db(tmp_path / "odd", {"ok.png": (64, 32), "tall.png": (30, 60)}))
    summary = derived_files.resize_database(odd, ERP, 2, progress=False)
    assert summary.not_two_to_one == ["tall.png"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tall.png" in warnings[0]
    assert read_rgb(odd.erp_path("tall.png", ERP)).shape == (16, 32, 3)


def test_output_collision(tmp_path):
    clash = load_database(make_db(tmp_path / "clash", {"x.png": (64, 32), "x.jpg": (64, 32)}))
    with pytest.raises(UserError, match="would both write"):
        derived_files.resize_database(clash, ERP, 1, progress=False)
    with pytest.raises(UserError, match="would both write"):
        derived_files.extract_database(clash, 8, "cpu", 1, progress=False)
