"""The student: a ResNet on the equirectangular (ERP) image alone.

erp [B, 3, H, W] -> pooled C-d feature -> ``proj`` (Linear(C -> feature_dim) only when
C != feature_dim, e.g. ResNet-50's 2048; identity otherwise, as in the paper's ResNet-18)
= the student feature f_s -> ``head`` Linear(feature_dim -> 1) = score.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from kdoiqa.common import UserError
from kdoiqa.models.backbone import ScoringNet, fp32


class StudentNet(ScoringNet):
    """Score an omnidirectional image from its ERP projection (arguments: `ScoringNet`'s; the feature
    size must equal the teacher's for distillation)."""

    kind = "student"

    def __init__(self, arch: str = "resnet18", pretrained: bool = True,
                 weights_path: str | os.PathLike | None = None, normalize: str = "imagenet",
                 feature_dim: int = 512) -> None:
        super().__init__(arch, pretrained, weights_path, normalize, feature_dim)
        self.proj: nn.Module = (nn.Linear(self.channels, self.feature_dim) if self.channels != self.feature_dim
                                else nn.Identity())

    def features(self, erp: torch.Tensor) -> torch.Tensor:
        """The student feature f_s: [B, 3, H, W] -> [B, feature_dim]."""
        if erp.dim() != 4 or erp.shape[1] != 3:
            raise UserError(f"the student takes ERP images shaped [batch, 3, H, W], got {list(erp.shape)}")
        return fp32(self.proj, self.backbone(self.norm(erp)))

    def forward(self, erp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """erp [B, 3, H, W] (uint8 or float in [0, 1]) -> (score [B], feature [B, feature_dim])."""
        feature = self.features(erp)
        return self.score(feature), feature
