"""Mask distillation's policy net: which feature channels the student borrows from the teacher.

As in the paper's code: cat(f_s.detach(), f_t) (2d) -> Linear(2d -> hidden) -> Linear(hidden -> d)
-> Sigmoid -> hard threshold at 0.5 with a straight-through gradient clamped to [-1, 1] -> binary
channel mask m; the mixed feature is f_m = (1 - m) * f_s + m * f_t.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class BinarizeSTE(torch.autograd.Function):
    """Forward: 1 where the input is > 0.5, else 0. Backward: the upstream gradient clamped to [-1, 1].

    Under fp16 training the GradScaler multiplies every gradient by its loss scale S before this
    backward runs; `grad_scale` (a callable giving S, or None) makes the clamp act on the true
    gradient: clamp(S g, -S, S) = S clamp(g, -1, 1), computed in fp32."""

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, grad_scale: Callable[[], torch.Tensor | None] | None = None
                ) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        return (probs > 0.5).to(probs.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        scale = ctx.grad_scale() if ctx.grad_scale is not None else None
        if scale is None:
            return grad_output.clamp(-1.0, 1.0), None
        bound = scale.float().reshape(())
        return torch.clamp(grad_output.float(), -bound, bound).to(grad_output.dtype), None


def binarize(probs: torch.Tensor, grad_scale: Callable[[], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Hard 0/1 mask from probabilities, straight-through (clamped) gradient (see BinarizeSTE)."""
    return BinarizeSTE.apply(probs, grad_scale)


def mix(f_s: torch.Tensor, f_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mixed feature ``(1 - mask) * f_s + mask * f_t``: teacher channels where mask is 1."""
    return (1.0 - mask) * f_s + mask * f_t


class PolicyNet(nn.Module):
    """Predict a binary channel mask from the student and teacher features.

    Two Linear layers with *no* nonlinearity between them, exactly as the paper's code has it
    (the pair is therefore one affine map of reduced rank ``hidden``; kept for fidelity).
    The gradient does not reach the student through the policy input: f_s is detached here.
    """

    def __init__(self, feature_dim: int = 512, hidden: int = 2048) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.hidden = int(hidden)
        self.fc1 = nn.Linear(2 * self.feature_dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.feature_dim)  # no activation before: as in the paper
        self.grad_scale: Callable[[], torch.Tensor | None] | None = None  # fp16 training's loss scale (BinarizeSTE)

    def probabilities(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Sigmoid outputs before thresholding, [B, feature_dim], in fp32 even under autocast: the mask's
        straight-through gradient is clamped to the loss scale, and GradScaler's first scale (65536) is
        fp16's infinity. (Two small Linear layers: fp32 costs nothing measurable.)"""
        x = torch.cat([f_s.detach(), f_t], dim=-1).float()
        with torch.autocast(x.device.type, enabled=False):
            return torch.sigmoid(self.fc2(self.fc1(x)))

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Binary mask [B, feature_dim] (values exactly 0 or 1) from f_s, f_t [B, feature_dim]."""
        return binarize(self.probabilities(f_s, f_t), self.grad_scale)

    mix = staticmethod(mix)

    def config(self) -> dict[str, Any]:
        """Architecture as plain types."""
        return {"kind": "policy", "feature_dim": self.feature_dim, "hidden": self.hidden}
