"""KD-OIQA: omnidirectional image quality assessment with knowledge distillation (the library).

The paper's scripts at the repository's top level run on this package; from Python, a trained model
is a metric:

    import kdoiqa
    metric = kdoiqa.load("runs/mask_train/<key>/<run>")     # a checkpoint, a fold folder or a run folder
    scores = metric(["pano1.jpg", "pano2.png"])              # one score per image (see kdoiqa.api)

Importing the package loads nothing heavy: `load` and `Scorer` import torch when first used.

The paper's networks and its viewport code are `kdoiqa.models` and `kdoiqa.viewport`. Their files are the
repository's top-level folders `models/` and `viewport/`: the wheel installs them under `kdoiqa/`
(pyproject.toml's package-dir), and in a checkout, where `kdoiqa/` holds neither, `SUBPACKAGE_DIRS` maps the
two names to the same folders (`_CheckoutFinder`). Either way the project claims the one top-level name
`kdoiqa`: a user's own `models` or `viewport` package is never shadowed nor picked up.
"""
from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path
from typing import Any

__all__ = ["Scorer", "load"]
__version__ = "0.1.0"

# Subpackage -> its folder at the repository's top level; pyproject.toml's [tool.setuptools.package-dir] says
# the same for the wheel (a test holds the two equal).
SUBPACKAGE_DIRS: dict[str, str] = {"kdoiqa.models": "models", "kdoiqa.viewport": "viewport"}


class _CheckoutFinder(MetaPathFinder):
    """In a checkout: `kdoiqa.models` and `kdoiqa.viewport` (the two names alone) are the packages in the
    repository's `models/` and `viewport/`; their submodules are found in those folders as usual."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        folder = SUBPACKAGE_DIRS.get(fullname)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        return spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def _map_checkout_folders() -> None:
    here = Path(__file__).resolve().parent
    if (here / "models").is_dir() or not (here.parent / "models" / "__init__.py").is_file():
        return  # installed: the subpackages are in kdoiqa/ itself
    if not any(isinstance(finder, _CheckoutFinder) for finder in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder(here.parent))


_map_checkout_folders()


def __getattr__(name: str) -> Any:
    # Lazy: the scorer imports torch, which `import kdoiqa` alone should not.
    if name in __all__:
        from kdoiqa import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdoiqa' has no attribute {name!r}")
