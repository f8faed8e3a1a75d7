"""The teacher: one ResNet shared over the six cube faces of an omnidirectional image.

faces [B, 6, 3, h, w] -> per-face pooled C-d features -> concat (6C) -> ``projector``
Linear(6C -> feature_dim) = the teacher feature f_t -> ``head`` Linear(feature_dim -> 1) = score.
As in the paper (ResNet-18: 6 x 512 = 3072 -> 512 -> 1).

BatchNorm in training: ``face_batchnorm="joint"`` runs the backbone once over all 6B faces (one set
of batch statistics); ``"per-face"`` calls it once per face position, F to BO, as the paper's code:
each position gets its own batch statistics and the running statistics are updated six times per
step in that order. In evaluation both are one call (running statistics, no difference).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from kdoiqa.common import UserError
from kdoiqa.models.backbone import ScoringNet, fp32
from kdoiqa.viewport.layout import FACE_NAMES

FACE_LAYOUT: tuple[str, ...] = FACE_NAMES
NUM_FACES = len(FACE_LAYOUT)
FACE_BATCHNORM_MODES: tuple[str, ...] = ("joint", "per-face")


class TeacherNet(ScoringNet):
    """Score an omnidirectional image from its six cube faces (order ``FACE_LAYOUT``).

    Arguments: `ScoringNet`'s (the feature is the projector's output), and ``face_batchnorm``: ``joint``
    or ``per-face`` (the paper's), the BatchNorm statistics in training.
    """

    kind = "teacher"

    def __init__(self, arch: str = "resnet18", pretrained: bool = True,
                 weights_path: str | os.PathLike | None = None, normalize: str = "imagenet",
                 feature_dim: int = 512, face_batchnorm: str = "joint") -> None:
        super().__init__(arch, pretrained, weights_path, normalize, feature_dim)
        if face_batchnorm not in FACE_BATCHNORM_MODES:
            raise UserError(f"face_batchnorm must be one of {', '.join(FACE_BATCHNORM_MODES)}, got {face_batchnorm!r}")
        self.face_batchnorm = face_batchnorm
        self.num_faces = NUM_FACES
        self.face_layout = FACE_LAYOUT
        self.projector = nn.Linear(NUM_FACES * self.channels, self.feature_dim)

    def face_features(self, faces: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of each face: [B, 6, 3, h, w] -> [B, 6, C]."""
        if faces.dim() != 5 or faces.shape[1] != NUM_FACES or faces.shape[2] != 3:
            raise UserError(f"the teacher takes faces shaped [batch, {NUM_FACES}, 3, h, w], got "
                            f"{list(faces.shape)}: extract the six cube faces ({', '.join(FACE_LAYOUT)}) first")
        x = self.norm(faces)
        if self.training and self.face_batchnorm == "per-face":
            return torch.stack([self.backbone(x[:, f]) for f in range(NUM_FACES)], dim=1)
        return self.backbone(x.flatten(0, 1)).view(faces.shape[0], NUM_FACES, self.channels)  # one shared backbone

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """faces [B, 6, 3, h, w] (uint8 or float in [0, 1]) -> (score [B], feature [B, feature_dim])."""
        feature = fp32(self.projector, self.face_features(faces).flatten(1))
        return self.score(feature), feature

    def config(self) -> dict[str, Any]:
        """Architecture as plain types; ``models.model_from_config`` rebuilds the model from it."""
        return {**super().config(), "face_batchnorm": self.face_batchnorm, "num_faces": self.num_faces,
                "face_layout": list(self.face_layout)}
