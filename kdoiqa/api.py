"""A trained KD-OIQA model as a metric: `kdoiqa.load(path)` -> a `Scorer`.

    import kdoiqa
    metric = kdoiqa.load("runs/mask_train/<key>/<run>")         # a run folder: every fold's model
    scores = metric(["pano1.jpg", "pano2.png"])                  # one score per image, the training scale
    metric.higher_is_better, metric.lower_better, metric.score_range, metric.kind, metric.database

`load` takes a checkpoint file, a fold folder or a run folder. A `Scorer` takes file paths, PIL
images (any mode, decoded by `images.read_rgb`'s rules: 16-bit, alpha over white, EXIF orientation),
or uint8 / float tensors ([B, 3, H, W] or [3, H, W]; float values in [0, 1], anything else refused) of
any 2:1 size, or a list of them, and returns a float tensor of one score per image: the mean over the
loaded models (`scores_per_model` gives each). Every input takes the path of the 8-bit pixels the
networks were trained on: a float image is rounded to 8 bits, so it scores exactly as its uint8
version; a student resizes the ERP to its training size with PIL's bicubic filter (as predict.py and
training); a teacher projects the six cube faces on the scorer's device. The networks are frozen and
in evaluation mode; when grad mode is on and a float input requires grad (a metric used as a loss),
the score keeps that value and its gradient reaches the input through torch's antialiased bicubic
resize (or the faces' projection) of the unrounded input (straight through the rounding). An image
that is not 2:1 is refused (`require_two_to_one=False`: warned of and stretched to 2:1, as by the
commands). `.to(device)` moves it.
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
from kdoiqa.images import HALF_LEVEL, not_two_to_one, project_faces, read_rgb, resize_rgb, to_chw, warn_not_two_to_one

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

    @property
    def lower_better(self) -> bool:
        """pyiqa's name for the score direction: True when a lower score is a better image (a DMOS)."""
        return not self.higher_is_better

    def __repr__(self) -> str:
        return f"Scorer({self.extra_repr()})"

    def extra_repr(self) -> str:
        direction = "higher is better" if self.higher_is_better else "lower is better (DMOS)"
        lo, hi = self.score_range
        return (f"{self.kind}, database={self.database}, {direction}, scale {lo:g}-{hi:g}, folds={self.folds}"
                + (f", unfinished={self.unfinished_folds}" if self.unfinished_folds else ""))

    # -- one path for every input ----------------------------------------------------------------
    def prepare(self, item: Any) -> torch.Tensor:
        """The network input of one image, [3, h, w] on the CPU (uint8) or where the tensor was: the ERP at
        the student's size, or the whole ERP for a teacher (its faces are projected in `score_prepared`)."""
        if isinstance(item, (str, os.PathLike)) or _is_pil(item):
            try:
                pixels = read_rgb(item)  # the one decoder: every mode, EXIF orientation
            except UserError as err:  # not found, not an image: a ValueError too
                raise InputError(str(err)) from None
            return self._from_pixels(pixels, "PIL image" if _is_pil(item) else str(item))
        if isinstance(item, torch.Tensor):
            return self._from_tensor(item)
        raise InputError(f"cannot score a {type(item).__name__}: pass file paths, PIL images or tensors "
                         f"[B, 3, H, W] / [3, H, W]")

    def score_prepared(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """[len(batch), models] scores of prepared inputs (see `prepare`)."""
        device = self.device
        if self.kind == "student":
            inputs = _joined([x.to(device, non_blocking=True) for x in batch], torch.stack)
        else:  # sizes may differ: faces per image on the device, then one batch
            inputs = _joined([self._faces(x.to(device, non_blocking=True)[None]) for x in batch], torch.cat)
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
        """The shared 2:1 rule (`images.not_two_to_one`): refused, or with require_two_to_one=False warned of;
        and a teacher's cube faces need two rows and columns at least."""
        if min(width, height) < (2 if self.kind == "teacher" else 1):
            raise InputError(f"{what}: {width}x{height} is too small to score"
                             + (" (a teacher projects cube faces from at least 2 rows)" if min(width, height) else ""))
        message = not_two_to_one(what, width, height)
        if message is None:
            return
        if self.require_two_to_one:
            raise InputError(f"{message}; load with require_two_to_one=False to score it stretched to 2:1")
        warn_not_two_to_one(what, width, height)

    def _from_pixels(self, pixels: np.ndarray, what: str) -> torch.Tensor:
        height, width = pixels.shape[:2]
        self._check_aspect(width, height, what)
        return to_chw(resize_rgb(pixels, self.erp_size) if self.kind == "student" else pixels)

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 [3, H, W] tensor -> what `score_prepared` takes: a student's ERP resized as predict.py and
        training resize it (PIL's bicubic filter, 8-bit), or a teacher's whole ERP."""
        if self.kind == "student" and tuple(x.shape[:0:-1]) != self.erp_size:
            return to_chw(resize_rgb(x.permute(1, 2, 0).cpu().numpy(), self.erp_size))
        return x

    def _from_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != 3:
            hint = "; channels last? use .permute(2, 0, 1)" if x.dim() == 3 and x.shape[-1] == 3 else ""
            raise InputError(f"an image tensor is [3, H, W] (RGB), got {list(x.shape)}{hint}")
        if x.dtype != torch.uint8 and not torch.is_floating_point(x):
            raise InputError(f"an image tensor is uint8 (0-255) or float (0-1), got {x.dtype}")
        height, width = x.shape[1:]
        self._check_aspect(width, height, "image tensor")
        if x.dtype == torch.uint8:
            return self._network_input(x)
        value = self._network_input(_quantised(x))  # the 8-bit pixels: the same path as a uint8 image
        if not (torch.is_grad_enabled() and x.requires_grad):
            return value
        if self.kind != "student":  # the faces are projected (and passed through) in `_faces`
            return x.float()
        smooth = x.float()
        if (width, height) != self.erp_size:
            w, h = self.erp_size
            smooth = F.interpolate(smooth[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
        return _straight_through(smooth, value)

    def _faces(self, erp: torch.Tensor) -> torch.Tensor:
        if erp.dtype == torch.uint8:
            return project_faces(erp, self.face_size, self.face_jpeg_quality)
        # A float ERP that requires grad (see `_from_tensor`): the 8-bit faces' values, the gradient of the
        # lossless projection of the unrounded input.
        if self.face_jpeg_quality is not None:
            raise InputError("this teacher was trained on JPEG-compressed faces (--protocol paper): gradients "
                             "cannot pass the JPEG step; score without gradients or pass uint8 images")
        from kdoiqa.viewport.project import cube_faces

        value = project_faces(_quantised(erp), self.face_size, None)
        return _straight_through(cube_faces(erp, self.face_size, antialias=True), value)


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] as the uint8 image it stands for (round(255 x)); values outside [0, 1] by more
    than half a level, or not finite, are refused."""
    values = x.detach().float()
    finite = bool(torch.isfinite(values).all())
    low, high = (float(values.min()), float(values.max())) if finite and values.numel() else (0.0, 0.0)
    if not finite or low < -HALF_LEVEL or high > 1 + HALF_LEVEL:
        shown = f"{low:.4g}..{high:.4g}" if finite else "not all finite"
        raise InputError(f"image tensor: float values {shown}, outside [0, 1]: divide by 255 an image of 0-255 "
                         f"values (and undo any normalisation), or pass it as uint8")
    return torch.round(values.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _straight_through(smooth: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The values of `value` (uint8, the 8-bit path) with the gradient of `smooth` (float in [0, 1])."""
    return smooth + (value.to(smooth.device, torch.float32) / 255.0 - smooth).detach()


def _joined(tensors: list[torch.Tensor], join) -> torch.Tensor:
    """Stack or concatenate network inputs; uint8 ones become float in [0, 1] when any is float (gradients)."""
    if any(t.dtype != torch.uint8 for t in tensors):
        tensors = [t.float() / 255.0 if t.dtype == torch.uint8 else t.float() for t in tensors]
    return join(tensors)


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
