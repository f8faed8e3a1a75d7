"""Networks of KD-OIQA: cube-face teacher, ERP student, mask-distillation policy net.

``build_model(kind, **config)`` builds one; ``model_from_config(model.config())`` rebuilds the
same architecture (randomly initialised, nothing downloaded) so that a checkpoint's state dict
can be loaded into it.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from kdoiqa.common import UserError
from kdoiqa.models.backbone import ARCHS, NORMALIZE_MODES, InputNorm, build_backbone
from kdoiqa.models.policy import BinarizeSTE, PolicyNet, mix
from kdoiqa.models.student import StudentNet
from kdoiqa.models.teacher import FACE_LAYOUT, NUM_FACES, TeacherNet

MODEL_CLASSES: dict[str, type[nn.Module]] = {"teacher": TeacherNet, "student": StudentNet, "policy": PolicyNet}

__all__ = [
    "ARCHS",
    "FACE_LAYOUT",
    "NORMALIZE_MODES",
    "NUM_FACES",
    "BinarizeSTE",
    "InputNorm",
    "PolicyNet",
    "StudentNet",
    "TeacherNet",
    "build_backbone",
    "build_model",
    "mix",
    "model_from_config",
]


def build_model(kind: str, **config: Any) -> nn.Module:
    """Build a ``teacher``, ``student`` (or ``policy``) with the given constructor arguments.

    Unknown arguments are a UserError naming the accepted ones.
    """
    if kind not in MODEL_CLASSES:
        raise UserError(f"unknown model kind {kind!r}: choose one of {', '.join(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[kind]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise UserError(f"{kind} model: unknown setting(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})")
    return cls(**config)


def model_from_config(config: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild a model from its ``config()`` (as saved in a checkpoint).

    The backbone is built without pretrained weights (``pretrained=False``) unless ``overrides``
    say otherwise: the checkpoint's state dict supplies every weight. Descriptive keys of the
    config (``num_faces``, ``face_layout``) are checked against this code, not passed on.
    """
    if not isinstance(config, dict) or "kind" not in config:
        raise UserError("model config must be a dict with a 'kind' (teacher/student): the checkpoint is not one of ours")
    settings = dict(config)
    kind = settings.pop("kind")
    num_faces = settings.pop("num_faces", None)
    layout = settings.pop("face_layout", None)
    if kind == "teacher":
        if num_faces is not None and int(num_faces) != NUM_FACES:
            raise UserError(f"checkpoint teacher uses {num_faces} faces; this code uses {NUM_FACES}")
        if layout is not None and tuple(layout) != FACE_LAYOUT:
            raise UserError(f"checkpoint teacher face order {list(layout)} differs from this code's {list(FACE_LAYOUT)}")
    if kind in ("teacher", "student"):
        settings.setdefault("pretrained", False)
        settings.setdefault("weights_path", None)
    settings.update(overrides)
    return build_model(kind, **settings)
