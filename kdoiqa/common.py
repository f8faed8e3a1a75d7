"""Shared plumbing: one-line user errors, atomic writes, seeding, provenance, safe torch loading.

Every script goes through `run_cli(main)`: a `UserError` (bad input the user can fix) or an
OSError at write time becomes one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
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

REPO_ROOT = Path(__file__).resolve().parents[1]  # the repository (git provenance of runs)
DEFAULT_SEED = 2023


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line with exit code 2."""


# What Ctrl-C prints: the command that continues the interrupted work. Each piece of work says it for its own
# duration (`with interrupt_hint(command):`); the blocks an interrupt passes through hand their command on with it
# (`KeyboardInterrupt.continue_with`), the outermost block's last: a command that drives several runs, such as
# reproduce.py, is printed rather than the one of the run it was in.
_HINTS: contextvars.ContextVar[tuple[str | Callable[[], str | None], ...]] = contextvars.ContextVar(
    "kdoiqa_interrupt_hints", default=())


@contextlib.contextmanager
def interrupt_hint(command: str | Callable[[], str | None]) -> Iterator[None]:
    """Within the block, a Ctrl-C (a KeyboardInterrupt leaving it) carries `command`, the command that continues
    the block's work, to `run_cli`, which prints it. `command` may be a function, asked when the interrupt comes
    (None: no command yet, e.g. a run whose folder does not exist yet). The hint ends with the block, also
    on an error."""
    token = _HINTS.set((*_HINTS.get(), command))
    try:
        yield
    except KeyboardInterrupt as interrupt:
        text = command() if callable(command) else command
        if text is not None:
            interrupt.continue_with = text  # type: ignore[attr-defined]  # an enclosing block's replaces it
        raise
    finally:
        _HINTS.reset(token)


def interrupt_hints() -> tuple[str, ...]:
    """The commands of the `interrupt_hint` blocks the caller is in, outermost first (those that have one now)."""
    hints = (hint() if callable(hint) else hint for hint in _HINTS.get())
    return tuple(hint for hint in hints if hint is not None)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's `main`, turning user errors into one line on stderr and exit code 2.

    The project's parser (`kdoiqa.cli.Parser`) raises its errors (a bad flag value, a missing argument)
    as a UserError, so they become that one line too, instead of the usage block plus the message; so do
    errors raised in data-loading workers.
    """
    try:
        result = main()
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        command = getattr(interrupt, "continue_with", None)  # set by the interrupt_hint blocks it left
        hint = f"; continue it with: {command}" if command else ""
        print(f"interrupted{hint}", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # disk full, permission denied, ... at write time
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int):
        sys.exit(result)


def user_message(err: UserError) -> str:
    """The one line of a UserError. A DataLoader worker re-raises its error with the worker's whole
    traceback as the message ("Caught UserError in DataLoader worker process 0. Original Traceback
    ..."): its last line carries the original message."""
    text = str(err).strip()
    if "Original Traceback" in text or text.startswith("Caught "):
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("UserError") else last
    return text.splitlines()[0] if text else "unknown error"


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
    """torch.save through a file handle: the archive's inner name is then fixed, not the temporary's,
    so the same object always gives the same bytes. A Ctrl-C during the write is held back until the
    file is in place (torch's zip writer would turn it into a RuntimeError and a torn temporary)."""
    import torch

    with deferred_interrupts(), _saving():
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as tmp_handle:
                torch.save(obj, tmp_handle)
        except RuntimeError:
            if _DEFERRAL.forced:  # a second Ctrl-C stopped the write at once: an interrupt, not an error
                raise KeyboardInterrupt from None
            raise


# ----------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM held back while something must finish (a checkpoint write, a training epoch).

class _Deferral:
    depth = 0            # nested deferred_interrupts blocks
    saving = 0           # nested _saving blocks: every signal is held, a second one too
    pending = False      # a signal arrived and is held back
    forced = False       # a second signal arrived: raised at once
    message = ""
    previous: dict = {}


_DEFERRAL = _Deferral()


def _hold_signal(signum: int, frame: Any) -> None:
    import signal

    if _DEFERRAL.pending and (_DEFERRAL.saving or signum == signal.SIGTERM):
        # Only a second Ctrl-C stops at once. A scheduler signals every process (scancel, a kill of the
        # process group) and torchrun signals the rest again once one has exited: a repeated SIGTERM
        # waits for the epoch's state like the first (SIGKILL follows after the scheduler's grace
        # period), and no second signal tears a file being written.
        print("\nalready stopping: once the epoch's state is saved", file=sys.stderr, flush=True)
        return
    if _DEFERRAL.pending:
        _DEFERRAL.forced = True
        raise KeyboardInterrupt
    _DEFERRAL.pending = True
    print(f"\n{_DEFERRAL.message} (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _saving() -> Iterator[None]:
    """Within a deferred_interrupts block: a file that must not be torn is being written; every signal
    (a second one too) waits until it is complete (SIGKILL alone cannot be held)."""
    _DEFERRAL.saving += 1
    try:
        yield
    finally:
        _DEFERRAL.saving -= 1


def interrupt_pending() -> bool:
    """Whether a Ctrl-C or SIGTERM is being held back by `deferred_interrupts`."""
    return _DEFERRAL.pending


@contextlib.contextmanager
def deferred_interrupts(message: str = "stopping once the file being written is complete") -> Iterator[None]:
    """Within the block, a first Ctrl-C (SIGINT) or SIGTERM only sets `interrupt_pending()` and prints
    `message`; it is raised as KeyboardInterrupt when the outermost block ends. A second Ctrl-C raises
    at once, except while a file is being written (`atomic_torch_save`); a second SIGTERM never does.
    Blocks nest (the outermost one's message is printed); outside the main thread it does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _DEFERRAL.depth == 0
    if outermost:
        _DEFERRAL.pending = _DEFERRAL.forced = False
        _DEFERRAL.message = message
        _DEFERRAL.previous = {sig: signal.signal(sig, _hold_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _DEFERRAL.depth += 1
    pending = False
    try:
        yield
    finally:
        _DEFERRAL.depth -= 1
        if outermost:
            for sig, handler in _DEFERRAL.previous.items():
                signal.signal(sig, handler)
            pending, _DEFERRAL.pending = _DEFERRAL.pending, False
    if pending:  # reached only when the block completed: the held-back interrupt goes on now
        raise KeyboardInterrupt


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
    """Parse 'WxH' (or a single 'N' for a square) into (width, height); ValueError when it is neither."""
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            width, height = int(w), int(h)
        else:
            width = height = int(text)
    except ValueError:
        raise ValueError(f"{name} must look like 1024x512 or 256, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return width, height



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


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def torch_load(path: str | os.PathLike, *, what: str, hint: str = "") -> Any:
    """The one way this project reads a torch file: `torch.load(weights_only=True)` onto the CPU.

    Only tensors and plain types load; a missing, torn or foreign file is one UserError naming it,
    `what` it should have been and `hint` (what to do about it).
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise UserError(f"{path}: no such {what}{tail}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, TypeError, AttributeError,
            KeyError, IndexError) as err:
        reason = first_line(err, 120)
        if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):
            reason = "not a PyTorch file: a torn copy or another kind of file"
        elif "Weights only load failed" in reason:
            reason = "it holds objects other than tensors and plain types, refused by torch.load(weights_only=True)"
        raise UserError(f"{path}: not a readable {what} ({reason}){tail}") from None


def _is_legacy_torch_file(path: Path) -> bool:
    """torch.save's pre-1.6 format (a pickle, not a zip), which the authors' feature files may use."""
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x80\x02"
