"""Shared plumbing: one-line user errors, atomic writes, seeding, devices, paths, checkpoints.

Every script goes through `run_cli(main)`: a `UserError` (bad input the user can fix) or an
OSError at write time becomes one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_SEED = 2023


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line with exit code 2."""


def _argparse_error(self: argparse.ArgumentParser, message: str) -> None:
    raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's `main`, turning user errors into one line on stderr and exit code 2.

    argparse's own errors (a bad flag value, a missing argument) become that one line too,
    instead of the usage block plus the message.
    """
    parser_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error  # type: ignore[method-assign]
    try:
        result = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # disk full, permission denied, ... at write time
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        sys.exit(2)
    finally:
        argparse.ArgumentParser.error = parser_error  # type: ignore[method-assign]
    if isinstance(result, int):
        sys.exit(result)


# ----------------------------------------------------------------------------------------------
# Atomic writes: a killed run leaves the old file or the new one, never a torn one.

def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one `os.replace`.

    The temporary keeps the target's suffix (PIL and friends pick the format from it).
    On any exception the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{path.parent}: is a file, expected a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + (path.suffix if suffix is None else suffix),
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(OSError):  # mkstemp makes 0600 files; outputs get the usual umask mode
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str | os.PathLike, frame: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def completed(futures: dict) -> Iterator[tuple[Any, Any]]:
    """(key, result) of a {future: key} dict as the futures finish; on any error, or when the caller
    stops early, the futures not yet started are cancelled before the error goes on."""
    import concurrent.futures

    try:
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        raise


# ----------------------------------------------------------------------------------------------
# Seeds and provenance.

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    """The commit of this checkout (with `-dirty` when it has local changes), or None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def parse_size(text: str, *, name: str = "size") -> tuple[int, int]:
    """Parse 'WxH' (or a single 'N' for a square) into (width, height)."""
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            width, height = int(w), int(h)
        else:
            width = height = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must look like 1024x512 or 256, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"{name} must be positive, got {text!r}")
    return width, height


def tensor_bytes(obj: Any) -> bytes:
    """Serialise with torch.save to bytes (used for hashing state dicts)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# The one argparse parent every training script extends with `parents=[...]`.

def runtime_parser() -> argparse.ArgumentParser:
    """Flags of every script that runs a network: device, precision, loading, progress."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="mixed precision (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--cache", choices=("auto", "none", "cpu", "gpu"), default="auto",
                   help="decode every image once and keep the uint8 pixels in memory (auto: gpu on CUDA "
                        "when it fits, else cpu when it fits, else none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def training_parser(*, epochs: int = 100) -> argparse.ArgumentParser:
    """Flags shared by teacher_train.py, mask_train.py and the cross-database scripts."""
    p = argparse.ArgumentParser(add_help=False, parents=[runtime_parser()])
    g = p.add_argument_group("data")
    g.add_argument("--database", help="registered name (CVIQ, OIQA, IQA-ODI, Synthetic) or a folder holding meta.csv")
    g.add_argument("--data-root", default=None, help="folder of the registered databases (default ./data or $KDOIQA_DATA)")
    g.add_argument("--folds-file", default=None,
                   help="fold JSON (default <db>/folds/k5_seed<seed>.json, made if absent; "
                        "`python dataset.py folds --authors DIR` reproduces the paper's folds)")
    g.add_argument("--fold", type=int, default=None, help="train only this fold (0-based); default all folds")
    g.add_argument("--face-size", type=int, default=256, help="cube-face side in pixels (paper: 256)")
    g.add_argument("--erp-size", type=lambda s: parse_size(s, name="--erp-size"), default=(1024, 512),
                   help="ERP input size WxH (paper: 1024x512)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50"), default="resnet18")
    g.add_argument("--no-pretrained", action="store_true", help="random initialisation (no ImageNet download)")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="ImageNet weights file for offline machines (torchvision's resnet18-f37072fd.pth)")
    g.add_argument("--normalize", choices=("imagenet", "none"), default="imagenet",
                   help="input normalisation; none = the paper's exact ToTensor() input")

    g = p.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=6)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                   help="cosine decay over the epochs (default: makes the reported last epoch a settled one) or "
                        "constant (the paper's code)")
    g.add_argument("--target-scale", choices=("raw", "range"), default="raw",
                   help="regress the raw score (the paper) or the score mapped to [0,1] by the database's range")

    g = p.add_argument_group("evaluation")
    g.add_argument("--select", choices=("last", "val", "test"), default="last",
                   help="which epoch is reported: last (honest, default), best on a validation split held out "
                        "of the training contents, or best on the test fold (the paper's protocol; optimistic)")
    g.add_argument("--val-fraction", type=float, default=0.15, help="share of training contents held out by --select val")
    g.add_argument("--fit", choices=("logistic4", "logistic5", "none"), default="logistic4",
                   help="mapping fitted before PLCC/RMSE (paper: 4-parameter logistic)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (the last epoch always)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<script>/<database>/<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from each fold's last checkpoint")
    g.add_argument("--save-every", type=int, default=1, help="write the resumable checkpoint every N epochs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (no cuDNN benchmark); CPU runs are deterministic anyway")
    return p


def check_training_args(args: argparse.Namespace) -> None:
    """Validate flag values that argparse cannot (one-line errors)."""
    if not args.database:
        raise UserError("--database is required (a registered name or a folder holding meta.csv)")
    for name in ("epochs", "batch_size", "face_size", "eval_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.resume and not args.out:
        raise UserError("--resume needs --out RUN_FOLDER (the run to continue)")
    if args.weights and not Path(args.weights).is_file():
        raise UserError(f"{args.weights}: --weights file not found")


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def make_run_dir(script: str, database_key: str, out: str | None, *, resume: bool = False,
                 create: bool = True) -> Path:
    """`runs/<script>/<database>/<time>` unless --out names the folder; refuse to mix runs.

    With `create=False` it only validates: the caller makes the folder once every input is checked,
    so that a bad input leaves nothing behind.
    """
    import time

    run_dir = Path(out) if out else Path("runs") / script / database_key / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, expected a run folder")
    for parent in run_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent}: is a file, expected a folder (in the run folder path {run_dir})")
            break
    if resume:
        if not (run_dir / "args.json").is_file():
            raise UserError(f"{run_dir}: nothing to resume (no args.json); drop --resume to start a run there")
    elif run_dir.is_dir() and any(run_dir.glob("fold*/checkpoint.pt")):
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_args(run_dir: Path, args: argparse.Namespace, script: str, extra: dict | None = None) -> dict:
    record = {"script": script, "git_commit": git_commit(), "argv": sys.argv, **jsonable(vars(args)), **(extra or {})}
    atomic_write_json(run_dir / "args.json", record)
    return record


def jsonable(obj: Any) -> Any:
    """Plain JSON types (tuples to lists, paths to strings) for args.json and checkpoints."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict:
    """`torch.load(weights_only=True)`: checkpoints hold only tensors and plain types."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, TypeError, AttributeError) as err:
        # A torn or foreign file (torch raises OSError 'Invalid argument' on a cut zip archive).
        import zipfile

        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        if not zipfile.is_zipfile(path):
            first = "not a PyTorch zip archive: a torn copy or another kind of file"
        elif "Weights only load failed" in first:
            first = "it holds objects other than tensors and plain types, refused by torch.load(weights_only=True)"
        raise UserError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path}: not a KD-OIQA checkpoint (no model / model_config)")
    return ckpt


# ----------------------------------------------------------------------------------------------
# torchrun / DDP: one process per device; rank 0 logs and writes.

class Distributed:
    """The process group of a `torchrun --nproc_per_node=N` launch (world 1 without torchrun).

    Training batches are split across ranks (the optimiser still sees `--batch-size` images per
    step, as the paper), gradients are averaged weighted by each rank's share of the batch, and
    rank 0 alone writes files and prints.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device_arg: str | None):
        """Start the process group (NCCL on CUDA, gloo on CPU) and return this rank's device."""
        import torch
        import torch.distributed as dist

        device = resolve_device(device_arg)
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def average_gradients(self, params: list, weight: float) -> None:
        """Sum over ranks of weight * grad (weight = this rank's share of the batch): the gradient of
        the batch mean. One flat all-reduce; parameters without a gradient count as zero."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads]) * weight
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_buffers(self, modules: list) -> None:
        """Rank 0's BatchNorm running statistics everywhere (as DDP's broadcast_buffers)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for module in modules:
            for buf in module.buffers():
                dist.broadcast(buf, 0)

    def gather_rows(self, values, rows):
        """Every rank's (values [n_r], rows [n_r]) -> all values ordered by row, on every rank."""
        import torch

        if not self.enabled:
            return values[torch.argsort(rows)]
        import torch.distributed as dist

        count = torch.tensor([len(rows)], device=values.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        size = int(max(c.item() for c in counts))
        pad_v = torch.zeros(size, dtype=values.dtype, device=values.device)
        pad_r = torch.full((size,), -1, dtype=torch.long, device=values.device)
        pad_v[:len(values)], pad_r[:len(rows)] = values, rows.to(values.device)
        all_v = [torch.zeros_like(pad_v) for _ in range(self.world)]
        all_r = [torch.zeros_like(pad_r) for _ in range(self.world)]
        dist.all_gather(all_v, pad_v)
        dist.all_gather(all_r, pad_r)
        v, r = torch.cat(all_v), torch.cat(all_r)
        keep = r >= 0
        v, r = v[keep], r[keep]
        return v[torch.argsort(r)]


DIST = Distributed()
