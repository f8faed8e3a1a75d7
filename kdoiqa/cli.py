"""The command-line layer: one parent parser per flag group, and parsed flags -> typed settings.

Every script builds its parser from these groups with `parents=[...]`, so a flag has one name,
one meaning and one default everywhere. The paper's spellings (`--num_epochs`, `--batch_size`,
`--database_train`, any `--foo_bar` for `--foo-bar`) are accepted. Only this module reads
argparse Namespaces; library code takes the dataclasses of `settings.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kdoiqa.common import DEFAULT_SEED, UserError, jsonable, parse_size
from kdoiqa.settings import (
    PROTOCOLS,
    SELECT_METRICS,
    DataSettings,
    DistillSettings,
    EvalSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    RuntimeSettings,
    TrainingSettings,
    from_args,
    protocol_value,
)

DEFAULT_DATABASE = "OIQA"  # as the paper's scripts
PAPER_SPELLINGS = {"--num_epochs": "--epochs", "--num-epochs": "--epochs", "--features": "--features-dir"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring verbatim, and every flag's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "(default" in text or default is argparse.SUPPRESS or default is None \
                or isinstance(default, bool) or action.nargs == 0:
            return text
        if isinstance(default, tuple) and len(default) == 2:
            return f"{text} (default: {default[0]}x{default[1]})"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ArgumentParser that also takes the paper's spellings of our flags, and reports a bad command line as a
    UserError (`run_cli` prints it as one line, exit code 2) instead of the usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._normalise(argv), namespace)

    def _normalise(self, argv: list[str]) -> list[str]:
        known = set(self._option_string_actions)
        out = []
        for i, token in enumerate(argv):
            if token == "--":
                return out + argv[i:]
            if token.startswith("--"):
                name, eq, value = token.partition("=")
                alias = PAPER_SPELLINGS.get(name, name.replace("_", "-"))
                if name not in known and alias in known:
                    token = alias + eq + value
            out.append(token)
        return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, frozenset[str]]:
    """Parsed arguments and the destinations given explicitly on the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = parser.parse_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return args, frozenset(vars(given))


def size_type(name: str) -> Callable[[str], tuple[int, int]]:
    """An argparse type: `parse_size` for the flag `name`, its ValueError as argparse's message."""
    def parse(text: str) -> tuple[int, int]:
        try:
            return parse_size(text, name=name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def erp_size_type(text: str) -> tuple[int, int]:
    """WxH of an equirectangular image: twice as wide as high."""
    width, height = size_type("--erp-size")(text)
    if width != 2 * height:
        raise argparse.ArgumentTypeError(f"--erp-size {text}: an equirectangular image is twice as wide as high "
                                         f"(e.g. 1024x512), got {width}x{height}")
    return width, height


def at_least(minimum: float, what: str, kind: type = int):
    """An argparse type: a number of `kind` (int or float) of at least `minimum`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive = at_least(1, "a positive integer")
non_negative = at_least(0, "an integer >= 0")
minutes = at_least(0.0, "a number of minutes >= 0", float)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def by_protocol(name: str) -> str:
    """Help-text tail for a flag whose default comes from --protocol."""
    ours, paper = PROTOCOLS["ours"][name], PROTOCOLS["paper"][name]
    show = lambda v: "lossless" if v is None and name == "face_jpeg_quality" else str(v)  # noqa: E731
    return f"(default by --protocol: ours {show(ours)}, paper {show(paper)})"


# ----------------------------------------------------------------------------------------------
# Flag groups.

def database_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("database")
    g.add_argument("--database", default=DEFAULT_DATABASE,
                   help="registered name (CVIQ, OIQA, IQA-ODI, Synthetic) or a folder holding meta.csv")
    g.add_argument("--data-root", default=None, help="folder of the registered databases (default ./data or $KDOIQA_DATA)")
    return p


def cross_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("cross-database (the paper's --database_train / --database_test work too)")
    g.add_argument("--database-train", default="CVIQ",
                   help="database A, trained on in full: a registered name or a folder holding meta.csv")
    g.add_argument("--database-test", default="OIQA",
                   help="database B, tested on in full: a registered name or a folder holding meta.csv")
    g.add_argument("--data-root", default=None, help="folder of the registered databases (default ./data or $KDOIQA_DATA)")
    g.add_argument("--database", default=None, help=argparse.SUPPRESS)  # refused with a hint (check_cross_values)
    return p


def check_cross_values(args: argparse.Namespace) -> None:
    if getattr(args, "database", None):
        raise UserError("cross-database scripts take --database-train A --database-test B, not --database")


def data_parser(*, student: bool = False) -> argparse.ArgumentParser:
    """The data flags; for a student script the teacher-only ones are accepted (a command line shared with the
    teacher works) but not listed in --help."""
    p = Parser(add_help=False)
    g = p.add_argument_group("data")
    teacher_only = (lambda text: argparse.SUPPRESS) if student else (lambda text: text)
    g.add_argument("--erp-size", type=erp_size_type, default=(1024, 512), metavar="WxH",
                   help="student input: the ERP image resized to WxH, 2:1 (paper: 1024x512)")
    g.add_argument("--face-size", type=positive, default=256,
                   help=teacher_only("teacher input: cube-face side in pixels (paper: 256)"))
    g.add_argument("--faces", choices=("auto", "disk", "online"), default="auto",
                   help=teacher_only("teacher faces from faces_<size>/ PNGs (disk), projected from the ERP on the "
                                     "training device (online), or disk when every face is there (auto)"))
    g.add_argument("--face-jpeg-quality", type=positive, default=None, metavar="N",
                   help=teacher_only(f"faces written as JPEG of quality N at native size before resizing, as the "
                                     f"paper's MATLAB {by_protocol('face_jpeg_quality')}"))
    g.add_argument("--cache", choices=("auto", "none", "cpu", "gpu"), default="auto",
                   help="decode every image once and keep the uint8 pixels in memory (auto: gpu on CUDA when it "
                        "fits, else cpu when it fits, else none = stream from disk)")
    g.add_argument("--workers", type=non_negative, default=default_workers(),
                   help="data-loading worker processes (0: load in the main process)")
    return p


def runtime_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default=None,
                   help=f"mixed precision; auto = bf16 on a GPU that computes it natively, else none (fp32); the "
                        f"score head and projector stay fp32 {by_protocol('amp')}")
    g.add_argument("--tf32", choices=("on", "off"), default=None,
                   help="TF32 matmuls and convolutions on CUDA (default by --protocol: ours on, paper off)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (one line per epoch instead)")
    return p


def training_runtime_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False, parents=[runtime_parser()])
    g = p.add_argument_group("runtime (training)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (PyTorch refuses the others), no cuDNN autotuning, "
                        "CUBLAS_WORKSPACE_CONFIG set; CPU runs are deterministic anyway")
    g.add_argument("--parallel", choices=("folds", "batch"), default="folds",
                   help="under torchrun: folds = each process trains whole folds r, r+N, ... (pays for the k-fold "
                        "protocol at any batch size: the paper's batch of 6 split over GPUs would leave one or two "
                        "images each); batch = DistributedDataParallel over each step's batch (pays for large "
                        "databases trained with large batches, or a single split such as a cross-database run). A "
                        "process waits for the others' work without a time limit; one collective may take at most "
                        "KDOIQA_COLLECTIVE_TIMEOUT seconds (default 1800)")
    g.add_argument("--sync-bn", action="store_true",
                   help="with --parallel batch: BatchNorm statistics over all processes (a process whose share of "
                        "a short last batch is empty joins with a stand-in row of weight 0; that row does enter "
                        "the statistics of that one step)")
    return p


def model_parser(*, student: bool = False) -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50"), default="resnet18", help="backbone")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="random initialisation (no ImageNet download)")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="ImageNet weights file for offline machines, torchvision's resnet18-f37072fd.pth (default: "
                        "torchvision's download, unless --no-pretrained)")
    g.add_argument("--normalize", choices=("imagenet", "none"), default=None,
                   help=f"input normalisation; none = the paper's ToTensor() input {by_protocol('normalize')}")
    g.add_argument("--head-init", choices=("mean", "default"), default=None,
                   help=f"score head: bias at the mean training score, or PyTorch's default {by_protocol('head_init')}")
    g.add_argument("--face-batchnorm", choices=("joint", "per-face"), default=None,
                   help=argparse.SUPPRESS if student else
                   f"teacher BatchNorm statistics in training: over all faces in one call, or per face position "
                   f"(six backbone calls, the paper's) {by_protocol('face_batchnorm')}")
    return p


def optim_parser(*, epochs: int = 100) -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("optimisation (the paper's values)")
    g.add_argument("--epochs", type=positive, default=epochs, help="epochs per fold")
    g.add_argument("--batch-size", type=positive, default=6, help="images per optimiser step (over all processes)")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="Adam weight decay")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help="training seed (initialisation, batch order)")
    g.add_argument("--seeding", choices=("per-fold", "once"), default=None,
                   help=f"seed + fold before each fold (a fold's result does not depend on the others), or the seed "
                        f"once before the first fold {by_protocol('seeding')}")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help=f"cosine decay makes the reported last epoch a settled one {by_protocol('lr_schedule')}")
    g.add_argument("--target-scale", choices=("raw", "range"), default="raw",
                   help="regress the raw score (the paper) or the score mapped to [0,1] by the database's range")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("evaluation")
    g.add_argument("--select", choices=("last", "val", "test"), default=None,
                   help=f"the reported epoch: last (honest), best on a validation split held out of the training "
                        f"contents, or best on the test fold (the paper's; optimistic) {by_protocol('select')}")
    g.add_argument("--select-metric", choices=SELECT_METRICS, default=None,
                   help="criterion of --select val/test (default by --protocol: ours srcc+plcc; paper the script's "
                        "own rule: teacher srcc+plcc, student srcc, cross-database teacher abs-srcc+abs-plcc, "
                        "cross-database student abs-srcc)")
    g.add_argument("--val-fraction", type=float, default=0.15, help="share of training contents held out by --select val")
    g.add_argument("--fit", choices=("logistic4", "logistic5", "paper", "none"), default=None,
                   help="mapping fitted before PLCC/RMSE: logistic4 (the paper's 4-parameter logistic, with a line "
                        "instead when it fails or turns into a step), logistic5, paper (the paper's fit_function "
                        f"exactly: one curve_fit, used as it comes), none {by_protocol('fit')}")
    g.add_argument("--eval-every", type=positive, default=1, help="evaluate every N epochs (the last epoch always)")
    return p


def run_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("run")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="ours",
                   help="preset of every setting that differs from the paper's code: ours (honest, stable) or "
                        "paper (its exact behaviour); each setting is also its own flag, which wins")
    g.add_argument("--out", default=None, help="run folder (default runs/<script>/<database key>/<time>[-<kd>][-paper])")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its args.json and each fold's last checkpoint")
    g.add_argument("--save-minutes", type=minutes, default=5.0,
                   help="write the resumable state (resume.pt: model and Adam, ~150 MB for ResNet-18) when this many "
                        "minutes have passed since the last write, and on Ctrl-C or SIGTERM after the epoch in "
                        "progress; 0 = after every epoch (default: 5)")
    g.add_argument("--save-every", type=non_negative, default=0,
                   help="also write it every N epochs (default 0: by time only)")
    g.add_argument("--fold", type=int, default=None, help="train only this fold, 0-based (default: every fold)")
    g.add_argument("--folds", type=positive, default=5,
                   help="number of content-disjoint folds of the database's default split (given with --folds-file, "
                        "or to a student that takes its teacher's split, it must be that split's)")
    g.add_argument("--folds-file", default=None,
                   help="fold JSON (default <db>/folds/k<folds>_seed<split-seed>.json, made once; "
                        "`python dataset.py folds --authors DIR` imports the paper's folds)")
    g.add_argument("--split-seed", type=int, default=DEFAULT_SEED,
                   help="seed of the default split (a property of the database, not of the training seed)")
    return p


def distill_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("distillation")
    g.add_argument("--kd", choices=("mask", "feature", "none"), default="mask",
                   help="mask distillation (the paper), plain feature distillation, or none (the baseline)")
    g.add_argument("--features-dir", default=None, help="teacher feature folder (default: features/<database key>, or features/<A>-to-<B>)")
    g.add_argument("--kd-warmup", type=non_negative, default=5, help="supervised-only epochs first")
    g.add_argument("--kd-feature-epochs", type=non_negative, default=5,
                   help="epochs of plain feature imitation after the warm-up, before the mask phase")
    g.add_argument("--kd-weight", type=float, default=0.2, help="weight of the imitation loss")
    g.add_argument("--policy-lr-scale", type=float, default=0.5,
                   help="policy-net learning rate = --lr x this (paper: 1e-4 = 2e-4 / 2)")
    return p


def training_parents(*, epochs: int = 100, cross: bool = False, distill: bool = False) -> list[argparse.ArgumentParser]:
    """The parent parsers of a training script."""
    parents = [cross_parser() if cross else database_parser(), data_parser(student=distill), model_parser(student=distill),
               optim_parser(epochs=epochs), eval_parser(), run_parser(), training_runtime_parser()]
    if distill:
        parents.append(distill_parser())
    return parents


def inference_parents(*, batch_size: int = 32) -> list[argparse.ArgumentParser]:
    """The parent parsers of a script that runs a trained network over a database (features)."""
    p = Parser(add_help=False)
    g = p.add_argument_group("inference")
    g.add_argument("--batch-size", type=positive, default=batch_size, help="images per forward pass")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                   help="default: the teacher run's protocol (fp32 features under paper, bf16 on CUDA under ours)")
    return [data_parser(), runtime_parser(), p]


# ----------------------------------------------------------------------------------------------
# Parsed flags -> settings.

# Flags a resumed run may change (they do not change what is trained).
RESUME_FREE = frozenset({"device", "workers", "cache", "progress", "compile", "deterministic", "parallel", "resume",
                         "out", "save_every", "save_minutes", "data_root"})


def resolve_protocol(args: argparse.Namespace, script: str) -> argparse.Namespace:
    """A copy of `args` with each protocol-dependent flag left unset filled in from --protocol."""
    resolved = argparse.Namespace(**vars(args))
    protocol = getattr(args, "protocol", None) or "ours"
    for name in PROTOCOLS[protocol]:
        if hasattr(resolved, name) and getattr(resolved, name) is None:
            setattr(resolved, name, protocol_value(protocol, name, script))
    if hasattr(resolved, "tf32") and isinstance(resolved.tf32, str):
        resolved.tf32 = resolved.tf32 == "on"
    return resolved


def resume_args(args: argparse.Namespace, explicit: frozenset[str], script: str) -> argparse.Namespace:
    """`--resume --out DIR`: the run's own arguments from its args.json; flags given now must agree with
    them (all disagreements are reported at once), except those that do not change what is trained."""
    run_dir = Path(args.out)
    path = run_dir / "args.json"
    if not path.is_file():
        from kdoiqa.runs import no_args_json  # a run folder's files (not needed to parse a command line)

        raise UserError(no_args_json(run_dir))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        saved = record["args"]
        if not isinstance(saved, dict):
            raise ValueError("'args' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {err}); cannot resume this run") from None
    if record.get("script") != script:
        raise UserError(f"{path}: a {record.get('script')} run, not a {script} run; resume it with "
                        f"{record.get('script')}.py")
    mismatches = []
    for name in sorted(explicit - RESUME_FREE):
        if name in saved and jsonable(getattr(args, name)) != saved[name]:
            flag = NEGATED_FLAGS.get(name, f"--{name.replace('_', '-')}")
            mismatches.append(f"{flag} was {_show(saved[name])}, now {_show(getattr(args, name))}")
    if mismatches:
        raise UserError(f"{path}: this run was started with other settings: {'; '.join(mismatches)}; resume with "
                        f"`--resume --out {shlex.quote(str(run_dir))}` alone, or start a new --out")
    merged = {**vars(args), **{k: v for k, v in saved.items() if k in vars(args)}}
    for name in explicit & RESUME_FREE:
        merged[name] = getattr(args, name)
    if isinstance(merged.get("erp_size"), list):
        merged["erp_size"] = tuple(merged["erp_size"])
    return argparse.Namespace(**merged)


# Flags stored as the setting they switch off (dest "pretrained" for --no-pretrained).
NEGATED_FLAGS = {"pretrained": "--no-pretrained (pretrained)", "progress": "--no-progress (progress)",
                 "cross": "--no-cross (cross)"}


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return repr(value)


def flag_of(dest: str) -> str:
    """The command-line spelling of a destination (`face_size` -> --face-size, `pretrained` -> --no-pretrained)."""
    return NEGATED_FLAGS.get(dest, f"--{dest.replace('_', '-')}").split(" ")[0]


def refuse_explicit(explicit: frozenset[str], names: Sequence[str], why: str) -> None:
    """An explicit flag among `names` cannot apply (`why`): refused in one line, never silently dropped."""
    given = [flag_of(name) for name in names if name in explicit]
    if given:
        raise UserError(f"{', '.join(given)} cannot apply: {why}; drop {'it' if len(given) == 1 else 'them'}")


def training_settings(script: str, args: argparse.Namespace, explicit: frozenset[str] = frozenset()) -> TrainingSettings:
    """Validate the parsed flags of a training script and group them into typed settings."""
    if getattr(args, "resume", False):
        if not args.out:
            raise UserError("--resume needs --out RUN_FOLDER (the run to continue)")
        args = resume_args(args, explicit, script)
    raw = jsonable(vars(args))
    resolved = resolve_protocol(args, script)
    check_training_values(resolved)
    distill = from_args(DistillSettings, resolved) if hasattr(resolved, "kd") else None
    settings = TrainingSettings(
        script=script, protocol=resolved.protocol,
        data=from_args(DataSettings, resolved, erp_size=tuple(resolved.erp_size)),
        runtime=from_args(RuntimeSettings, resolved),
        model=from_args(ModelSettings, resolved),
        optim=from_args(OptimSettings, resolved),
        eval=from_args(EvalSettings, resolved),
        run=from_args(RunSettings, resolved),
        distill=distill, args=raw)
    check_distill_values(settings)
    return settings


def check_training_values(args: argparse.Namespace) -> None:
    """Validate flag values that argparse cannot check (one-line errors)."""
    if hasattr(args, "database_test"):  # a cross-database script: one split, all of A -> all of B
        check_cross_values(args)
        if args.folds_file:
            raise UserError("--folds-file does not apply: a cross-database run trains on all of A and tests on all of B")
        if args.fold not in (None, 0):
            raise UserError(f"--fold {args.fold}: a cross-database run has a single split (fold 0)")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.weights and not Path(args.weights).is_file():
        raise UserError(f"{args.weights}: --weights file not found")
    if args.folds < 2 and not args.folds_file:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")


def data_settings(args: argparse.Namespace, **overrides: Any) -> DataSettings:
    return from_args(DataSettings, args, **overrides)


def inference_runtime(args: argparse.Namespace) -> RuntimeSettings:
    """The runtime of a feature script: --amp, --tf32 left unset (None) follow the protocol (--protocol, or
    the teacher run's own), resolved where the teacher run is known."""
    protocol = getattr(args, "protocol", None)
    if protocol is not None:
        args = resolve_protocol(args, "")
    tf32 = {"on": True, "off": False}.get(args.tf32, args.tf32)
    return from_args(RuntimeSettings, args, tf32=tf32)


# ----------------------------------------------------------------------------------------------
# The scripts' parsers (here, so that reproduce.py and the cross-database matrix build them too).

def teacher_parser(description: str | None = None, *, cross: bool = False) -> Parser:
    """teacher_train.py (cross: teacher_crossdb_train.py, 50 epochs as the paper)."""
    return Parser(description=description, parents=training_parents(epochs=50 if cross else 100, cross=cross))


def student_parser(description: str | None = None, *, cross: bool = False) -> Parser:
    """mask_train.py (cross: crossdb_train.py, 50 epochs as the paper)."""
    return Parser(description=description, parents=training_parents(epochs=50 if cross else 100, cross=cross,
                                                                       distill=True))


def features_parser(description: str | None = None, *, cross: bool = False) -> Parser:
    """feat_save.py (cross: crossdb_feat.py)."""
    parser = Parser(description=description, parents=[cross_parser() if cross else database_parser(),
                                                      *inference_parents()])
    g = parser.add_argument_group("features")
    g.add_argument("--run", default=None,
                   help="the teacher run folder (default: the latest finished teacher run of this "
                        + ("pair" if cross else "database") + ")")
    g.add_argument("--features-dir", default=None,
                   help="where the features go (default features/<A>-to-<B>)" if cross
                   else "where the features go (default features/<database key>)")
    if not cross:
        g.add_argument("--fold", type=int, default=None, help="only this fold (default: every finished fold of the run)")
        g.add_argument("--from-authors", default=None, metavar="DIR",
                       help="import the authors' released features (DIR/<1..5>/<id>.npy) instead of running a "
                            "teacher; needs the database's folds/authors.json (default: compute them from --run)")
    return parser


def to_argv(parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """The command-line tokens that give `parser` the destinations `values` (those it knows)."""
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for dest, value in values.items():
        action = by_dest.get(dest)
        if action is None:
            continue
        flag = max(action.option_strings, key=lambda s: (s.startswith("--"), "-" in s[2:], len(s)))
        if action.nargs == 0:  # store_true / store_false
            if value != action.default:
                argv.append(flag)
        elif value is not None:
            if isinstance(value, (list, tuple)) and dest == "erp_size":
                value = f"{value[0]}x{value[1]}"
            argv += [flag, str(value)]
    return argv


# The flags a "next:" hint carries over from the command before (where the next script takes them).
CARRIED_TO_FEATURES = ("data_root", "device", "workers")
CARRIED_TO_STUDENT = ("data_root", "device", "workers", "cache", "arch", "pretrained", "weights", "normalize",
                      "erp_size", "protocol", "amp", "epochs", "batch_size", "seed")


def carried_flags(parser: argparse.ArgumentParser, values: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The tokens that give `parser` those of `values` (the parsed flags of an earlier command) named in
    `names` that differ from its defaults: what a "next:" hint repeats of the user's own command line."""
    defaults = {a.dest: a.default for a in parser._actions}

    def plain(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    chosen = {name: values[name] for name in names
              if name in values and name in defaults and values[name] is not None
              and plain(values[name]) != plain(defaults[name])}
    return to_argv(parser, chosen)


def check_distill_values(settings: TrainingSettings) -> None:
    """A distillation that never starts is refused: it would report the --kd none numbers as KD's."""
    d, epochs = settings.distill, settings.optim.epochs
    if d is None or d.kd == "none":
        return
    first = d.kd_warmup + 1 if d.kd == "feature" else d.kd_warmup + d.kd_feature_epochs + 1
    if epochs < first:
        phases = (f"--kd-warmup {d.kd_warmup}" if d.kd == "feature"
                  else f"--kd-warmup {d.kd_warmup} + --kd-feature-epochs {d.kd_feature_epochs}")
        raise UserError(f"--kd {d.kd} with --epochs {epochs}: its distillation phase starts at epoch {first} "
                        f"(after {phases}), so the run would never distil; raise --epochs to {first} or more, or "
                        f"lower the phase epochs")


# ----------------------------------------------------------------------------------------------
# "next:" hints: the command after a stage, with the user's flags that carry over (the stages print what
# these functions make of what they made).

def _command(script: str, *words: object) -> str:
    """`python <script> word ...`, each word quoted for a POSIX shell: a hint that works when pasted."""
    return shlex.join(["python", script, *(str(w) for w in words)])


def teacher_hint(settings: TrainingSettings) -> Callable[[Any], str]:
    """After a teacher run: the command of its features, with the run's flags that the feature script takes."""
    from kdoiqa.teacher_features import crossdb_feat_command, feat_save_command

    cross = settings.script == "teacher_crossdb_train"
    carried = carried_flags(teacher_parser(cross=cross), settings.args, CARRIED_TO_FEATURES)

    def hint(run: Any) -> str:
        line = (crossdb_feat_command(settings.run.database_train, settings.run.database_test, run.run_dir) if cross
                else feat_save_command(settings.run.database, run.run_dir))
        return " ".join([line, *map(shlex.quote, carried)])
    return hint


def student_hint(settings: TrainingSettings) -> Callable[[Any], str] | None:
    """After a within-database student: predict.py on the run and the database's first image."""
    if settings.script == "crossdb_train":
        return None
    device = ["--device", settings.runtime.device] if settings.runtime.device else []
    return lambda run: _command("predict.py", run.run_dir, run.db.root / run.db.images[0], *device)


def features_hint(database: str, data_root: str | None, features_dir: str | None, fold: int | None = None,
                  *, test: str | None = None) -> Callable[[dict], str]:
    """After teacher features (of `database`, or of the pair `database` -> `test`): the student's command, from
    the teacher run's record."""
    dirs = ["--features-dir", features_dir] if features_dir else []
    if test is not None:
        script, words = "crossdb_train.py", ["--database-train", database, "--database-test", test, *dirs]
    else:
        script, words = "mask_train.py", ["--database", database, *dirs, *(["--fold", str(fold)] if fold is not None else [])]
    return lambda record: student_command(script, words, record, data_root)


def authors_features_hint(database: str, data_root: str | None, features_dir: str | None) -> Callable[[Any], str]:
    """After the authors' features: mask_train.py on them."""
    return lambda _: _command("mask_train.py", "--database", database, *(["--data-root", data_root] if data_root else []),
                              *(["--features-dir", features_dir] if features_dir else []))


def student_command(script: str, words: list[str], teacher: dict, data_root: str | None) -> str:
    """The student's command after the features of the teacher run `teacher` (its args.json): `words`, then the
    user's own flags of that run that the student takes too, at the teacher's scale (its epochs, an ERP size
    four times its face size as the paper's 1024x512 to 256, distillation phases that fit those epochs)."""
    args = dict(teacher.get("args") or {})
    if data_root:
        args["data_root"] = data_root
    parser = student_parser(cross=script == "crossdb_train.py")
    words = [*words, *carried_flags(parser, args, CARRIED_TO_STUDENT)]
    face = int((teacher.get("settings") or {}).get("data", {}).get("face_size") or 256)
    if "--erp-size" not in words and face < 256:
        words += ["--erp-size", f"{4 * face}x{2 * face}"]
    epochs = int(args.get("epochs") or 100)
    if epochs < 11:  # the default phases (5 + 5 epochs) would leave no mask phase: refused by mask_train.py
        phase = (epochs - 1) // 3
        words += ["--kd-warmup", str(phase), "--kd-feature-epochs", str(phase)]
    return _command(script, *words)


# ----------------------------------------------------------------------------------------------
# A training in a fixed folder, resumable (reproduce.py, the cross-database matrix).

TRAINERS = {"teacher_train": (teacher_parser, False), "teacher_crossdb_train": (teacher_parser, True),
            "mask_train": (student_parser, False), "crossdb_train": (student_parser, True)}


def run_training(script: str, argv: list[str], run_dir: Path, label: str) -> str:
    """Train `script` with `argv` in `run_dir` unless it is done there (with the same flags: a run of other
    settings is refused, as --resume refuses it); resume it when it was interrupted. Returns the state found."""
    from kdoiqa import stages
    from kdoiqa.distributed import DIST

    build, cross = TRAINERS[script]
    parser = build(cross=cross)
    state = stages.training_state(run_dir)
    args, explicit = parse(parser, [*argv, "--out", str(run_dir), *(["--resume"] if state != "new" else [])])
    settings = training_settings(script, args, explicit)  # with --resume: checked against the run's args.json
    if state == "done":
        if DIST.is_main:
            print(f"{label}: done, skipped ({run_dir})", flush=True)
        return state
    if DIST.is_main:
        print(f"{label}: {'resuming' if state == 'partial' else 'training'} in {run_dir}", flush=True)
    if "teacher" in script:
        stages.train_teacher(settings, explicit, hint=teacher_hint(settings))
    else:
        stages.train_student(settings, explicit, hint=student_hint(settings))
    return state


# Flags of the matrix invocation that do not pass on to its stages (the matrix sets them per pair).
NOT_PASSED = frozenset({"matrix", "out", "resume", "database", "database_train", "database_test", "features_dir",
                        "folds_file", "fold"})


def matrix_settings(args: argparse.Namespace, explicit: frozenset[str]) -> Any:
    """crossdb_train.py --matrix A,B,...: the matrix's settings, every stage's flags checked before any work."""
    from kdoiqa.crossdb_matrix import MATRIX_DIR, MatrixSettings

    names = [n.strip() for n in args.matrix.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"--matrix needs at least two databases separated by commas, got {args.matrix!r}")
    if len(set(names)) != len(names):
        raise UserError(f"--matrix names a database twice: {args.matrix!r}")
    for flag in ("database_train", "database_test", "database", "folds_file", "features_dir"):
        if flag in explicit:
            raise UserError(f"--{flag.replace('_', '-')} does not go with --matrix (the matrix picks every pair "
                            f"and keeps its features under --out)")
    if args.fold not in (None, 0):
        raise UserError(f"--fold {args.fold}: a cross-database run has a single split")
    if args.resume:
        raise UserError("--matrix always resumes what is done; drop --resume")
    training_settings("crossdb_train", args, explicit)  # every stage's flags checked before any work
    return MatrixSettings(databases=tuple(names), out=Path(args.out) if args.out else MATRIX_DIR,
                          data_root=args.data_root, kd=args.kd, protocol=args.protocol, select=args.select,
                          data=data_settings(args), runtime=inference_runtime(args))


def matrix_steps(args: argparse.Namespace, explicit: frozenset[str]) -> tuple[Callable[..., str], Callable[..., Any]]:
    """The matrix's training step (each pair's teacher and student, with the user's explicit flags) and the
    `next:` hint after a pair's features."""
    passed = {dest: getattr(args, dest) for dest in explicit - NOT_PASSED}

    def train(script: str, pair: Any, run_dir: Path, label: str, features_dir: Path | None) -> str:
        build, cross = TRAINERS[script]
        extra = {"features_dir": str(features_dir)} if features_dir is not None else {}
        argv = ["--database-train", pair.train_arg, "--database-test", pair.test_arg,
                *to_argv(build(cross=cross), {**passed, **extra})]
        return run_training(script, argv, run_dir, label)

    def hint(pair: Any, features_dir: Path) -> Callable[[dict], str]:
        return features_hint(pair.train_arg, args.data_root, str(features_dir), test=pair.test_arg)
    return train, hint


# ----------------------------------------------------------------------------------------------
# predict.py, installed as the console script `kdoiqa-predict` (pyproject.toml's [project.scripts]).

def predict_parser() -> Parser:
    from kdoiqa import predicting

    parser = Parser(description=predicting.__doc__)
    parser.add_argument("model", type=Path, help="a checkpoint.pt, a fold folder or a run folder (every fold)")
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="ERP image files or folders (searched recursively; a database folder: its meta.csv images)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the scores to this CSV (default: print them only)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--batch-size", type=positive, default=16, help="images per forward pass")
    parser.add_argument("--threads", type=positive, default=default_threads(), help="decoding threads")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                        help="mixed precision (auto: bf16 on a GPU that computes it natively, else none; the score "
                             "head is fp32 either way)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--allow-partial", action="store_true",
                        help="score a run folder whose folds have not all finished with its finished folds (the "
                             "header names the unfinished ones; default: refused)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def predict_main(argv: Sequence[str] | None = None) -> int:
    """predict.py's command line -> `kdoiqa.predicting.predict`; returns the exit code."""
    from kdoiqa.predicting import predict

    args = predict_parser().parse_args(argv)
    return predict(args.model, args.inputs, csv=args.csv, device=args.device, batch_size=args.batch_size,
                   threads=args.threads, amp=args.amp, strict=args.strict, allow_partial=args.allow_partial,
                   progress=args.progress)


def predict_command() -> None:
    """The console script `kdoiqa-predict`: predict.py's command line, its errors one line (exit code 2)."""
    from kdoiqa.common import run_cli

    run_cli(predict_main)
