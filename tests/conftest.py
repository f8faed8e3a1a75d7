"""Shared fixtures: a tiny database built from smooth random panoramas (fast on 2 CPU cores)."""
from __future__ import annotations

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
