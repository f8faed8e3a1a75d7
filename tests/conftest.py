"""Shared fixtures: a tiny database built from smooth random panoramas (fast on 2 CPU cores)."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def make_tiny_db(root: Path, contents: int = 4, levels: int = 3, size: tuple[int, int] = (96, 48),
                 seed: int = 0) -> Path:
    """`contents` smooth panoramas, each blurred at `levels` strengths; MOS falls with the blur."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,mos,ref,distortion,level"]
    for c in range(contents):
        noise = (rng.random((size[1] // 4, size[0] // 4, 3)) * 255).astype(np.uint8)
        base = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)
        for level in range(levels):
            img = base.filter(ImageFilter.GaussianBlur(2 * level)) if level else base
            name = f"images/c{c}_blur{level}.png"
            img.save(root / name)
            rows.append(f"{name},{80 - 20 * level + rng.normal():.4f},c{c},{'blur' if level else 'reference'},{level}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory) -> Path:
    return make_tiny_db(tmp_path_factory.mktemp("tinydb") / "Tiny")


def kill_after_first(cmd: list[str], ckpt: Path, timeout: float = 120) -> None:
    """Run `cmd` and SIGKILL it as soon as `ckpt` appears (mid-epoch: the next save is epochs away)."""
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ckpt.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint appeared in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # mid-epoch 3: the next checkpoint (epoch 4) is two epochs away
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def _panorama(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    noise = (rng.random((size[1] // 4, size[0] // 4, 3)) * 255).astype(np.uint8)
    return Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)


def make_release_layouts(data_root: Path, contents: int = 2, per_content: int = 3, size: tuple[int, int] = (32, 16),
                         seed: int = 0) -> dict[str, Path]:
    """Small CVIQ, OIQA and IQA-ODI databases laid out as their releases (file names, folders, score
    conventions; IQA-ODI a DMOS), each with a meta.csv as `dataset.py prepare` writes it."""
    rng = np.random.default_rng(seed)
    roots = {}
    layouts = {
        "CVIQ": lambda c, k: (f"{c * 34 + k + 1:03d}.png", "higher"),
        "OIQA": lambda c, k: (f"distorted_images/img{c * 20 + k + 1}.jpg", "higher"),
        "IQA-ODI": lambda c, k: (f"all_ref_test_img/QF{[5, 15, 35, 60][k % 4]}_ERP_human_P{c}.jpg", "lower"),
    }
    for name, layout in layouts.items():
        root = data_root / name
        rows = ["image,mos,ref,distortion,level"]
        for c in range(contents):
            base = _panorama(rng, size)
            for k in range(per_content):
                image, direction = layout(c, k)
                (root / image).parent.mkdir(parents=True, exist_ok=True)
                base.filter(ImageFilter.GaussianBlur(k)).save(root / image)
                quality = 80 - 15 * k + rng.normal()
                score = quality if direction == "higher" else 100 - quality
                rows.append(f"{image},{score:.3f},{name.lower()}_c{c},blur,{k + 1}")
        (root / "meta.csv").write_text("\n".join(rows) + "\n")
        roots[name] = root
    return roots


@pytest.fixture(scope="session", autouse=True)
def leaves_the_repository_clean():
    """`make test` writes nothing into the repository: runs, features and reproductions go to temporary folders."""
    repo = Path(__file__).resolve().parents[1]

    def outputs() -> set[str]:
        found = set()
        for folder in ("runs", "features", "reproduction", "bench-out", "scratch"):
            if (repo / folder).is_dir():
                found |= {p.relative_to(repo).as_posix() for p in (repo / folder).iterdir() if p.name != "README.md"}
        return found

    before = outputs()
    yield
    left = sorted(outputs() - before)
    assert not left, f"the tests left outputs in the repository: {left[:5]}"
