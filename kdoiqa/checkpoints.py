"""Checkpoint files: the finished model of a fold, and the training state of an unfinished one.

`fold<k>/checkpoint.pt` (written when the fold finishes) holds one copy of the reported model's
weights (the last epoch's, or the one `--select` chose) with everything needed to use it:
    format, kind ("teacher"/"student"), model_config, model (state dict), epoch (the reported one),
    epochs, history (per-epoch records), settings (the run's resolved settings), database
    (name, key, score direction and range), target_scale, folds (the split's digest, k, this fold),
    teacher_features (a student's: the feature file, the teacher run, its checkpoint and SHA-256).
A run folder's checkpoints are checked to be of that run (`load_run_models`).
For ResNet-18 that is ~45 MB. `fold<k>/resume.pt` exists only while a fold trains: the modules of
the last saved epoch, the optimiser and GradScaler states, the selected epoch's weights; it is
removed once `checkpoint.pt` is written. Both load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdoiqa.common import UserError, atomic_torch_save, first_line, torch_load
from kdoiqa.settings import in_checkpoint

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
    from kdoiqa.models import model_from_config

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
            run_dir = target.parent if (target / RESUME).is_file() else target
            raise UserError(f"{target}: its folds have not finished training (only {RESUME}); {finish_hint(run_dir)}")
        raise UserError(f"{target}: no {CHECKPOINT} here or in fold*/; pass a run folder, a fold folder or a "
                        f"checkpoint file")
    where = "" if target.is_absolute() else f" (relative to the working folder {Path.cwd()})"
    raise UserError(f"{target}{where}: no such checkpoint, fold folder or run folder")


# ----------------------------------------------------------------------------------------------
# A run folder's models: every fold's checkpoint, checked to be of that run, and the folds it lacks.



def run_settings(settings: dict) -> dict[str, Any]:
    """The settings that define a run's models, flattened (`optim.lr` -> value): of a checkpoint or of args.json."""
    flat: dict[str, Any] = {}
    for group, values in (settings or {}).items():
        if not isinstance(values, dict):
            flat[group] = values
            continue
        for key, value in values.items():
            if in_checkpoint(group, key):  # not where and how it ran (settings.Flag.in_checkpoint)
                flat[f"{group}.{key}"] = value
    return flat


def script_kind(script: str | None) -> str | None:
    """The model kind a training script writes (teacher_train -> teacher, mask_train -> student)."""
    if not script:
        return None
    return "teacher" if "teacher" in script else "student"


def finish_hint(run_dir: Path) -> str:
    """How a run's unfinished folds get finished: `python <script>.py --resume --out RUN` (the script from its
    args.json), or, without a readable args.json, that they cannot be resumed."""
    try:
        script = json.loads((Path(run_dir) / "args.json").read_text(encoding="utf-8")).get("script")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        script = None
    if not isinstance(script, str) or not script:
        return (f"its args.json is gone or unreadable, so it cannot be resumed: train again in a new --out "
                f"({run_dir}/args.json holds the settings --resume needs)")
    return f"finish with `python {script}.py --resume --out {shlex.quote(str(run_dir))}`"


@dataclass
class RunModels:
    """What `kdoiqa.load` and predict.py score for a path: checkpoint files, their records and folds, and, for
    a run folder, the folds it plans that have no checkpoint yet (fold -> "interrupted or still training (resume.pt)"
    or "not started")."""

    paths: list[Path]
    records: list[dict]
    folds: list[int]
    unfinished: dict[int, str] = field(default_factory=dict)
    run_dir: Path | None = None


def _fold_of(record: dict) -> int | None:
    value = (record.get("folds") or {}).get("fold")
    return value if isinstance(value, int) else None


def _run_record(run_dir: Path) -> dict | None:
    """A run folder's args.json when readable (a fold's checkpoint is then checked against it too)."""
    try:
        record = json.loads((run_dir / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("settings"), dict) else None


def _identity(record: dict, *, run: bool) -> dict[str, Any]:
    """kind, database, score direction, split and settings of a checkpoint (or of args.json, `run`)."""
    database = record.get("database") or {}
    return {
        "kind": script_kind(record.get("script")) if run else record.get("kind"),
        "database": database.get("key"),
        "score direction": database.get("higher_is_better"),
        "split": (record.get("folds") or {}).get("sha256"),
        "settings": run_settings(record.get("settings") or {}),
    }


def _show(name: str, value: Any) -> str:
    if name == "score direction":
        return "higher is better" if value else "higher is worse (DMOS)"
    if name == "split":
        return f"sha256 {str(value)[:12]}"
    return repr(value) if not isinstance(value, str) else value


def _disagreement(mine: dict, theirs: dict, whose: str) -> str | None:
    """The first field on which a fold's checkpoint disagrees with `whose` (values unknown to either are skipped)."""
    for name in ("kind", "database", "score direction", "split"):
        a, b = mine[name], theirs[name]
        if a is not None and b is not None and a != b:
            return f"its {name} is {_show(name, a)} but that of {whose} is {_show(name, b)}"
    a, b = mine["settings"], theirs["settings"]
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            return f"its settings differ from those of {whose}: {key} {a[key]!r} vs {b[key]!r}"
    return None


def check_run_folds(run_dir: Path, paths: list[Path], records: list[dict], run_record: dict | None) -> None:
    """Every fold's checkpoint agrees with the run (its args.json, else its first fold) on the model kind, the
    database, its score direction, the split and the settings, and is of the fold its folder names."""
    references = ([("the run (args.json)", _identity(run_record, run=True))] if run_record is not None else [])
    references.append((f"fold {int(paths[0].parent.name[4:])}", _identity(records[0], run=False)))
    for path, record in zip(paths, records):
        number = int(path.parent.name[4:])
        mine = _identity(record, run=False)
        for whose, theirs in references:
            why = _disagreement(mine, theirs, whose)
            if why is not None:
                raise UserError(f"{path}: fold {number} is not of the run in {run_dir}: {why}; move it "
                                f"out of the run folder or load it alone")
        if _fold_of(record) is not None and _fold_of(record) != number:
            raise UserError(f"{path}: a checkpoint of fold {_fold_of(record)} in the folder of fold {number}: not this "
                            f"run's fold {number}; move it out of {run_dir} or load it alone")


def planned_folds(run_record: dict | None, first: dict) -> list[int]:
    """The folds a run trains: its --fold, else every fold of its split (from args.json, else a checkpoint)."""
    source = run_record if run_record is not None else first
    fold = ((source.get("settings") or {}).get("run") or {}).get("fold")
    if isinstance(fold, int):
        return [fold]
    k = (source.get("folds") or {}).get("k")
    return list(range(k)) if isinstance(k, int) and k > 0 else []


def load_run_models(target: str | Path, *, allow_partial: bool = False) -> RunModels:
    """A checkpoint file, a fold folder or a run folder -> its checkpoints, loaded and checked. A run folder's folds
    must all be of that run, and all finished (`allow_partial`: the finished ones, the others listed)."""
    target = Path(target)
    paths = find_checkpoints(target)
    records = [load_checkpoint(p) for p in paths]
    if target.is_file() or (target / CHECKPOINT).is_file():
        return RunModels(paths, records, [_fold_of(r) if _fold_of(r) is not None else 0 for r in records])
    run_record = _run_record(target)
    check_run_folds(target, paths, records, run_record)
    folds = [int(p.parent.name[4:]) for p in paths]
    unfinished = {k: "interrupted or still training (resume.pt)" if (target / f"fold{k}" / RESUME).is_file()
                  else "not started"
                  for k in planned_folds(run_record, records[0]) if k not in folds}
    if unfinished and not allow_partial:
        states = ", ".join(f"fold {k} {state}" for k, state in unfinished.items())
        raise UserError(f"{target}: {len(unfinished)} of its {len(unfinished) + len(folds)} folds not finished "
                        f"({states}); {finish_hint(target)}, or score with the finished "
                        f"fold(s) {', '.join(map(str, folds))} only: --allow-partial (predict.py), "
                        f"allow_partial=True (kdoiqa.load)")
    return RunModels(paths, records, folds, unfinished, target)
