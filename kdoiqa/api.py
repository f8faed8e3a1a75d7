"""A trained KD-OIQA model as a metric: `kdoiqa.load(path)` -> a `Scorer`.

    import kdoiqa
    metric = kdoiqa.load("runs/mask_train/<key>/<run>")         # a run folder: every fold's model
    scores = metric(["pano1.jpg", "pano2.png"])                  # one score per image, the training scale
    metric.higher_is_better, metric.score_range, metric.kind, metric.database

`load` takes a checkpoint file, a fold folder or a run folder. A `Scorer` takes file paths, PIL
images, or uint8 / float tensors ([B, 3, H, W] or [3, H, W], float in [0, 1]) of any 2:1 size, or a
list of them, and returns a float tensor of one score per image: the mean over the loaded models
(`scores_per_model` gives each). A student resizes the ERP to its training size (uint8 inputs exactly
as predict.py does, with PIL's bicubic filter; float inputs with torch's antialiased bicubic, which
lets gradients reach the input); a teacher projects the six cube faces on the scorer's device. The
networks are frozen and in evaluation mode; gradients flow to float input tensors when grad mode is
on and the input requires them (a metric used as a loss). `.to(device)` moves it.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kdoiqa.checkpoints import load_run_models, model_from_checkpoint
from kdoiqa.common import UserError
from kdoiqa.distributed import resolve_device
from kdoiqa.engine import autocast_for
from kdoiqa.images import is_two_to_one, project_faces, read_rgb, resize_rgb, to_chw

ImageInput = Any  # a path, a PIL image, a tensor [3, H, W] / [B, 3, H, W], or a sequence of them


class InputError(UserError, ValueError):
    """An input a scorer cannot score (wrong shape, not 2:1, not an image): one line saying why."""


class Scorer(nn.Module):
    """One or several trained networks (a run's folds) scoring ERP images on their database's scale."""

    def __init__(self, models: Sequence[nn.Module], record: dict, paths: Sequence[Path], *, amp: str = "none",
                 batch_size: int = 16, require_two_to_one: bool = True, folds: Sequence[int] | None = None,
                 unfinished_folds: Sequence[int] = ()) -> None:
        super().__init__()
        self.models = nn.ModuleList(models).eval().requires_grad_(False)
        self.paths = [Path(p) for p in paths]
        # The fold of each model, and a run folder's folds left out because they have not finished (allow_partial).
        self.folds: list[int] = list(folds) if folds is not None else list(range(len(self.models)))
        self.unfinished_folds: list[int] = list(unfinished_folds)
        self.kind: str = record["kind"]
        database = record.get("database") or {}
        self.database: str = database.get("name", "?")
        self.higher_is_better: bool = bool(database.get("higher_is_better", True))
        low, high = database.get("score_range", [float("nan"), float("nan")])
        self.score_range: tuple[float, float] = (float(low), float(high))
        data = record["settings"]["data"]
        self.erp_size: tuple[int, int] = tuple(int(v) for v in data["erp_size"])  # type: ignore[assignment]
        self.face_size = int(data["face_size"])
        self.face_jpeg_quality = data.get("face_jpeg_quality")
        self.target_offset = float(record["target_scale"]["offset"])
        self.target_scale = float(record["target_scale"]["scale"])
        self.amp = amp
        self.batch_size = int(batch_size)
        # An image that is not 2:1 is refused (ValueError), or with False scored after a warning (predict.py).
        self.require_two_to_one = require_two_to_one

    # -- what users call -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.models.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> Scorer:
        super().to(*args, **kwargs)
        if self.device.type == "cuda":
            self.models.to(memory_format=torch.channels_last)
        return self

    def forward(self, images: ImageInput) -> torch.Tensor:
        """One score per image [N] (float32, on the scorer's device): the mean over the loaded models."""
        return self.scores_per_model(images).mean(dim=1)

    def scores_per_model(self, images: ImageInput) -> torch.Tensor:
        """[N, models] scores of every image by every loaded model (a run folder's folds)."""
        items = self._items(images)
        out = [self.score_prepared([self.prepare(item) for item in items[i:i + self.batch_size]])
               for i in range(0, len(items), self.batch_size)]
        if not out:
            return torch.zeros((0, len(self.models)), device=self.device)
        return torch.cat(out)

    def extra_repr(self) -> str:
        direction = "higher is better" if self.higher_is_better else "higher is worse (DMOS)"
        return (f"kind={self.kind}, database={self.database}, models={len(self.models)}, "
                f"score_range={self.score_range}, {direction}")

    # -- one path for every input ----------------------------------------------------------------
    def prepare(self, item: Any) -> torch.Tensor:
        """The network input of one image, [3, h, w] on the CPU (uint8) or where the tensor was: the ERP at
        the student's size, or the whole ERP for a teacher (its faces are projected in `score_prepared`)."""
        if isinstance(item, (str, os.PathLike)):
            try:
                pixels = read_rgb(item)
            except UserError as err:  # not found, not an image: a ValueError too
                raise InputError(str(err)) from None
            return self._from_pixels(pixels, str(item))
        if _is_pil(item):
            return self._from_pixels(np.array(item.convert("RGB")), "PIL image")
        if isinstance(item, torch.Tensor):
            return self._from_tensor(item)
        raise InputError(f"cannot score a {type(item).__name__}: pass file paths, PIL images or tensors "
                         f"[B, 3, H, W] / [3, H, W]")

    def score_prepared(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """[len(batch), models] scores of prepared inputs (see `prepare`)."""
        device = self.device
        if self.kind == "student":
            inputs = torch.stack([x.to(device, non_blocking=True) for x in batch])
        else:  # sizes may differ: faces per image on the device, then one batch
            inputs = torch.cat([self._faces(x.to(device, non_blocking=True)[None]) for x in batch])
        with autocast_for(self.amp, device)():
            raw = torch.stack([model(inputs)[0].float() for model in self.models], dim=1)
        return raw * self.target_scale + self.target_offset

    # -- helpers ---------------------------------------------------------------------------------
    def _items(self, images: ImageInput) -> list:
        if isinstance(images, torch.Tensor):
            if images.dim() == 4:
                return list(images.unbind(0))
            if images.dim() == 3:
                return [images]
            raise InputError(f"a tensor of images is [B, 3, H, W] or [3, H, W], got {list(images.shape)}")
        if isinstance(images, (str, os.PathLike)) or _is_pil(images):
            return [images]
        if isinstance(images, Sequence):
            return list(images)
        raise InputError(f"cannot score a {type(images).__name__}: pass file paths, PIL images or tensors")

    def _check_aspect(self, width: int, height: int, what: str) -> None:
        if is_two_to_one(width, height):
            return
        if self.require_two_to_one:
            raise InputError(f"{what}: {width}x{height} is not an equirectangular (2:1) image")
        print(f"warning: {what}: {width}x{height} is not a 2:1 equirectangular image; scoring it anyway", file=sys.stderr)

    def _from_pixels(self, pixels: np.ndarray, what: str) -> torch.Tensor:
        height, width = pixels.shape[:2]
        self._check_aspect(width, height, what)
        return to_chw(resize_rgb(pixels, self.erp_size) if self.kind == "student" else pixels)

    def _from_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != 3:
            raise InputError(f"an image tensor is [3, H, W] (RGB), got {list(x.shape)}")
        height, width = x.shape[1:]
        self._check_aspect(width, height, "image tensor")
        if x.dtype == torch.uint8:
            if self.kind == "student" and (width, height) != self.erp_size:
                return self._from_pixels(x.permute(1, 2, 0).cpu().numpy(), "tensor")  # predict.py's resize
            return x
        if not torch.is_floating_point(x):
            raise InputError(f"an image tensor is uint8 (0-255) or float (0-1), got {x.dtype}")
        if self.kind == "student" and (width, height) != self.erp_size:
            w, h = self.erp_size
            x = F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
        return x

    def _faces(self, erp: torch.Tensor) -> torch.Tensor:
        if erp.dtype == torch.uint8:
            return project_faces(erp, self.face_size, self.face_jpeg_quality)
        if self.face_jpeg_quality is not None:
            raise InputError("this teacher was trained on JPEG-compressed faces (--protocol paper): pass uint8 images")
        from viewport.project import cube_faces

        return cube_faces(erp, self.face_size, antialias=True)


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(item, Image.Image)


def load(path: str | os.PathLike, device: str | torch.device | None = None, *, amp: str = "none",
         batch_size: int = 16, require_two_to_one: bool = True, allow_partial: bool = False) -> Scorer:
    """A checkpoint file, a fold folder or a run folder (every fold's model) -> a `Scorer` on `device`
    (default: cuda when present). `amp`: none (fp32, the default for a metric), bf16, fp16 or auto.
    `require_two_to_one=False` scores images that are not 2:1 after a warning instead of refusing them.
    A run folder whose folds have not all finished is refused; `allow_partial=True` loads the finished
    ones (`Scorer.folds`) and lists the others (`Scorer.unfinished_folds`). A fold's checkpoint that is not
    of the run (another database, score direction, kind, split or settings) is refused either way."""
    found = load_run_models(Path(path), allow_partial=allow_partial)
    paths, records = found.paths, found.records
    first = records[0]
    if first.get("kind") not in ("student", "teacher"):
        raise UserError(f"{paths[0]}: unknown model kind {first.get('kind')!r}")
    if found.unfinished:
        print(f"warning: {path}: scoring with fold(s) {', '.join(map(str, found.folds))} only; "
              + ", ".join(f"fold {k} {state}" for k, state in found.unfinished.items()), file=sys.stderr)
    models = [model_from_checkpoint(record, p) for record, p in zip(records, paths)]
    target = device if isinstance(device, torch.device) else resolve_device(device)
    return Scorer(models, first, paths, amp=amp, batch_size=batch_size, require_two_to_one=require_two_to_one,
                  folds=found.folds, unfinished_folds=sorted(found.unfinished)).to(target)
