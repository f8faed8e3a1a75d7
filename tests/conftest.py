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
