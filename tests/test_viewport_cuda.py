"""viewport.project on CUDA against the CPU (no py360convert needed: this file runs on GPU machines as is).

    python -m pytest -q tests/test_viewport_cuda.py        # skipped without a CUDA device
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdoiqa.viewport.project import cube_faces


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    img = np.random.default_rng(9).random((256, 512, 3), dtype=np.float32)
    x = torch.from_numpy((img * 255).round().astype(np.uint8)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    for aa in (False, True):
        cpu = cube_faces(x, 64, antialias=aa)
        gpu = cube_faces(x.cuda(), 64, antialias=aa).cpu()
        assert (cpu.int() - gpu.int()).abs().max() <= 1
    xf = x.float() / 255
    assert (cube_faces(xf.cuda(), 64).cpu() - cube_faces(xf, 64)).abs().max() <= 1e-4
