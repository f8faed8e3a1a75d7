"""Run folders: where a training run writes, what it records, and the tables it leaves.

    runs/<script>/<database key>/<time>[-<kd>][-paper]/
        args.json          the command line, the resolved settings, the database and split identity
        log.jsonl          one line per epoch and fold (merged from fold<k>/log.jsonl)
        results.csv        a row per fold, then mean, std (ddof=1) and median; the run's labels
        predictions.csv    every fold's test predictions
        fold<k>/           checkpoint.pt (see checkpoints.py), predictions.csv, metrics.json,
                           scatter.png, log.jsonl, TensorBoard events
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdoiqa import metrics
from kdoiqa.checkpoints import CHECKPOINT, RESUME
from kdoiqa.common import (
    UserError,
    atomic_path,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    git_commit,
    jsonable,
)
from kdoiqa.databases import Database, database_key
from kdoiqa.distributed import DIST
from kdoiqa.folds import FoldSet
from kdoiqa.settings import TrainingSettings

SELECTION_NOTES = {
    "last": "last epoch (no selection)",
    "val": "epoch selected on a validation split of the training contents",
    "test": "epoch selected on the test fold (the paper's protocol; optimistic)",
}


@dataclass
class FoldResult:
    """A fold's reported epoch and its evaluation on the fold's test images."""

    fold: int
    epoch: int
    evaluation: metrics.Evaluation
    images: list[str]
    pred: np.ndarray
    mos: np.ndarray

    @property
    def metrics(self) -> dict:
        return self.evaluation.metrics


def run_name(settings: TrainingSettings) -> str:
    """`<time>[-<kd>][-paper]`: what the folder name says of the run at a glance."""
    parts = [time.strftime("%Y%m%d-%H%M%S")]
    if settings.distill is not None:
        parts.append(settings.distill.kd)
    if settings.protocol != "ours":
        parts.append(settings.protocol)
    return "-".join(parts)


def labels(settings: TrainingSettings) -> str:
    """`kd mask, protocol ours`: how every table names the run's kind."""
    kd = f"kd {settings.distill.kd}, " if settings.distill is not None else ""
    return f"{kd}protocol {settings.protocol}"


def check_run_dir(run_dir: Path, *, resume: bool) -> None:
    """A run folder may be new, or (with --resume) an existing run; never another run's folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, expected a run folder")
    for parent in run_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent}: is a file, expected a folder (in the run folder path {run_dir})")
            break
    if resume:
        if not (run_dir / "args.json").is_file():
            raise UserError(no_args_json(run_dir))
    elif run_dir.is_dir() and (any(run_dir.glob(f"fold*/{CHECKPOINT}")) or any(run_dir.glob(f"fold*/{RESUME}"))):
        if not (run_dir / "args.json").is_file():
            raise UserError(f"{run_dir}: already holds a run (whose args.json is gone, so it cannot be resumed); "
                            f"choose another --out")
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")


def no_args_json(run_dir: Path) -> str:
    """Why --resume cannot continue `run_dir`, which has no args.json: nothing was started there, or its record is gone."""
    if any(run_dir.glob(f"fold*/{CHECKPOINT}")) or any(run_dir.glob(f"fold*/{RESUME}")):
        return (f"{run_dir}: its args.json is gone, so the settings it was started with are unknown and it cannot be "
                f"resumed; start a new --out (its finished folds still load with predict.py --allow-partial)")
    return f"{run_dir}: nothing to resume (no args.json); drop --resume to start a run there"


@dataclass
class Run:
    """One training run: its database(s), split, folder and writers."""

    settings: TrainingSettings
    db: Database
    folds: FoldSet
    fold_ids: list[int]
    run_dir: Path
    device: Any
    test_db: Database | None = None        # cross-database: scored on another database
    record: dict = field(default_factory=dict)
    opened: bool = False
    created: bool = False

    @property
    def script(self) -> str:
        return self.settings.script

    @property
    def eval_db(self) -> Database:
        return self.test_db if self.test_db is not None else self.db

    @property
    def progress(self) -> bool:
        return self.settings.runtime.progress and (DIST.is_main or DIST.mode == "folds")

    def writes_fold(self, fold: int) -> bool:
        """Whether this process writes fold `fold`'s files (its trainer under --parallel folds, else rank 0)."""
        return DIST.mode == "folds" or DIST.is_main

    def open(self) -> Path:
        """Create the run folder and write args.json, once (the step where a run starts writing: training calls
        it as a fold starts): deferred until the data are decoded and every input is checked, so that a bad
        input leaves no half-made run behind."""
        if not self.opened:
            # No collective here: under --parallel folds a process opens the run when it starts its first
            # fold, and one with no fold to train never does.
            if DIST.is_main:
                self.created = not self.run_dir.exists()
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if self.settings.run.resume:
                    self.record = resumed_record(self.run_dir / "args.json", self.record)
                atomic_write_json(self.run_dir / "args.json", self.record)
            elif DIST.mode == "folds":
                self.run_dir.mkdir(parents=True, exist_ok=True)
            self.opened = True
        return self.run_dir

    def resume_command(self) -> str | None:
        """The command that continues this run once its folder is open (what Ctrl-C prints), else None."""
        if not self.opened:
            return None
        return shlex.join(["python", f"{self.script}.py", "--resume", "--out", str(self.run_dir)])

    def fold_dir(self, fold: int) -> Path:
        """Fold `fold`'s folder (a path: made by the training of that fold)."""
        return self.run_dir / f"fold{fold}"

    def log(self, fold: int, record: dict) -> None:
        with open(self.fold_dir(fold) / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(jsonable(record)) + "\n")

    def trim_log(self, fold: int, start_epoch: int) -> None:
        """Drop fold `fold`'s records from `start_epoch` on (an interrupted run logged epochs after its
        last checkpoint): a resumed run's log reads as if it had never stopped."""
        path = self.fold_dir(fold) / "log.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                stale = json.loads(line).get("epoch", 0) >= start_epoch
            except (ValueError, AttributeError):  # a line torn by the kill
                stale = True
            if not stale:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))

    def merge_logs(self) -> None:
        """The run-level log.jsonl: every fold's log, in fold order."""
        parts = []
        for k in range(len(self.folds)):
            path = self.run_dir / f"fold{k}" / "log.jsonl"
            if path.is_file():
                parts.append(path.read_text(encoding="utf-8"))
        atomic_write_text(self.run_dir / "log.jsonl", "".join(parts))

    def discard_if_unstarted(self) -> None:
        """After a failure: remove the run folder this process created if no epoch of it was saved."""
        if self.created and DIST.is_main and self.run_dir.is_dir() and not any(self.run_dir.glob("fold*/*.pt")):
            shutil.rmtree(self.run_dir, ignore_errors=True)


def run_record(settings: TrainingSettings, db: Database, folds: FoldSet, device: Any,
               test_db: Database | None = None) -> dict:
    """args.json: the command line, the resolved settings, the database and split identity."""
    return {
        "script": settings.script, "protocol": settings.protocol,
        "kd": settings.distill.kd if settings.distill is not None else None,
        "git_commit": git_commit(), "argv": sys.argv, "args": settings.args, "settings": settings.to_json(),
        "database": {**db.identity(), "higher_is_better": db.higher_is_better, "score_range": list(db.score_range)},
        "test_database": test_db.identity() if test_db is not None else None,
        "scores_flipped": test_db is not None and db.higher_is_better != test_db.higher_is_better,
        "folds": folds.describe(), "device_used": str(device), "processes": DIST.world, "parallel": DIST.mode,
    }


def resumed_record(path: Path, record: dict) -> dict:
    """args.json of a resumed run: the first command line and commit kept, each resumption appended
    (its command line, commit and time) under `resumed`."""
    try:
        first = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return record
    if not isinstance(first, dict):
        return record
    resumption = {"argv": record["argv"], "git_commit": record["git_commit"],
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {**record, "argv": first.get("argv", record["argv"]), "git_commit": first.get("git_commit"),
            "resumed": [*first.get("resumed", []), resumption]}


def read_run_record(run_dir: Path, script: str) -> dict:
    """A finished or running run's args.json, checked to be a record of `script`."""
    path = Path(run_dir) / "args.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run folder (no args.json); pass runs/{script}/<database>/<run>")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise ValueError("no settings")
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable run record ({err})") from None
    if record.get("script") != script:
        raise UserError(f"{path}: a {record.get('script')} run, not a {script} run")
    return record


def project_folders(*anchors: Path) -> list[Path]:
    """Folders other than the working folder where a project's relative runs/, features/ or data/ may live: the
    working folder's parents, each anchor (a database's folder) and its parents, and the checkout of this code."""
    cwd = Path.cwd().resolve()
    checkout = Path(__file__).resolve().parents[1]
    found: list[Path] = []
    for start in (cwd, *(Path(a).resolve() for a in anchors), checkout):
        for folder in (start, *start.parents):
            if folder != cwd and folder not in found:
                found.append(folder)
    return found


def check_resumed_run(settings: TrainingSettings, db: Database, folds: FoldSet) -> None:
    """--resume: the run goes on with the database and split it started with (a --data-root given now may name
    another copy, a fold file may have been rewritten): else refused, before anything is trained."""
    if not settings.run.resume or not settings.run.out:
        return
    path = Path(settings.run.out) / "args.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return  # refused by --resume itself
    saved = record.get("database") or {}
    if saved.get("key") and saved["key"] != database_key(db):
        raise UserError(f"{path}: this run started on the database {saved['key']} ({saved.get('root')}); it would go on "
                        f"with {database_key(db)} ({db.root}), another database or another version of its files; "
                        f"resume it with the data it started with, or start a new --out")
    split = (record.get("folds") or {}).get("sha256")
    if split and split != folds.digest():
        raise UserError(f"{path}: this run started on another split ({(record.get('folds') or {}).get('path')}, sha256 "
                        f"{split[:12]}) than the one it would go on with ({folds.path or folds.source}); restore that "
                        f"fold file, or start a new --out")


def latest_finished_run(script: str, key: str, root: Path = Path("runs")) -> Path | None:
    """The most recently finished run (results.csv) of `script` on the database (or pair) `key`."""
    folder = root / script / key
    finished = [p.parent for p in folder.glob("*/results.csv")] if folder.is_dir() else []
    return max(finished, key=lambda p: (p / "results.csv").stat().st_mtime_ns, default=None)


# ----------------------------------------------------------------------------------------------
# Outputs.

def save_scatter(path: Path, result: FoldResult, title: str) -> None:
    """Prediction vs score with the fitted mapping the PLCC/RMSE were computed after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, pred = result.metrics, result.pred
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    ax.scatter(pred, result.evaluation.target, s=10, alpha=0.7, edgecolors="none")
    if len(pred) and np.ptp(pred) > 0:
        xs = np.linspace(pred.min(), pred.max(), 200)
        fit = result.evaluation.fit
        ax.plot(xs, fit.predict(xs), color="C3", lw=1.5, label=f"{fit.kind} fit" + (" (fallback)" if fit.fallback else ""))
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("subjective score" + (" (negated)" if values.get("sign_flipped") else ""))
    ax.set_title(f"{title}\nSRCC {values['srcc']:.3f}  PLCC {values['plcc']:.3f}  RMSE {values['rmse']:.3g}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_fold_outputs(run: Run, result: FoldResult) -> None:
    """predictions.csv, metrics.json and scatter.png of one fold."""
    fold_dir = run.fold_dir(result.fold)
    fitted = result.evaluation.fit.predict(result.pred)
    atomic_write_csv(fold_dir / "predictions.csv", pd.DataFrame({
        "image": result.images, "mos": result.mos, "prediction": result.pred, "fitted": fitted}))
    atomic_write_json(fold_dir / "metrics.json", {
        "fold": result.fold, "epoch": result.epoch, "selection": SELECTION_NOTES[run.settings.eval.select],
        "protocol": run.settings.protocol, **jsonable(result.metrics)})
    title = f"{run.script} {run.eval_db.name} fold {result.fold} (epoch {result.epoch})"
    save_scatter(fold_dir / "scatter.png", result, title)


def finish_run(run: Run, results: list[FoldResult]) -> pd.DataFrame:
    """results.csv (a row per fold, then mean, std and median), predictions.csv, the printed table."""
    settings = run.settings
    rows = [{"fold": r.fold, "epoch": r.epoch, **{m: r.metrics[m] for m in metrics.METRIC_KEYS},
             "n": r.metrics["n"], "fit": r.metrics["fit"], "fit_fallback": r.metrics["fit_fallback"],
             **distortion_metrics(run.eval_db, r)}
            for r in sorted(results, key=lambda r: r.fold)]
    by_type = [key for key in rows[0] if key.startswith(("srcc_", "plcc_"))] if rows else []
    # A per-distortion metric can be undefined in a fold (NaN): each mean is over the folds that have it,
    # and folds_<metric> says how many.
    summary = metrics.summarize(rows, keys=[*metrics.METRIC_KEYS, *by_type], counted=by_type)
    table = pd.DataFrame(summary)
    for column in ("epoch", "n", *(f"folds_{key}" for key in by_type)):
        table[column] = table[column].astype("Int64")
    table["fit_requested"] = settings.eval.fit
    table["selection"] = SELECTION_NOTES[settings.eval.select]
    table["protocol"] = settings.protocol
    table["model"] = "teacher" if settings.distill is None else "student"
    if settings.distill is not None:
        table["kd"] = settings.distill.kd
    table["folds_sha256"] = run.folds.digest()
    flipped = any(r.metrics.get("sign_flipped") for r in results)
    if run.test_db is not None:
        table["sign_flipped"] = flipped
    written = table.copy()
    if by_type:  # undefined, not missing: n/a (which pandas reads back as NaN)
        written[by_type] = written[by_type].astype(object).where(written[by_type].notna(), "n/a")
    atomic_write_csv(run.run_dir / "results.csv", written)
    preds = pd.concat([pd.DataFrame({"fold": r.fold, "image": r.images, "mos": r.mos, "prediction": r.pred})
                       for r in sorted(results, key=lambda r: r.fold)], ignore_index=True)
    atomic_write_csv(run.run_dir / "predictions.csv", preds)
    run.merge_logs()
    heading = f"{settings.script} ({labels(settings)}) on {run.eval_db.name}: {SELECTION_NOTES[settings.eval.select]}"
    if flipped:
        heading += f"; scores of {run.eval_db.name} flipped (DMOS vs MOS)"
    elif not run.eval_db.higher_is_better:
        heading += (f"; {run.eval_db.name} scores are DMOS (higher is worse) and the model predicts them, "
                    f"so a good model correlates positively")
    print("\n" + heading)
    print(metrics.format_results_table(summary))
    fallbacks = [r.fold for r in results if r.metrics["fit_fallback"]]
    if fallbacks and settings.eval.fit == "paper":
        print(f"note: the paper's fit_function raised on fold(s) {', '.join(map(str, fallbacks))}; their PLCC/RMSE "
              f"come from our logistic4 fit (see fit_fallback in results.csv)")
    elif fallbacks:
        print(f"note: the {settings.eval.fit} fit of fold(s) {', '.join(map(str, fallbacks))} was degenerate or failed; "
              f"their PLCC/RMSE come from a linear fit (see fit_fallback in results.csv)")
    mean = next(row for row in summary if row["fold"] == "mean")
    srcc_by_type = [key for key in by_type if key.startswith("srcc_")]
    if srcc_by_type:
        print("SRCC by distortion type (mean over folds): "
              + ", ".join(f"{key[5:]} {metrics.mean_text(mean[key], mean[f'folds_{key}'], len(rows))}"
                          for key in srcc_by_type), flush=True)
    print(f"results: {run.run_dir / 'results.csv'}", flush=True)
    return table


def distortion_metrics(db: Database, result: FoldResult) -> dict[str, float]:
    """SRCC/PLCC per distortion type of a fold's test images, when meta.csv has a `distortion` column."""
    if "distortion" not in db.meta.columns:
        return {}
    kinds = db.meta.set_index("image")["distortion"].fillna("none").astype(str)
    every = {f"{m}_{metrics.distortion_column(k)}": float("nan") for k in sorted(set(kinds)) for m in ("srcc", "plcc")}
    return {**every, **metrics.by_distortion(result.evaluation, result.pred, kinds.loc[result.images].tolist())}
