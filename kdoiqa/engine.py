"""One epoch of training and one evaluation: the loop every training script runs.

`train_one_epoch` draws shuffled batches from the pixel cache, computes the method's loss (under
`--parallel batch` through DistributedDataParallel, which averages the gradients during the
backward pass) and steps Adam; `predict_scores` scores images in evaluation mode. Losses stay on
the device until the epoch ends: no host synchronisation per step.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdoiqa.accelerator import ACCELERATOR
from kdoiqa.common import UserError
from kdoiqa.distributed import DIST
from kdoiqa.image_store import ImageStore
from kdoiqa.methods import Method, TargetScale
from kdoiqa.settings import OptimSettings


def resolve_amp(amp: str, device: torch.device) -> str:
    """`--amp auto` made concrete: bf16 on a CUDA device that computes it natively (Ampere and newer),
    otherwise none (fp32); an explicit choice is kept."""
    if amp != "auto":
        return amp
    # Native bf16 arithmetic starts with compute capability 8.0 (Ampere); older GPUs emulate it slowly.
    if ACCELERATOR.takes(device) and ACCELERATOR.capability(device)[0] >= 8:
        return "bf16"
    return "none"


# PyTorch's CPU bfloat16 convolution (oneDNN, torch 2.14) computes wrong weight gradients, often inf or nan,
# for a 3x3 stride-2 convolution over a map one pixel wide (tests/test_flags.py, against float64). ResNet's
# last stage has such a convolution and sees a map ceil(width / 16) pixels wide.
CPU_BF16_MIN_WIDTH = 17


def check_amp_input(amp: str, device: torch.device, width: int, flag: str) -> None:
    """Refuse a training whose resolved `amp` would take that CPU kernel's wrong gradients (`flag`: the input's
    size as the user gave it, for the message)."""
    if amp == "bf16" and device.type == "cpu" and width < CPU_BF16_MIN_WIDTH:
        raise UserError(f"--amp bf16 on CPU with {flag}: ResNet's last stage would see a map one pixel wide, where "
                        f"PyTorch's CPU bfloat16 convolution computes wrong gradients; use --amp none or inputs of at "
                        f"least {CPU_BF16_MIN_WIDTH} pixels")


def autocast_for(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The mixed-precision context of `--amp` (auto: see resolve_amp)."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(method: Method, optim: OptimSettings, device: torch.device | None = None) -> torch.optim.Adam:
    """Adam over the method's parameter groups (the paper's: one optimiser, the policy net at half the rate).

    On a GPU the fused implementation: one kernel per step, and under fp16 loss scaling it takes the
    GradScaler's scale and overflow flag on the device, where plain Adam makes the scaler read the flag
    on the host every step. It differs from the plain one by rounding only (tests/test_precision.py)."""
    fused = device is not None and ACCELERATOR.takes(device)
    return torch.optim.Adam(method.param_groups(optim), lr=optim.lr, weight_decay=optim.weight_decay,
                            **({"fused": True} if fused else {}))


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of a 1-based epoch: constant (the paper) or cosine decay towards 0."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    return 1.0


def epoch_generator(seed: int, fold: int, epoch: int) -> torch.Generator:
    """The shuffle of one epoch, a function of (seed, fold, epoch) only: a resumed run sees the same batches."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + fold * 10_007 + epoch)


def train_step(step: nn.Module, optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler,
               autocast: Callable, batch: dict, target: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch; the logged scalars (device tensors). `step` is the method or
    its DDP wrapper; the loss is weighted by this rank's share of the global batch (see ImageStore)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss, scalars = step(batch["pixels"], target, batch.get("teacher_feature"), epoch=epoch)
    grad_scaler.scale(loss * batch["weight"]).backward()
    grad_scaler.step(optimizer)
    grad_scaler.update()
    return {"train_loss": loss.detach(), **scalars}


def train_one_epoch(method: Method, step: nn.Module, store: ImageStore, images: Sequence[str],
                    optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler, autocast: Callable,
                    scale: TargetScale, batch_size: int, epoch: int, generator: torch.Generator) -> dict[str, float]:
    """One pass over `images` in shuffled batches: the mean of each logged scalar over this rank's steps."""
    method.train()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for batch in store.batches(images, batch_size, shuffle=True, generator=generator, shard=True):
        scalars = train_step(step, optimizer, grad_scaler, autocast, batch, scale.to_target(batch["mos"]), epoch)
        if batch["weight"] == 0:  # a stand-in row: took part in the step, contributed nothing
            continue
        for name, value in scalars.items():
            value = value.float()
            sums[name] = sums[name] + value if name in sums else value
            counts[name] = counts.get(name, 0) + 1
    DIST.broadcast_buffers([method])
    return {name: float(total) / counts[name] for name, total in sums.items()}


@torch.no_grad()
def predict_scores(method: Method, store: ImageStore, images: Sequence[str], batch_size: int,
                   autocast: Callable, scale: TargetScale) -> np.ndarray:
    """Scores of `images` in their order; under --parallel batch each rank scores a share, then all gather."""
    method.eval()
    rank, world = DIST.shard
    positions = torch.arange(len(images))[rank::world]
    mine = [images[i] for i in positions.tolist()]
    out = [torch.zeros(0, device=store.device)]
    for batch in store.batches(mine, batch_size):
        with autocast():
            out.append(method.predict(batch["pixels"]).float())
    values = DIST.gather_rows(torch.cat(out), positions.to(store.device))
    return scale.to_score(values.cpu().numpy().astype(np.float64))


@torch.no_grad()
def infer(model: nn.Module, store: ImageStore, images: Sequence[str], batch_size: int, autocast: Callable, *,
          progress: bool = True, desc: str = "infer") -> tuple[np.ndarray, torch.Tensor]:
    """Raw model outputs (score in target units, feature) of every image, in the given order."""
    from tqdm import tqdm

    model.eval()
    scores, feats = [], []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in store.batches(images, batch_size):
            with autocast():
                score, feat = model(batch["pixels"])
            scores.append(score.float())
            feats.append(feat.float())  # fp32 already: the projector runs in fp32 (models/backbone.fp32)
            bar.update(len(batch["images"]))
    if not scores:
        return np.zeros(0), torch.zeros(0)
    return torch.cat(scores).cpu().numpy().astype(np.float64), torch.cat(feats).cpu()
