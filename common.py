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
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_SEED = 2023


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line with exit code 2."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's `main`, turning user errors into one line on stderr and exit code 2."""
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
    if isinstance(result, int):
        sys.exit(result)


# ----------------------------------------------------------------------------------------------
# Atomic writes: a killed run leaves the old file or the new one, never a torn one.

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


def atomic_write_csv(path: str | os.PathLike, frame: "Any") -> None:
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
