"""ResNet trunks (torchvision) returning pooled features, and the input normalisation module.

Weights come from torchvision's weights API (``ResNet18_Weights.IMAGENET1K_V1`` ...), from a
state-dict file (``weights_path``, for offline machines), or nowhere (``pretrained=False``:
torchvision's default random initialisation). A failed download is a ``UserError`` that names
``--no-pretrained``, ``--weights PATH``, the file torchvision expects and where it looks for it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from kdoiqa.common import UserError, torch_load

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
NORMALIZE_MODES: tuple[str, ...] = ("imagenet", "none")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_WEIGHTS = {
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet34": ("resnet34", "ResNet34_Weights"),
    "resnet50": ("resnet50", "ResNet50_Weights"),
}


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier: images [B, 3, H, W] -> pooled features [B, C].

    The submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so
    a torchvision state dict (less ``fc.*``) loads into it key for key.
    """

    def __init__(self, resnet: nn.Module, arch: str) -> None:
        super().__init__()
        self.arch = arch
        self.out_features = int(resnet.fc.in_features)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            self.add_module(name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # the input in the weights' layout (CUDA runs)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if x.is_cuda and torch.are_deterministic_algorithms_enabled():
            # AdaptiveAvgPool2d has no deterministic CUDA backward (PyTorch refuses it under --deterministic);
            # the mean over the spatial positions is the same global pool, with a deterministic backward.
            return x.mean(dim=(2, 3))
        return torch.flatten(self.avgpool(x), 1)


def weights_enum(arch: str) -> Any:
    """torchvision's default ImageNet weights entry for ``arch`` (e.g. ``ResNet18_Weights.IMAGENET1K_V1``)."""
    _check_arch(arch)
    # V1 everywhere: the paper's ResNet-18 only has V1, and V1 keeps the three archs alike.
    return getattr(torchvision.models, _WEIGHTS[arch][1]).IMAGENET1K_V1


def expected_weights_file(arch: str) -> str:
    """The file name torchvision downloads for ``arch`` (e.g. ``resnet18-f37072fd.pth``)."""
    return os.path.basename(weights_enum(arch).url)


def _check_arch(arch: str) -> None:
    if arch not in _WEIGHTS:
        raise UserError(f"unknown backbone {arch!r}: choose one of {', '.join(ARCHS)}")


def _download_state_dict(arch: str) -> dict[str, torch.Tensor]:
    weights = weights_enum(arch)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (URLError, OSError, RuntimeError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"could not download the ImageNet weights for {arch} ({reason}); on an offline machine "
            f"either pass --no-pretrained (random initialisation) or --weights PATH (torchvision's "
            f"{expected_weights_file(arch)}), or copy that file into {cache}/ where torchvision finds it"
        ) from None


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``; UserError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file (expected a torchvision ResNet state dict, .pth)")
    state = torch_load(path, what="torch state dict (--weights: torchvision's resnet .pth)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: expected a state dict of tensors (torchvision's resnet .pth)")
    return state


def _load_trunk(backbone: Backbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ResNet weights into the trunk: strict on every trunk key, ``fc.*`` ignored."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    # Older torchvision files lack BatchNorm's num_batches_tracked; BatchNorm fills it in itself.
    missing = sorted(k for k in set(own) - set(trunk) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(trunk) - set(own))
    wrong = sorted(k for k in set(own) & set(trunk) if own[k].shape != trunk[k].shape)
    if missing or unexpected or wrong:
        details = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                details.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise UserError(f"{source} does not fit a torchvision {backbone.arch}: {', '.join(details)}; "
                        f"pass the .pth of the same architecture (--arch) or --no-pretrained")
    backbone.load_state_dict(trunk, strict=True)


def build_backbone(arch: str = "resnet18", pretrained: bool = True,
                   weights_path: str | os.PathLike | None = None) -> tuple[Backbone, int]:
    """A ResNet trunk returning pooled ``[B, C]`` features, and C (512 for 18/34, 2048 for 50).

    Args:
        arch: ``resnet18``, ``resnet34`` or ``resnet50``.
        pretrained: load torchvision's ImageNet weights (downloaded and cached by torch hub).
            False: torchvision's default random initialisation.
        weights_path: a state-dict file of the full torchvision ResNet (``fc.*`` ignored, every
            trunk key required); takes precedence over ``pretrained``, nothing is downloaded.
    """
    _check_arch(arch)
    resnet = getattr(torchvision.models, _WEIGHTS[arch][0])(weights=None)
    backbone = Backbone(resnet, arch)
    if weights_path is not None:
        _load_trunk(backbone, load_weights_file(weights_path), f"--weights {weights_path}")
    elif pretrained:
        _load_trunk(backbone, _download_state_dict(arch), f"torchvision's {expected_weights_file(arch)}")
    return backbone, backbone.out_features


class InputNorm(nn.Module):
    """Turn images into the network's input: uint8 -> float in [0, 1], then optional ImageNet norm.

    ``mode="none"`` is the paper's exact input (``ToTensor()`` only); ``"imagenet"`` subtracts
    the ImageNet mean and divides by its std, channel-wise. Works on any shape whose
    third-from-last dimension is the 3 colour channels ([B, 3, H, W], [B, 6, 3, h, w], ...).
    Float input is taken to be in [0, 1] already. The statistics are non-persistent buffers:
    they follow ``.to(device)`` and stay out of checkpoints.
    """

    def __init__(self, mode: str = "imagenet") -> None:
        super().__init__()
        if mode not in NORMALIZE_MODES:
            raise UserError(f"unknown normalisation {mode!r}: choose one of {', '.join(NORMALIZE_MODES)}")
        self.mode = mode
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0
        elif not torch.is_floating_point(x):
            x = x.to(self.mean.dtype)
        if self.mode == "imagenet":
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class ScoringNet(nn.Module):
    """What the teacher and the student share: input normalisation, a ResNet trunk, and a linear head
    that maps a `feature_dim` feature to the score. Subclasses add what lies between trunk and head.

    Args:
        arch: backbone, ``resnet18`` (paper), ``resnet34`` or ``resnet50``.
        pretrained: start the backbone from torchvision's ImageNet weights.
        weights_path: start it from this state-dict file instead (offline machines).
        normalize: ``imagenet`` or ``none`` (the paper's ``ToTensor()``-only input).
        feature_dim: size of the feature the head scores (512 in the paper; teacher and student alike).
    """

    kind = ""

    def __init__(self, arch: str, pretrained: bool, weights_path: str | os.PathLike | None, normalize: str,
                 feature_dim: int) -> None:
        super().__init__()
        self.arch = arch
        self.normalize = normalize
        self.feature_dim = int(feature_dim)
        self.norm = InputNorm(normalize)
        self.backbone, self.channels = build_backbone(arch, pretrained=pretrained, weights_path=weights_path)
        self.head = nn.Linear(self.feature_dim, 1)

    def score(self, feature: torch.Tensor) -> torch.Tensor:
        """The head's score [B] of features [B, feature_dim], always in fp32 (see `fp32`)."""
        return fp32(self.head, feature).squeeze(-1)

    def config(self) -> dict[str, Any]:
        """Architecture as plain types; ``models.model_from_config`` rebuilds the model from it."""
        return {"kind": self.kind, "arch": self.arch, "normalize": self.normalize, "feature_dim": self.feature_dim}


def fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in fp32 even under autocast: the score head and the feature projectors. Scores on a
    0-100 scale in bf16 would come in steps of 0.125-0.5, and cached teacher features would be rounded."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool | None = None) -> nn.Module:
    """`model` on `device`, in the channels_last layout (the backbone puts its input in it too) when
    `channels_last` says so: by default on CUDA, where cuDNN's convolutions are fastest in it."""
    model.to(device)
    if device.type == "cuda" if channels_last is None else channels_last:
        model.to(memory_format=torch.channels_last)
    return model
