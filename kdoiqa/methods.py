"""The paper's two methods as training losses: the cube-face teacher, and the ERP student with
mask distillation (or plain feature distillation, or none: the baseline).

A `Method` is an `nn.Module` holding the networks it trains; its `forward` computes the loss of
one batch, so that `DistributedDataParallel` can wrap it whole. `nets()` are what a checkpoint
stores, `param_groups()` what Adam optimises, `predict()` the score used for evaluation.

The student's loss schedule (epochs 1-based; W = --kd-warmup, F = --kd-feature-epochs):

    epochs 1..W        L = MSE(y_hat, y)
    next F epochs      L = MSE(y_hat, y) + w * MSE(f_s, f_t)                          (imitation)
    afterwards         L = MSE(y_hat, y) + MSE(head(f_m), y) + w * MSE(f_s, f_m.detach())
                       f_m = (1 - m) * f_s.detach() + m * f_t,   m = policy(f_s, f_t) in {0, 1}
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kdoiqa.models import PolicyNet, build_model
from kdoiqa.models.policy import mix
from kdoiqa.settings import DistillSettings, ModelSettings, OptimSettings


@dataclass(frozen=True)
class TargetScale:
    """Maps scores to regression targets: raw (offset 0, scale 1, the paper) or [0, 1] by the range."""

    offset: float = 0.0
    scale: float = 1.0

    @classmethod
    def of(cls, mode: str, score_range: tuple[float, float]) -> TargetScale:
        if mode == "range":
            lo, hi = score_range
            return cls(lo, hi - lo)
        return cls()

    def to_target(self, mos: torch.Tensor) -> torch.Tensor:
        return (mos - self.offset) / self.scale

    def to_score(self, target: np.ndarray) -> np.ndarray:
        return target * self.scale + self.offset


def current_loss_scale(grad_scaler: torch.amp.GradScaler):
    """A callable giving the GradScaler's current scale as a device tensor (no host synchronisation):
    read during the backward pass, after `scale()` has set it for this step."""
    def scale() -> torch.Tensor | None:
        # GradScaler keeps the scale in `_scale` (a 1-element device tensor); `get_scale()` would
        # synchronise with the host. tests/test_precision.py checks the clamp through a real scaler.
        return getattr(grad_scaler, "_scale", None)
    return scale


class Method(nn.Module):
    """A scoring network and its training loss."""

    view = "erp"          # which pixels the batches carry: "erp" or "faces"
    kind = "student"      # recorded in checkpoints

    def __init__(self, model: nn.Module, head_init: str = "mean") -> None:
        super().__init__()
        self.model = model
        self.head_init = head_init

    def nets(self) -> dict[str, nn.Module]:
        """The networks a resumable state stores; `model` is the one a finished checkpoint keeps."""
        return {"model": self.model}

    def param_groups(self, optim: OptimSettings) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": optim.lr}]

    def nets_in_use(self, epoch: int) -> tuple[str, ...]:
        """The networks (`nets()` names) whose parameters the loss of `epoch` reaches."""
        return ("model",)

    def phases_nets(self) -> list[tuple[str, ...]]:
        """Every set of networks some epoch uses (one DDP wrapper each under --parallel batch)."""
        return [("model",)]

    def init_head(self, mean_target: float) -> None:
        """--head-init mean: start the head's bias at the mean training target (the same optimum,
        reached without the first epochs of climbing to the score range); default: PyTorch's."""
        if self.head_init == "mean":
            with torch.no_grad():
                self.model.head.bias.fill_(mean_target)

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)[0]

    def use_grad_scaler(self, grad_scaler: torch.amp.GradScaler) -> None:
        """Tell the networks the loss scale of fp16 training (the mask's gradient clamp needs it)."""

    def loss_terms(self, pixels: torch.Tensor, target: torch.Tensor, teacher_feature: torch.Tensor | None,
                   epoch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return terms["score"]

    def forward(self, pixels: torch.Tensor, target: torch.Tensor, teacher_feature: torch.Tensor | None = None,
                epoch: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch and the named scalars to log (detached)."""
        terms = self.loss_terms(pixels, target, teacher_feature, epoch)
        loss = self.total_loss(terms)
        return loss, {f"loss_{name}": value.detach() for name, value in terms.items()}

    def config(self) -> dict:
        return self.model.config()


class TeacherMethod(Method):
    """The teacher: MSE between the score of the six-face network and the subjective score."""

    view = "faces"
    kind = "teacher"

    def loss_terms(self, pixels, target, teacher_feature=None, epoch=1):
        score, _ = self.model(pixels)
        return {"score": F.mse_loss(score.float(), target)}


class StudentMethod(Method):
    """The ERP student: supervised only (`--kd none`) or with the distillation schedule."""

    view = "erp"
    kind = "student"

    def __init__(self, model: nn.Module, distill: DistillSettings, head_init: str = "mean") -> None:
        super().__init__(model, head_init)
        self.distill = distill
        self.policy = PolicyNet(model.feature_dim) if distill.kd == "mask" else None

    def nets(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"policy": self.policy} if self.policy is not None else {})}

    def use_grad_scaler(self, grad_scaler: torch.amp.GradScaler) -> None:
        if self.policy is not None:
            self.policy.grad_scale = current_loss_scale(grad_scaler) if grad_scaler.is_enabled() else None

    def param_groups(self, optim: OptimSettings) -> list[dict]:
        groups = [{"params": list(self.model.parameters()), "lr": optim.lr}]
        if self.policy is not None:
            groups.append({"params": list(self.policy.parameters()), "lr": optim.lr * self.distill.policy_lr_scale})
        return groups

    def nets_in_use(self, epoch: int) -> tuple[str, ...]:
        return ("model", "policy") if self.policy is not None and self.phase(epoch) == "mask" else ("model",)

    def phases_nets(self) -> list[tuple[str, ...]]:
        return [("model",), ("model", "policy")] if self.policy is not None else [("model",)]

    def phase(self, epoch: int) -> str:
        d = self.distill
        if d.kd == "none" or epoch <= d.kd_warmup:
            return "supervised"
        if d.kd == "feature" or epoch <= d.kd_warmup + d.kd_feature_epochs:
            return "feature"
        return "mask"

    def loss_terms(self, pixels, target, teacher_feature=None, epoch=1):
        """score, and imitation / mixed when distilling; `mask_teacher_share` (the batch's mean of the
        mask: the share of channels taken from the teacher) in the mask phase, for the log only."""
        score, f_s = self.model(pixels)
        f_s = f_s.float()
        terms = {"score": F.mse_loss(score.float(), target)}
        phase = self.phase(epoch)
        if phase == "feature":
            terms["imitation"] = F.mse_loss(f_s, teacher_feature)
        elif phase == "mask":
            # The mixed-feature loss trains the policy and the head, never the trunk (f_s is detached
            # in the mix); the trunk learns by imitating the mix.
            mask = self.policy(f_s, teacher_feature)
            f_m = mix(f_s.detach(), teacher_feature, mask)
            terms["mixed"] = F.mse_loss(self.model.score(f_m), target)
            terms["imitation"] = F.mse_loss(f_s, f_m.detach())
            terms["mask_teacher_share"] = mask.detach().float().mean()
        return terms

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = terms["score"]
        if "mixed" in terms:
            loss = loss + terms["mixed"]
        if "imitation" in terms:
            loss = loss + self.distill.kd_weight * terms["imitation"]
        return loss

    def forward(self, pixels, target, teacher_feature=None, epoch=1):
        loss, scalars = super().forward(pixels, target, teacher_feature, epoch)
        if "loss_mask_teacher_share" in scalars:
            scalars["mask_teacher_share"] = scalars.pop("loss_mask_teacher_share")
        return loss, scalars


def build_network(kind: str, model: ModelSettings) -> nn.Module:
    """The teacher or student network of `model`'s settings."""
    config = {"arch": model.arch, "pretrained": model.pretrained, "weights_path": model.weights,
              "normalize": model.normalize}
    if kind == "teacher":
        config["face_batchnorm"] = model.face_batchnorm
    return build_model(kind, **config)


def teacher_method(model: ModelSettings) -> TeacherMethod:
    return TeacherMethod(build_network("teacher", model), model.head_init)


def student_method(model: ModelSettings, distill: DistillSettings) -> StudentMethod:
    return StudentMethod(build_network("student", model), distill, model.head_init)
