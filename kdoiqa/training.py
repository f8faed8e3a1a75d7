"""The k-fold training of one run: set up each fold, train its epochs, select, report.

    run = start_run(settings)                        # database, split, device, run folder
    train_folds(run, build_method)                   # every fold (or this rank's folds), then the tables

A fold: `setup_fold` (networks on the device, Adam, resume or a fresh start) -> `train_epochs`
(engine.train_one_epoch, then `evaluate_epoch` for the log and the epoch selection, and the
resumable state every --save-every epochs) -> `report_fold` (the reported model's test scores,
outputs, checkpoint.pt). One decoded pixel cache serves every fold of the run.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdoiqa import engine, metrics
from kdoiqa.accelerator import ACCELERATOR
from kdoiqa.checkpoints import CHECKPOINT, RESUME, cpu_state, load_checkpoint, load_resume_state, save_checkpoint
from kdoiqa.common import (
    UserError,
    atomic_torch_save,
    deferred_interrupts,
    interrupt_hint,
    interrupt_pending,
    jsonable,
    seed_everything,
)
from kdoiqa.databases import Database, database_key
from kdoiqa.distributed import DIST, sum_gradients
from kdoiqa.folds import FoldSet, FoldSplit, holdout_validation, resolve_folds
from kdoiqa.image_store import ImageStore
from kdoiqa.methods import Method, TargetScale
from kdoiqa.models.backbone import prepare_model
from kdoiqa.runs import FoldResult, Run, check_run_dir, finish_run, labels, run_name, run_record, write_fold_outputs
from kdoiqa.settings import TrainingSettings, in_checkpoint, protocol_note

# ----------------------------------------------------------------------------------------------
# A run.

def start_run(settings: TrainingSettings, db: Database, *, folds: FoldSet | None = None,
              test_db: Database | None = None, run_key: str | None = None) -> Run:
    """Check the data, choose the split and the device, and name the run folder (made later). Called within a
    `DIST.scope()` (the stage's), which undoes the process group set up here when the stage ends."""
    run_cfg, runtime = settings.run, settings.runtime
    if folds is None:
        folds = resolve_folds(db, run_cfg.folds_file, k=run_cfg.folds, split_seed=run_cfg.split_seed,
                              prefer_authors=settings.protocol == "paper")
    if run_cfg.fold is not None and not 0 <= run_cfg.fold < len(folds):
        raise UserError(f"--fold {run_cfg.fold} is out of range: the fold file has folds 0..{len(folds) - 1}")
    fold_ids = [run_cfg.fold] if run_cfg.fold is not None else list(range(len(folds)))
    mode = "batch" if runtime.parallel == "batch" else "folds"
    device = DIST.init(runtime.device, mode)
    if DIST.data_parallel and settings.optim.batch_size < DIST.world:
        raise UserError(f"--batch-size {settings.optim.batch_size} is smaller than the {DIST.world} processes of "
                        f"--parallel batch; each step's batch is split across them (or use --parallel folds)")
    name = DIST.gather_objects(run_name(settings))[0]  # rank 0's clock names the run on every rank
    run_dir = Path(run_cfg.out) if run_cfg.out else Path("runs") / settings.script / (run_key or database_key(db)) / name
    check_run_dir(run_dir, resume=run_cfg.resume)
    amp = engine.resolve_amp(runtime.amp, device)
    if settings.distill is None:
        engine.check_amp_input(amp, device, settings.data.face_size, f"--face-size {settings.data.face_size}")
    else:
        width, height = settings.data.erp_size
        engine.check_amp_input(amp, device, width, f"--erp-size {width}x{height}")
    record = run_record(settings, db, folds, device, test_db)
    record["amp_used"] = amp
    run = Run(settings, db, folds, fold_ids, run_dir, device, test_db, record)
    if DIST.is_main:
        world = f", {DIST.world} processes (--parallel {DIST.mode})" if DIST.enabled else ""
        print(f"{settings.script} ({labels(settings)}): {db.name} ({len(db)} images), {len(fold_ids)} fold(s) of "
              f"{folds.path or folds.source}, run folder {run_dir}{world}", flush=True)
        print(f"device {device}, precision {AMP_NAMES[amp]}"
              + (f" (--amp {runtime.amp})" if runtime.amp == "auto" else "")
              + (", TF32 on" if ACCELERATOR.takes(device) and runtime.tf32 and amp == "none" else "")
              + (", deterministic algorithms" if runtime.deterministic else ""), flush=True)
        print(f"protocol {protocol_note(settings.protocol, settings.eval.select_metric, teacher=settings.distill is None)}",
              flush=True)
        if settings.eval.select == "test":
            print("note: epoch selected on the test fold (the paper's protocol; optimistic)", flush=True)
        if DIST.mode == "folds" and len(fold_ids) < DIST.world:
            idle = (f"process {len(fold_ids)} has" if len(fold_ids) == DIST.world - 1
                    else f"processes {len(fold_ids)} to {DIST.world - 1} have")
            print(f"note: {len(fold_ids)} fold(s) for {DIST.world} processes under --parallel folds: {idle} none to "
                  f"train (--parallel batch splits each step's batch across the processes instead)", flush=True)
        if DIST.mode == "folds" and settings.optim.seeding == "once":
            print("note: --seeding once under --parallel folds: each process seeds once before its first fold, "
                  "so folds after the first differ from a sequential run", flush=True)
    return run


AMP_NAMES = {"none": "fp32", "bf16": "bf16 autocast (head and projector fp32)",
             "fp16": "fp16 autocast with loss scaling (head and projector fp32)"}


@contextlib.contextmanager
def precision(tf32: bool, deterministic: bool, device: torch.device):
    """The TF32 and determinism switches of a run, for the block's duration only: every switch (and
    CUBLAS_WORKSPACE_CONFIG) is restored afterwards, so that a later run or an API user in the same
    process is not made deterministic or TF32 by this one. `--deterministic`: PyTorch refuses any
    operation without a deterministic implementation (no warn-only), cuDNN without autotuning; the
    backbone's global pool is then a mean with a deterministic CUDA backward (models/backbone.py)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32, cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if ACCELERATOR.takes(device):
            cudnn.benchmark = not deterministic
            cudnn.deterministic = deterministic
            matmul.allow_tf32 = tf32
            cudnn.allow_tf32 = tf32
        if deterministic:
            # cuBLAS's deterministic workspace; PyTorch checks it at each cuBLAS call under determinism.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32, cudnn.allow_tf32 = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def train_folds(run: Run, build_method: Callable[[int, FoldSplit], Method], *,
                features_for_fold: Callable[[int], dict[str, torch.Tensor]] | None = None) -> list[FoldResult]:
    """Train and evaluate every fold of the run (under --parallel folds: this rank's folds), then
    write the run's tables on rank 0 once every fold is done."""
    stores: dict[tuple[str, int], ImageStore] = {}
    results = []
    if run.settings.optim.seeding == "once":
        seed_everything(run.settings.optim.seed)
    runtime = run.settings.runtime
    with interrupt_hint(run.resume_command):  # once the run's folder exists, Ctrl-C prints how to continue it
        try:
            with precision(runtime.tf32, runtime.deterministic, run.device):
                results = _train_my_folds(run, build_method, stores, features_for_fold)
        except BaseException:
            run.discard_if_unstarted()
            raise
        every = [r for rank_results in DIST.gather_objects(results) for r in rank_results]
        if DIST.is_main:
            finish_run(run, every)
        DIST.barrier()
    return sorted(every, key=lambda r: r.fold)


def _train_my_folds(run: Run, build_method: Callable[[int, FoldSplit], Method], stores: dict,
                    features_for_fold: Callable[[int], dict[str, torch.Tensor]] | None) -> list[FoldResult]:
    results = []
    for k in DIST.my_folds(run.fold_ids):
        if run.settings.optim.seeding == "per-fold":
            seed_everything(run.settings.optim.seed + k)
        method = build_method(k, run.folds.folds[k])
        store = _store(run, stores, run.db, method.view)
        if features_for_fold is not None:
            store.set_features(features_for_fold(k))
        test_store = store if run.test_db is None else _store(run, stores, run.test_db, method.view)
        results.append(train_fold(run, k, method, store, test_store))
    return results


def _store(run: Run, stores: dict, db: Database, view: str) -> ImageStore:
    """One decoded cache per database and view serves every fold (features are swapped in per fold)."""
    key = (view, id(db))
    if key not in stores:
        stores[key] = ImageStore(db, db.images, view, run.settings.data, run.device, progress=run.progress)
    return stores[key]


# ----------------------------------------------------------------------------------------------
# A fold.

@dataclass
class FoldState:
    method: Method
    step: dict[tuple[str, ...], torch.nn.Module]  # per set of networks in use: the method, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    grad_scaler: torch.amp.GradScaler
    autocast: Callable
    scale: TargetScale
    start_epoch: int = 1
    history: list[dict] = field(default_factory=list)
    selected: dict | None = None          # {"epoch", "criterion", "nets"}: the best epoch so far (--select val/test)
    finished: dict | None = None          # the finished fold's checkpoint (resuming a finished fold)
    last_eval: tuple | None = None        # (epoch, FoldResult-ready evaluation, predictions) of the last evaluation


def train_fold(run: Run, k: int, method: Method, store: ImageStore, test_store: ImageStore) -> FoldResult:
    split = run.folds.folds[k]
    train_images, val_images = list(split.train), []
    if run.settings.eval.select == "val":
        train_images, val_images = holdout_validation(run.db, split.train, run.settings.eval.val_fraction,
                                                      run.settings.optim.seed + k)
    started = time.perf_counter()
    state = setup_fold(run, k, method, train_images)
    first = state.start_epoch
    if state.finished is None:
        train_epochs(run, k, state, store, test_store, train_images, val_images)
    result = report_fold(run, k, state, test_store)
    if DIST.is_main or DIST.mode == "folds":  # one line per fold, also without progress bars
        trained = max(0, run.settings.optim.epochs - first + 1) if state.finished is None else 0
        print(f"fold {k}: {trained} epoch(s) trained in {time.perf_counter() - started:.0f} s; test SRCC "
              f"{result.metrics['srcc']:.3f} (epoch {result.epoch} reported)", flush=True)
    return result


def setup_fold(run: Run, k: int, method: Method, train_images: Sequence[str]) -> FoldState:
    """The networks on the device, Adam and the GradScaler; then either the finished fold's model, the
    resumable state of an interrupted one, or a fresh start (the head initialised)."""
    settings, device = run.settings, run.device
    prepare_model(method, device, channels_last=ACCELERATOR.takes(device))
    optimizer = engine.build_optimizer(method, settings.optim, device)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    amp = engine.resolve_amp(settings.runtime.amp, device)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and ACCELERATOR.takes(device))
    method.use_grad_scaler(grad_scaler)
    scale = TargetScale.of(settings.optim.target_scale, run.db.score_range)
    state = FoldState(method, {}, optimizer, grad_scaler, engine.autocast_for(amp, device), scale)
    run.open()  # the run starts writing: its folder and args.json (once)
    fold_dir = run.fold_dir(k)
    if run.writes_fold(k):
        fold_dir.mkdir(parents=True, exist_ok=True)
    final, resume = fold_dir / CHECKPOINT, fold_dir / RESUME
    if settings.run.resume and final.is_file():
        state.finished = _check_same_model(load_checkpoint(final), method, final)
        method.model.load_state_dict(state.finished["model"])
        if DIST.is_main:
            print(f"fold {k}: finished earlier (epoch {state.finished['epoch']} reported); re-reported from {final}")
        return state
    if settings.run.resume and resume.is_file():
        _restore(state, load_resume_state(resume), resume)
        if DIST.is_main:
            print(f"fold {k}: resumed after epoch {state.start_epoch - 1} from {resume}", flush=True)
    else:
        method.init_head(float(scale.to_target(torch.from_numpy(run.db.scores(train_images))).mean()))
    if run.writes_fold(k):
        run.trim_log(k, state.start_epoch)
    state.step = _wrap(method, settings, device)
    return state


class _NetsInUse(torch.nn.Module):
    """The method seen through the networks one phase uses (DDP then wraps exactly the parameters that
    receive gradients, with no search for unused ones): e.g. the student before its mask phase, whose
    policy net idles. The forward is the method's own."""

    def __init__(self, method: Method, names: tuple[str, ...]) -> None:
        super().__init__()
        object.__setattr__(self, "method", method)  # not registered: its idle networks stay outside
        for name in names:
            self.add_module(name, method.nets()[name])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.method(*args, **kwargs)


def _wrap(method: Method, settings: TrainingSettings, device: torch.device) -> dict[tuple[str, ...], torch.nn.Module]:
    """The module each training step calls, per set of networks in use (`Method.nets_in_use`): the method,
    or under --parallel batch a DistributedDataParallel over just the networks that phase trains (no
    `find_unused_parameters`, which would search the graph and copy a flag to the host every step);
    compiled with --compile."""
    if DIST.data_parallel and settings.runtime.sync_bn:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    steps: dict[tuple[str, ...], torch.nn.Module] = {}
    for names in method.phases_nets():
        step: torch.nn.Module = method
        if DIST.data_parallel:
            inner = method if set(names) == set(method.nets()) else _NetsInUse(method, names)
            step = torch.nn.parallel.DistributedDataParallel(
                inner, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
            step.register_comm_hook(None, sum_gradients)
        if settings.runtime.compile and ACCELERATOR.takes(device):
            step = torch.compile(step)
        steps[names] = step
    return steps


def _check_same_model(ckpt: dict, method: Method, path: Path) -> dict:
    if ckpt.get("model_config") != method.config():
        raise UserError(f"{path}: checkpoint of another model ({ckpt.get('model_config')}); resume with the "
                        f"same --arch and settings or start a new --out")
    return ckpt


def _restore(state: FoldState, saved: dict, path: Path) -> None:
    _check_same_model(saved, state.method, path)
    try:
        for name, net in state.method.nets().items():
            net.load_state_dict(saved["modules"][name])
        state.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("grad_scaler"):
            state.grad_scaler.load_state_dict(saved["grad_scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"{path}: cannot resume from this state ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                        f"it belongs to another model or settings: start a new --out") from None
    state.start_epoch, state.history, state.selected = saved["epoch"] + 1, list(saved["history"]), saved.get("selected")


def train_epochs(run: Run, k: int, state: FoldState, store: ImageStore, test_store: ImageStore,
                 train_images: Sequence[str], val_images: Sequence[str]) -> None:
    from tqdm import tqdm

    settings = run.settings
    epochs = settings.optim.epochs
    writer = _summary_writer(run, k) if run.writes_fold(k) else None
    bar = tqdm(range(state.start_epoch, epochs + 1), desc=f"fold {k}", unit="epoch", disable=not run.progress,
               dynamic_ncols=True, initial=state.start_epoch - 1, total=epochs)
    last_save = time.monotonic()
    try:  # the writer's thread closed also when a fold stops with an error or Ctrl-C
        with deferred_interrupts("stopping after this epoch, its state saved for --resume"):
            for epoch in bar:
                started = time.perf_counter()
                factor = engine.lr_factor(settings.optim.lr_schedule, epoch, epochs)
                for group in state.optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                step = state.step[state.method.nets_in_use(epoch)]
                scalars = engine.train_one_epoch(state.method, step, store, train_images, state.optimizer,
                                                 state.grad_scaler, state.autocast, state.scale, settings.optim.batch_size,
                                                 epoch, engine.epoch_generator(settings.optim.seed, k, epoch))
                # Under --parallel batch every rank stops at the same epoch: a non-finite loss or a Ctrl-C on any.
                not_finite, stop = DIST.any_rank([not all(math.isfinite(v) for v in scalars.values()),
                                                  interrupt_pending()], run.device)
                if not_finite:
                    raise UserError(f"fold {k} epoch {epoch}: the training loss is not finite"
                                    f"{' on some process' if DIST.data_parallel else ''}; lower --lr or use --amp none")
                record = {"fold": k, "epoch": epoch, **scalars, "lr": settings.optim.lr * factor,
                          "epoch_seconds": time.perf_counter() - started}
                record.update(evaluate_epoch(run, k, state, epoch, store, test_store, val_images))
                state.history.append(record)
                if writer is not None:
                    run.log(k, record)
                    for name, value in record.items():
                        if name not in ("fold", "epoch") and isinstance(value, (int, float)):
                            writer.add_scalar(name, value, epoch)
                    writer.flush()
                    if stop or (epoch < epochs and _save_due(settings.run, epoch, last_save)):
                        _save_resume_state(run, k, state, epoch)
                        last_save = time.monotonic()
                bar.set_postfix(loss=f"{record['train_loss']:.4g}", srcc=f"{record.get('test_srcc', float('nan')):.3f}")
                if not run.progress and (DIST.is_main or DIST.mode == "folds"):
                    print(_epoch_line(k, epoch, epochs, record), flush=True)
                if stop:
                    DIST.stop_together(None if DIST.data_parallel else STOP_WAIT_SECONDS)
                    raise KeyboardInterrupt
    finally:
        bar.close()
        if writer is not None:
            writer.close()


STOP_WAIT_SECONDS = 20.0  # --parallel folds: how long a stopping process waits for the others' saves


def _epoch_line(k: int, epoch: int, epochs: int, record: dict) -> str:
    """The one line per epoch printed under --no-progress (a sign of life without progress bars)."""
    test = f", test SRCC {record['test_srcc']:.3f}" if "test_srcc" in record else ""
    return (f"fold {k} epoch {epoch}/{epochs}: loss {record['train_loss']:.4g}{test} "
            f"({record['epoch_seconds']:.1f} s)")


def _save_due(run_cfg, epoch: int, last_save: float) -> bool:
    """Whether the resumable state is written after `epoch`: --save-minutes since the last write, or
    every --save-every epochs. (On a GPU an epoch can take a second and the state is ~150 MB.)"""
    if run_cfg.save_every and epoch % run_cfg.save_every == 0:
        return True
    return time.monotonic() - last_save >= 60.0 * run_cfg.save_minutes


def selection_criterion(values: dict, metric: str) -> float:
    """The --select-metric value of a metrics dict (higher is better)."""
    srcc, plcc = values["srcc"], values["plcc"]
    return {"srcc+plcc": srcc + plcc, "srcc": srcc, "abs-srcc": abs(srcc),
            "abs-srcc+abs-plcc": abs(srcc) + abs(plcc)}[metric]


def evaluate_epoch(run: Run, k: int, state: FoldState, epoch: int, store: ImageStore, test_store: ImageStore,
                   val_images: Sequence[str]) -> dict:
    """Test metrics for the log (every --eval-every epochs, every epoch when selecting), and the
    selection of the reported epoch on the validation split (--select val) or the test fold (test)."""
    settings = run.settings
    select = settings.eval.select
    if not (epoch == settings.optim.epochs or epoch % settings.eval.eval_every == 0 or select != "last"):
        return {}
    test_images, test_mos = _test_set(run, k)
    evaluation, pred = _evaluate(run, state, test_store, test_images, test_mos, run.eval_db, cross=True)
    state.last_eval = (epoch, evaluation, pred)
    record = {f"test_{m}": evaluation.metrics[m] for m in metrics.METRIC_KEYS}
    chosen_on = evaluation.metrics
    if val_images:
        val, _ = _evaluate(run, state, store, val_images, run.db.scores(val_images), run.db, cross=False)
        record.update({f"val_{m}": val.metrics[m] for m in ("srcc", "plcc")})
        chosen_on = val.metrics
    if select != "last":
        criterion = selection_criterion(chosen_on, settings.eval.select_metric)
        if state.selected is None or criterion > state.selected["criterion"]:
            state.selected = {"epoch": epoch, "criterion": float(criterion),
                              "nets": {name: cpu_state(net) for name, net in state.method.nets().items()}}
    return record


def _test_set(run: Run, k: int) -> tuple[list[str], np.ndarray]:
    images = list(run.folds.folds[k].test) if run.test_db is None else run.test_db.images
    return images, run.eval_db.scores(images)


def _evaluate(run: Run, state: FoldState, store: ImageStore, images: Sequence[str], mos: np.ndarray,
              db: Database, *, cross: bool) -> tuple[metrics.Evaluation, np.ndarray]:
    pred = engine.predict_scores(state.method, store, images, run.settings.optim.batch_size * 2, state.autocast,
                                 state.scale)
    train_direction = run.db.higher_is_better if cross and run.test_db is not None else None
    return metrics.assess(pred, mos, db.higher_is_better, run.settings.eval.fit, train_direction), pred


def report_fold(run: Run, k: int, state: FoldState, test_store: ImageStore) -> FoldResult:
    """The reported model (the last epoch, or the selected one) scored on the fold's test images;
    its outputs and checkpoint.pt written; the resumable state removed."""
    settings = run.settings
    if state.finished is not None:
        epoch, history = state.finished["epoch"], state.finished["history"]
    elif settings.eval.select != "last" and state.selected is not None:
        for name, net in state.method.nets().items():
            net.load_state_dict(state.selected["nets"][name])
        epoch, history = state.selected["epoch"], state.history
    else:
        epoch, history = settings.optim.epochs, state.history
    test_images, test_mos = _test_set(run, k)
    if state.last_eval is not None and state.last_eval[0] == epoch:
        _, evaluation, pred = state.last_eval
    else:
        evaluation, pred = _evaluate(run, state, test_store, test_images, test_mos, run.eval_db, cross=True)
    result = FoldResult(k, epoch, evaluation, test_images, pred, test_mos)
    if run.writes_fold(k):
        if state.finished is None:
            _save_final(run, k, state, epoch, history)
        write_fold_outputs(run, result)
        if DIST.mode != "folds":
            run.merge_logs()
    if DIST.data_parallel:
        DIST.barrier()  # every rank starts the next fold with rank 0's files written
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoints.

def _checkpoint_settings(settings: TrainingSettings) -> dict:
    """The settings a checkpoint keeps: what defines the model and its training, not where it ran."""
    record = settings.to_json()
    for group in ("data", "runtime", "run"):
        record[group] = {key: value for key, value in record[group].items() if in_checkpoint(group, key)}
    return record


def _save_final(run: Run, k: int, state: FoldState, epoch: int, history: list[dict]) -> None:
    fold_dir = run.fold_dir(k)
    scale = state.scale
    save_checkpoint(fold_dir / CHECKPOINT, {
        "kind": state.method.kind, "model_config": state.method.config(), "model": cpu_state(state.method.model),
        "epoch": epoch, "epochs": run.settings.optim.epochs, "selection": run.settings.eval.select,
        "history": jsonable([{k2: v for k2, v in r.items() if k2 != "epoch_seconds"} for r in history]),
        "settings": _checkpoint_settings(run.settings),
        "database": {"name": run.db.name, "key": database_key(run.db), "meta_sha256": run.db.meta_sha256,
                     "higher_is_better": run.db.higher_is_better, "score_range": list(run.db.score_range),
                     "score": run.db.describe_scores()},
        "target_scale": {"offset": scale.offset, "scale": scale.scale},
        "folds": {"sha256": run.folds.digest(), "k": len(run.folds), "fold": k},
        "teacher_features": (run.record.get("teacher_features") or {}).get(str(k)),  # a student's teacher, per fold
    })
    (fold_dir / RESUME).unlink(missing_ok=True)


def _save_resume_state(run: Run, k: int, state: FoldState, epoch: int) -> None:
    atomic_torch_save({
        "model_config": state.method.config(),
        "modules": {name: cpu_state(net) for name, net in state.method.nets().items()},
        "optimizer": state.optimizer.state_dict(), "grad_scaler": state.grad_scaler.state_dict(),
        "epoch": epoch, "history": jsonable(state.history), "selected": state.selected,
    }, run.fold_dir(k) / RESUME)


def _summary_writer(run: Run, k: int) -> Any:
    import json

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run.fold_dir(k)))
    writer.add_text("run", f"{run.script} ({labels(run.settings)}) on {run.eval_db.name}, fold {k}")
    writer.add_text("settings", "```\n" + json.dumps(run.settings.to_json(), indent=1) + "\n```")
    return writer
