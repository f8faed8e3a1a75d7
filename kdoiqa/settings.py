"""Typed settings: what library code takes instead of argparse Namespaces.

Each group is a small frozen dataclass whose field names are the flags' destinations, so that
`cli.py` builds them from parsed arguments with `from_args(Group, args)` and library code never
sees a Namespace. A training run gets one `TrainingSettings` holding every group.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DataSettings:
    """Which pixels the networks see and how they are loaded."""

    erp_size: tuple[int, int] = (1024, 512)   # student input, width x height
    face_size: int = 256                      # cube-face side of the teacher's input
    faces: str = "auto"                       # faces from faces_<size>/ PNGs (disk), the ERP (online), or auto
    face_jpeg_quality: int | None = None      # None: lossless faces; N: the paper's JPEG-N faces
    cache: str = "auto"                       # decoded-once pixel cache: auto, cpu, gpu, none
    workers: int = 4                          # data-loading worker processes (0: in the main process)


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the networks run; never changes a result beyond floating-point rounding."""

    device: str | None = None                 # None: cuda when present, else cpu
    amp: str = "auto"                         # auto (bf16 on CUDA, none on CPU), bf16, fp16, none
    tf32: bool = True                         # TF32 matmuls and convolutions on CUDA
    compile: bool = False
    deterministic: bool = False
    progress: bool = True
    parallel: str = "folds"                   # under torchrun: folds (whole folds per rank) or batch (DDP)
    sync_bn: bool = False


@dataclass(frozen=True)
class ModelSettings:
    arch: str = "resnet18"
    pretrained: bool = True
    weights: str | None = None                # ImageNet weights file for offline machines
    normalize: str = "imagenet"               # imagenet or none (the paper's ToTensor() input)
    head_init: str = "mean"                   # mean (head bias = mean training target) or default (PyTorch's)
    face_batchnorm: str = "joint"             # joint (one call over all faces) or per-face (the paper's)


@dataclass(frozen=True)
class OptimSettings:
    epochs: int = 100
    batch_size: int = 6
    lr: float = 2e-4
    weight_decay: float = 5e-4
    seed: int = 2023
    seeding: str = "per-fold"                 # per-fold (seed + k before each fold) or once (the paper's)
    lr_schedule: str = "cosine"               # cosine or constant (the paper's)
    target_scale: str = "raw"                 # raw scores (the paper) or range (mapped to [0, 1])


@dataclass(frozen=True)
class EvalSettings:
    select: str = "last"                      # last, val (best on held-out training contents), test (the paper's)
    select_metric: str = "srcc+plcc"          # the criterion of --select val/test
    val_fraction: float = 0.15
    fit: str = "logistic4"
    eval_every: int = 1


@dataclass(frozen=True)
class RunSettings:
    database: str | None = None               # --database (or, cross-database, the pair below)
    data_root: str | None = None
    database_train: str | None = None
    database_test: str | None = None
    out: str | None = None
    resume: bool = False
    save_every: int = 0                       # also write the resumable state every N epochs (0: by time only)
    save_minutes: float = 5.0                 # write it when this many minutes have passed since the last write
    fold: int | None = None                   # train only this fold
    folds: int = 5                            # number of content-disjoint folds of the default split
    folds_file: str | None = None
    split_seed: int = 2023                    # seed of the default split (never the training seed)


@dataclass(frozen=True)
class DistillSettings:
    kd: str = "mask"                          # mask (the paper), feature, none (the baseline)
    features_dir: str | None = None           # the teacher features (default features/<database key>)
    kd_warmup: int = 5
    kd_feature_epochs: int = 5
    kd_weight: float = 0.2
    policy_lr_scale: float = 0.5


@dataclass(frozen=True)
class TrainingSettings:
    """Everything one training run needs, grouped; `args` is the parsed command line (for args.json)."""

    script: str
    protocol: str
    data: DataSettings
    runtime: RuntimeSettings
    model: ModelSettings
    optim: OptimSettings
    eval: EvalSettings
    run: RunSettings
    distill: DistillSettings | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The resolved settings as plain JSON types (args.json, checkpoints, results)."""
        out: dict[str, Any] = {"script": self.script, "protocol": self.protocol}
        for name in ("data", "runtime", "model", "optim", "eval", "run", "distill"):
            group = getattr(self, name)
            out[name] = None if group is None else _plain(asdict(group))
        return out


def from_args(cls: type[T], args: Any, **overrides: Any) -> T:
    """Build `cls` from the attributes of `args` named like its fields (missing ones keep their default)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    values.update(overrides)
    return cls(**values)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# The two protocols: presets over the flags above (an explicit flag always wins).

SELECT_METRICS: tuple[str, ...] = ("srcc+plcc", "srcc", "abs-srcc", "abs-srcc+abs-plcc")

# The paper's epoch-selection criterion per script (its code, script by script).
PAPER_SELECT_METRIC: dict[str, str] = {
    "teacher_train": "srcc+plcc",
    "mask_train": "srcc",                      # mask_train.py and baseline_train.py
    "teacher_crossdb_train": "abs-srcc+abs-plcc",
    "crossdb_train": "abs-srcc",
}

PROTOCOLS: dict[str, dict[str, Any]] = {
    "ours": {
        "normalize": "imagenet", "lr_schedule": "cosine", "amp": "auto", "tf32": True, "face_batchnorm": "joint",
        "head_init": "mean", "select": "last", "select_metric": "srcc+plcc", "seeding": "per-fold",
        "face_jpeg_quality": None, "fit": "logistic4",
    },
    "paper": {
        "normalize": "none", "lr_schedule": "constant", "amp": "none", "tf32": False, "face_batchnorm": "per-face",
        "head_init": "default", "select": "test", "select_metric": None, "seeding": "once",
        "face_jpeg_quality": 75, "fit": "paper",
    },
}

# What each protocol's preset sets, in words: (setting, ours, paper, applies to the student too).
PROTOCOL_PARTS: tuple[tuple[str, str, bool], ...] = (
    ("ImageNet normalisation", "no input normalisation", True),
    ("cosine rate", "constant rate", True),
    ("bf16 and TF32 on CUDA", "fp32 (TF32 off)", True),
    ("one backbone call over all faces", "BatchNorm per face position", False),
    ("head bias at the mean score", "PyTorch's head initialisation", True),
    ("last epoch reported", "best epoch on the test fold ({metric})", True),
    ("seed + fold before each fold", "seed 2023 once before the folds", True),
    ("lossless faces", "JPEG-75 faces", False),
    ("logistic fit with a line when it fails or is a step", "the paper's fit_function as it comes", True),
    ("the database's split", "the authors' folds when the database folder has folds/authors.json", True),
)


def protocol_note(protocol: str, metric: str, *, teacher: bool) -> str:
    """The one line a run prints about its protocol: only what applies to its network."""
    column = 0 if protocol == "ours" else 1
    parts = [part[column].format(metric=metric) for part in PROTOCOL_PARTS if teacher or part[2]]
    return f"{protocol}: " + ", ".join(parts)


def protocol_value(protocol: str, name: str, script: str | None = None) -> Any:
    """The value `protocol` gives the setting `name` (for `select_metric`, the script's own rule)."""
    value = PROTOCOLS[protocol][name]
    if name == "select_metric" and value is None:
        value = PAPER_SELECT_METRIC.get(script or "", "srcc+plcc")
    return value
