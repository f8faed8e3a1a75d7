"""Checkpoint files: the finished model of a fold, and the training state of an unfinished one.

`fold<k>/checkpoint.pt` (written when the fold finishes) holds one copy of the reported model's
weights (the last epoch's, or the one `--select` chose) with everything needed to use it:
    format, kind ("teacher"/"student"), model_config, model (state dict), epoch (the reported one),
    epochs, history (per-epoch records), settings (the run's resolved settings), database
    (name, key, score direction and range), target_scale, folds (the split's digest).
For ResNet-18 that is ~45 MB. `fold<k>/resume.pt` exists only while a fold trains: the modules of
the last saved epoch, the optimiser and GradScaler states, the selected epoch's weights; it is
removed once `checkpoint.pt` is written. Both load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from kdoiqa.common import UserError, atomic_torch_save, first_line, torch_load

FORMAT_VERSION = 2
CHECKPOINT = "checkpoint.pt"
RESUME = "resume.pt"


def cpu_state(module: nn.Module) -> dict:
    """A detached CPU copy of a module's state dict."""
    return {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}


def save_checkpoint(path: Path, record: dict[str, Any]) -> None:
    """Write a finished fold's checkpoint. Every value but the state dict goes through JSON first, so that
    equal records give equal bytes (pickle would otherwise encode shared and unshared objects apart)."""
    plain = {key: value if key == "model" else json.loads(json.dumps(value)) for key, value in record.items()}
    atomic_torch_save({"format": FORMAT_VERSION, **plain}, path)


def load_checkpoint(path: str | Path) -> dict:
    """A finished fold's checkpoint (safe loading; a foreign or torn file is one line naming it)."""
    path = Path(path)
    ckpt = torch_load(path, what="checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path}: not a KD-OIQA checkpoint (no model / model_config)")
    return ckpt


def load_resume_state(path: Path) -> dict:
    state = torch_load(path, what="resumable training state", hint="remove it to restart this fold")
    if not isinstance(state, dict) or not {"modules", "optimizer", "epoch", "history"} <= set(state):
        raise UserError(f"{path}: not a KD-OIQA training state; remove it to restart this fold")
    return state


def model_from_checkpoint(ckpt: dict, path: Path) -> nn.Module:
    """The checkpoint's model with its weights; a foreign architecture or layout is one line naming the file."""
    from models import model_from_config

    try:
        model = model_from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    except (RuntimeError, TypeError, KeyError, ValueError) as err:
        raise UserError(f"{path}: its weights do not fit its model_config {ckpt.get('model_config')} "
                        f"({first_line(err)})") from None
    return model


def fold_checkpoint(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"fold{fold}" / CHECKPOINT


def finished_folds(run_dir: Path) -> list[int]:
    """The folds of a run folder whose checkpoint.pt exists, in order."""
    found = []
    for path in Path(run_dir).glob(f"fold*/{CHECKPOINT}"):
        suffix = path.parent.name[4:]
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def find_checkpoints(target: Path) -> list[Path]:
    """A checkpoint file, a fold folder, or a run folder (every fold's checkpoint) -> checkpoint files."""
    target = Path(target)
    if target.is_file():
        return [target]
    if (target / CHECKPOINT).is_file():
        return [target / CHECKPOINT]
    if target.is_dir():
        found = [fold_checkpoint(target, k) for k in finished_folds(target)]
        if found:
            return found
        if (target / RESUME).is_file() or any(target.glob(f"fold*/{RESUME}")):
            raise UserError(f"{target}: its folds have not finished training (only {RESUME}); finish them with "
                            f"--resume --out {target.parent if (target / RESUME).is_file() else target}")
        raise UserError(f"{target}: no {CHECKPOINT} here or in fold*/; pass a run folder, a fold folder or a "
                        f"checkpoint file")
    raise UserError(f"{target}: no such checkpoint, fold folder or run folder")
