"""KD-OIQA: omnidirectional image quality assessment with knowledge distillation (the library).

The paper's scripts at the repository's top level run on this package; from Python, a trained model
is a metric:

    import kdoiqa
    metric = kdoiqa.load("runs/mask_train/<key>/<run>")     # a checkpoint, a fold folder or a run folder
    scores = metric(["pano1.jpg", "pano2.png"])              # one score per image (see kdoiqa.api)

Importing the package loads nothing heavy: `load` and `Scorer` import torch when first used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Scorer", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `models` imports kdoiqa.common, and kdoiqa.api imports `models`; an eager import here would
    # make `import models` re-enter a half-initialised package.
    if name in __all__:
        from kdoiqa import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdoiqa' has no attribute {name!r}")
