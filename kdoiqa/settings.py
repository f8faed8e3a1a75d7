"""Typed settings: what library code takes instead of argparse Namespaces, and the one source of each
training flag.

Each group is a small frozen dataclass. Every field is declared with `setting(...)`: its default, its
help text, how a command-line word becomes its value, its two protocol values, and what a resumed run,
a checkpoint and a `next:` hint do with it. `cli.py` generates the scripts' parsers from these fields,
applies the protocol preset as a layer over the defaults, and groups the values into the dataclasses;
reproduce.py and the cross-database matrix build settings from values directly. Adding a flag is adding
a field here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

from kdoiqa.common import DEFAULT_SEED, parse_size

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# How a command-line word becomes a value (a ValueError says what is wrong; argparse shows its text).

def erp_size(text: str) -> tuple[int, int]:
    """WxH of an equirectangular image: twice as wide as high."""
    width, height = parse_size(text, name="--erp-size")
    if width != 2 * height:
        raise ValueError(f"--erp-size {text}: an equirectangular image is twice as wide as high "
                         f"(e.g. 1024x512), got {width}x{height}")
    return width, height


def at_least(minimum: float, what: str, kind: type = int) -> Callable[[str], Any]:
    """A number of `kind` (int or float) of at least `minimum`."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:  # also refuses nan
            raise ValueError(f"expected {what}, got {text!r}")
        return value
    return parse


positive = at_least(1, "a positive integer")
non_negative = at_least(0, "an integer >= 0")
minutes = at_least(0.0, "a number of minutes >= 0", float)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# A setting's declaration.

@dataclass(frozen=True)
class Flag:
    """What the command line and the run files need to know of one setting (a field's metadata)."""

    group: str                                  # the --help group (see cli.GROUP_TITLES)
    help: str
    parse: Callable[[str], Any] | None = None   # the command-line word -> the value (None: the word itself)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    spelling: str | None = None                 # the flag, when not --<name-with-dashes> (--no-pretrained)
    protocol: Mapping[str, Any] | None = None   # ours/paper values, applied where the flag is not given
    words: Mapping[str, Any] | None = None      # command-line word -> setting value (--tf32 on -> True)
    teacher_only: bool = False                  # accepted but not listed by the student scripts
    resume_free: bool = False                   # a resumed run may change it: it does not change what is trained
    in_checkpoint: bool = True                  # kept in checkpoints (what defines a fold's model)
    carried: tuple[str, ...] = ()               # repeated by the `next:` hint of these steps: features, student
    flag_default: Any = None                    # the flag's default where the field's (None) means "not this kind
                                                # of run": --database OIQA, as the paper's scripts

    @property
    def by_protocol(self) -> bool:
        return self.protocol is not None


def setting(default: Any = MISSING, help: str = "", *, group: str, factory: Callable[[], Any] | None = None,
            **flag: Any) -> Any:
    """A dataclass field declared once: its default and its Flag."""
    meta = {"flag": Flag(group=group, help=help, **flag)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if flag.get("protocol") is not None and default is MISSING:
        default = flag["protocol"]["ours"]
    return field(default=default, metadata=meta)


def _both(ours: Any, paper: Any) -> dict[str, Any]:
    return {"ours": ours, "paper": paper}


# ----------------------------------------------------------------------------------------------
# The groups.

@dataclass(frozen=True)
class DataSettings:
    """Which pixels the networks see and how they are loaded."""

    erp_size: tuple[int, int] = setting(
        (1024, 512), "student input: the ERP image resized to WxH, 2:1 (paper: 1024x512)", group="data",
        parse=erp_size, metavar="WxH", carried=("student",))
    face_size: int = setting(256, "teacher input: cube-face side in pixels (paper: 256)", group="data",
                             parse=positive, teacher_only=True)
    faces: str = setting(
        "auto", "teacher faces from faces_<size>/ PNGs (disk), projected from the ERP on the training device "
        "(online), or disk when every face is there (auto)", group="data", choices=("auto", "disk", "online"),
        teacher_only=True)
    face_jpeg_quality: int | None = setting(
        help="faces written as JPEG of quality N at native size before resizing, as the paper's MATLAB",
        group="data", parse=positive, metavar="N", protocol=_both(None, 75), teacher_only=True)
    cache: str = setting(
        "auto", "decode every image once and keep the uint8 pixels in memory (auto: gpu on CUDA when it fits, "
        "else cpu when it fits, else none = stream from disk)", group="data", choices=("auto", "none", "cpu", "gpu"),
        resume_free=True, carried=("student",))
    workers: int = setting(help="data-loading worker processes (0: load in the main process)", group="data",
                           factory=default_workers, parse=non_negative, resume_free=True,
                           carried=("features", "student"))


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the networks run; never changes a result beyond floating-point rounding."""

    device: str | None = setting(None, "cpu, cuda, cuda:1 ... (default: cuda when present)", group="runtime",
                                 resume_free=True, carried=("features", "student"))
    amp: str = setting(
        help="mixed precision; auto = bf16 on a GPU that computes it natively, else none (fp32); the score head "
        "and projector stay fp32", group="runtime", choices=("auto", "bf16", "fp16", "none"),
        protocol=_both("auto", "none"), carried=("student",))
    tf32: bool = setting(help="TF32 matmuls and convolutions on CUDA", group="runtime", choices=("on", "off"),
                         words={"on": True, "off": False}, protocol=_both(True, False))
    progress: bool = setting(True, "no progress bars (one line per epoch instead)", group="runtime",
                             spelling="--no-progress", resume_free=True)
    compile: bool = setting(False, "torch.compile the model (CUDA)", group="training runtime", resume_free=True)
    deterministic: bool = setting(
        False, "deterministic algorithms only (PyTorch refuses the others), no cuDNN autotuning, "
        "CUBLAS_WORKSPACE_CONFIG set; CPU runs are deterministic anyway", group="training runtime", resume_free=True)
    parallel: str = setting(
        "folds", "under torchrun: folds = each process trains whole folds r, r+N, ... (pays for the k-fold protocol "
        "at any batch size: the paper's batch of 6 split over GPUs would leave one or two images each); batch = "
        "DistributedDataParallel over each step's batch (pays for large databases trained with large batches, or "
        "a single split such as a cross-database run). A process waits for the others' work without a time limit; "
        "one collective may take at most KDOIQA_COLLECTIVE_TIMEOUT seconds (default 1800)",
        group="training runtime", choices=("folds", "batch"), resume_free=True)
    sync_bn: bool = setting(
        False, "with --parallel batch: BatchNorm statistics over all processes (a process whose share of a short "
        "last batch is empty joins with a stand-in row of weight 0; that row does enter the statistics of that "
        "one step)", group="training runtime", in_checkpoint=False)


@dataclass(frozen=True)
class ModelSettings:
    arch: str = setting("resnet18", "backbone", group="model", choices=("resnet18", "resnet34", "resnet50"),
                        carried=("student",))
    pretrained: bool = setting(True, "random initialisation (no ImageNet download)", group="model",
                               spelling="--no-pretrained", carried=("student",))
    weights: str | None = setting(
        None, "ImageNet weights file for offline machines, torchvision's resnet18-f37072fd.pth (default: "
        "torchvision's download, unless --no-pretrained)", group="model", metavar="PATH", carried=("student",))
    normalize: str = setting(help="input normalisation; none = the paper's ToTensor() input", group="model",
                             choices=("imagenet", "none"), protocol=_both("imagenet", "none"), carried=("student",))
    head_init: str = setting(help="score head: bias at the mean training score, or PyTorch's default", group="model",
                             choices=("mean", "default"), protocol=_both("mean", "default"))
    face_batchnorm: str = setting(
        help="teacher BatchNorm statistics in training: over all faces in one call, or per face position (six "
        "backbone calls, the paper's)", group="model", choices=("joint", "per-face"),
        protocol=_both("joint", "per-face"), teacher_only=True)


@dataclass(frozen=True)
class OptimSettings:
    epochs: int = setting(100, "epochs per fold", group="optim", parse=positive, carried=("student",))
    batch_size: int = setting(6, "images per optimiser step (over all processes)", group="optim", parse=positive,
                              carried=("student",))
    lr: float = setting(2e-4, "Adam learning rate", group="optim", parse=float)
    weight_decay: float = setting(5e-4, "Adam weight decay", group="optim", parse=float)
    seed: int = setting(DEFAULT_SEED, "training seed (initialisation, batch order)", group="optim", parse=int,
                        carried=("student",))
    seeding: str = setting(
        help="seed + fold before each fold (a fold's result does not depend on the others), or the seed once "
        "before the first fold", group="optim", choices=("per-fold", "once"), protocol=_both("per-fold", "once"))
    lr_schedule: str = setting(help="cosine decay makes the reported last epoch a settled one", group="optim",
                               choices=("constant", "cosine"), protocol=_both("cosine", "constant"))
    target_scale: str = setting(
        "raw", "regress the raw score (the paper) or the score mapped to [0,1] by the database's range",
        group="optim", choices=("raw", "range"))


SELECT_METRICS: tuple[str, ...] = ("srcc+plcc", "srcc", "abs-srcc", "abs-srcc+abs-plcc")


@dataclass(frozen=True)
class EvalSettings:
    select: str = setting(
        help="the reported epoch: last (honest), best on a validation split held out of the training contents, "
        "or best on the test fold (the paper's; optimistic)", group="eval", choices=("last", "val", "test"),
        protocol=_both("last", "test"))
    select_metric: str = setting(
        help="criterion of --select val/test (default by --protocol: ours srcc+plcc; paper the script's own rule: "
        "teacher srcc+plcc, student srcc, cross-database teacher abs-srcc+abs-plcc, cross-database student "
        "abs-srcc)", group="eval", choices=SELECT_METRICS, protocol=_both("srcc+plcc", None))
    val_fraction: float = setting(0.15, "share of training contents held out by --select val", group="eval",
                                  parse=float)
    fit: str = setting(
        help="mapping fitted before PLCC/RMSE: logistic4 (the paper's 4-parameter logistic, with a line instead "
        "when it fails or turns into a step), logistic5, paper (the paper's fit_function exactly: one curve_fit, "
        "used as it comes), none", group="eval", choices=("logistic4", "logistic5", "paper", "none"),
        protocol=_both("logistic4", "paper"))
    eval_every: int = setting(1, "evaluate every N epochs (the last epoch always)", group="eval", parse=positive)


DATA_ROOT_HELP = "folder of the registered databases (default ./data or $KDOIQA_DATA)"


@dataclass(frozen=True)
class RunSettings:
    database: str | None = setting(
        None, "registered name (CVIQ, OIQA, IQA-ODI, Synthetic) or a folder holding meta.csv", group="database",
        flag_default="OIQA")
    data_root: str | None = setting(None, DATA_ROOT_HELP, group="database", resume_free=True,
                                    carried=("features", "student"))
    database_train: str | None = setting(
        None, "database A, trained on in full: a registered name or a folder holding meta.csv", group="cross",
        flag_default="CVIQ")
    database_test: str | None = setting(
        None, "database B, tested on in full: a registered name or a folder holding meta.csv", group="cross",
        flag_default="OIQA")
    out: str | None = setting(None, "run folder (default runs/<script>/<database key>/<time>[-<kd>][-paper])",
                              group="run", resume_free=True)
    resume: bool = setting(False, "continue the run in --out from its args.json and each fold's last checkpoint",
                           group="run", resume_free=True)
    save_minutes: float = setting(
        5.0, "write the resumable state (resume.pt: model and Adam, ~150 MB for ResNet-18) when this many minutes "
        "have passed since the last write, and on Ctrl-C or SIGTERM after the epoch in progress; 0 = after every "
        "epoch (default: 5)", group="run", parse=minutes, resume_free=True)
    save_every: int = setting(0, "also write it every N epochs (default 0: by time only)", group="run",
                              parse=non_negative, resume_free=True)
    fold: int | None = setting(None, "train only this fold, 0-based (default: every fold)", group="run", parse=int)
    folds: int = setting(
        5, "number of content-disjoint folds of the database's default split (given with --folds-file, or to a "
        "student that takes its teacher's split, it must be that split's)", group="run", parse=positive)
    folds_file: str | None = setting(
        None, "fold JSON (default <db>/folds/k<folds>_seed<split-seed>.json, made once; "
        "`python dataset.py folds --authors DIR` imports the paper's folds)", group="run")
    split_seed: int = setting(DEFAULT_SEED, "seed of the default split (a property of the database, not of the "
                              "training seed)", group="run", parse=int)


@dataclass(frozen=True)
class DistillSettings:
    kd: str = setting("mask", "mask distillation (the paper), plain feature distillation, or none (the baseline)",
                      group="distill", choices=("mask", "feature", "none"))
    features_dir: str | None = setting(
        None, "teacher feature folder (default: features/<database key>, or features/<A>-to-<B>)", group="distill")
    kd_warmup: int = setting(5, "supervised-only epochs first", group="distill", parse=non_negative)
    kd_feature_epochs: int = setting(5, "epochs of plain feature imitation after the warm-up, before the mask phase",
                                     group="distill", parse=non_negative)
    kd_weight: float = setting(0.2, "weight of the imitation loss", group="distill", parse=float)
    policy_lr_scale: float = setting(0.5, "policy-net learning rate = --lr x this (paper: 1e-4 = 2e-4 / 2)",
                                     group="distill", parse=float)


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
# The registry: every setting of a training script, in the order of the dataclasses.

@dataclass(frozen=True)
class Setting:
    name: str                       # the field, the flag's destination and the key in args.json
    group: type                     # the dataclass holding it (TrainingSettings for --protocol)
    default: Any                    # the field's default
    flag: Flag

    @property
    def option(self) -> str:
        """The flag's spelling: --face-size, --no-pretrained."""
        return self.flag.spelling or "--" + self.name.replace("_", "-")

    @property
    def command_default(self) -> Any:
        """The flag's default on a command line: None for a protocol setting (the protocol fills it in)."""
        if self.flag.by_protocol:
            return None
        return self.default if self.flag.flag_default is None else self.flag.flag_default


GROUPS: dict[str, type] = {"data": DataSettings, "runtime": RuntimeSettings, "model": ModelSettings,
                           "optim": OptimSettings, "eval": EvalSettings, "run": RunSettings, "distill": DistillSettings}

PROTOCOL_FLAG = Flag(group="run", help="preset of every setting that differs from the paper's code: ours (honest, "
                     "stable) or paper (its exact behaviour); each setting is also its own flag, which wins",
                     choices=("ours", "paper"), carried=("student",))


def _registry() -> dict[str, Setting]:
    out = {"protocol": Setting("protocol", TrainingSettings, "ours", PROTOCOL_FLAG)}
    for cls in GROUPS.values():
        for f in fields(cls):
            default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            out[f.name] = Setting(f.name, cls, default, f.metadata["flag"])
    return out


SETTINGS: dict[str, Setting] = _registry()

# Per-script defaults that differ from the fields' (the paper's cross-database scripts train 50 epochs).
SCRIPT_DEFAULTS: dict[str, dict[str, Any]] = {"teacher_crossdb_train": {"epochs": 50}, "crossdb_train": {"epochs": 50}}


def resume_free(name: str) -> bool:
    """Whether a resumed run may change the setting `name` (it does not change what is trained)."""
    return name in SETTINGS and SETTINGS[name].flag.resume_free


def in_checkpoint(group: str, name: str) -> bool:
    """Whether a checkpoint keeps the setting `group.name` (unknown names of older files are kept)."""
    setting_ = SETTINGS.get(name)
    if setting_ is None or GROUPS.get(group) is not setting_.group:
        return True
    return setting_.flag.in_checkpoint and not setting_.flag.resume_free


def from_values(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build the settings group `cls` from the values named like its fields (missing ones keep their
    default), each command-line word turned into its value (--tf32 on -> True)."""
    out = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            value, words = values[f.name], f.metadata["flag"].words
            out[f.name] = words.get(value, value) if words and isinstance(value, str) else value
    return cls(**out)


# ----------------------------------------------------------------------------------------------
# The two protocols: presets over the flags above (an explicit flag always wins).

# The paper's epoch-selection criterion per script (its code, script by script).
PAPER_SELECT_METRIC: dict[str, str] = {
    "teacher_train": "srcc+plcc",
    "mask_train": "srcc",                      # mask_train.py and baseline_train.py
    "teacher_crossdb_train": "abs-srcc+abs-plcc",
    "crossdb_train": "abs-srcc",
}

# Each protocol's value of every setting it presets (from the fields' declarations).
PROTOCOLS: dict[str, dict[str, Any]] = {
    protocol: {name: s.flag.protocol[protocol] for name, s in SETTINGS.items() if s.flag.by_protocol}
    for protocol in ("ours", "paper")
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
