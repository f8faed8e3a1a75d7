"""The one training / evaluation loop every script uses.

A script builds a `Method` (its networks, its loss, its prediction) per fold and hands it to
`train_folds`, which owns everything else: seeded batches from a decoded-once pixel cache,
Adam, mixed precision, per-epoch evaluation, epoch selection (`--select`), checkpoints and
`--resume`, `log.jsonl`, TensorBoard scalars, predictions, scatter plots and the results table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import metrics
from common import (
    DIST,
    UserError,
    atomic_path,
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    jsonable,
    load_checkpoint,
    make_run_dir,
    save_args,
    seed_everything,
)
from dataset import (
    Database,
    FoldSet,
    FoldSplit,
    ImageDataset,
    database_key,
    holdout_validation,
    load_database,
    resolve_folds,
)

TEST_SELECTION_NOTE = "epoch selected on the test fold (the paper's protocol; optimistic)"
SELECTION_NOTES = {
    "last": "last epoch (no selection)",
    "val": "epoch selected on a validation split of the training contents",
    "test": TEST_SELECTION_NOTE,
}


# ----------------------------------------------------------------------------------------------
# What a script plugs in.

class Method:
    """A model and its loss. Subclasses override `training_loss` (and more when they have more nets).

    `predict` returns scores in target units (see `TargetScale`); `modules` are what a
    checkpoint stores; `param_groups` what Adam optimises.
    """

    view = "erp"          # "erp" or "faces": which pixels the batches carry
    kind = "student"      # model kind recorded in checkpoints

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.runner: Callable = model  # the callable used in forward passes (torch.compile'd with --compile)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def param_groups(self, args: argparse.Namespace) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": args.lr}]

    def init_output(self, mean_target: float) -> None:
        """Start the head at the mean training target: faster convergence, the same optimum."""
        with torch.no_grad():
            self.model.head.bias.fill_(mean_target)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner(batch["pixels"])

    def predict(self, batch: dict) -> torch.Tensor:
        return self.forward(batch)[0]

    def training_loss(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and named scalars to log (tensors: they are read once per epoch)."""
        score, _ = self.forward(batch)
        loss = nn.functional.mse_loss(score.float(), batch["target"])
        return loss, {}

    def epoch_scalars(self) -> dict[str, float]:
        """Extra per-epoch scalars (e.g. the share of channels a mask takes from the teacher)."""
        return {}

    def config(self) -> dict:
        return self.model.config()


@dataclass
class TargetScale:
    """Maps scores to regression targets: raw (offset 0, scale 1, the paper) or [0, 1] by the range."""

    offset: float = 0.0
    scale: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, db: Database) -> TargetScale:
        if args.target_scale == "range":
            lo, hi = db.score_range
            return cls(lo, hi - lo)
        return cls()

    def to_target(self, mos: torch.Tensor) -> torch.Tensor:
        return (mos - self.offset) / self.scale

    def to_score(self, target: np.ndarray) -> np.ndarray:
        return target * self.scale + self.offset


# ----------------------------------------------------------------------------------------------
# Pixels: decoded once into a uint8 cache (CPU or GPU), or streamed by a DataLoader.

def _pixel_shape(view: str, args: argparse.Namespace) -> tuple[int, ...]:
    if view == "faces":
        return (6, 3, args.face_size, args.face_size)
    width, height = args.erp_size
    return (3, height, width)


def _epoch_generator(seed: int, fold: int, epoch: int) -> torch.Generator:
    # Each epoch's shuffle depends only on (seed, fold, epoch): a resumed run sees the same batches.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + fold * 10_007 + epoch)


class ImageStore:
    """The pixels of a database's images for one view, batched onto the training device."""

    def __init__(self, db: Database, images: Sequence[str], view: str, args: argparse.Namespace,
                 device: torch.device, *, features: dict[str, torch.Tensor] | None = None,
                 progress: bool = True) -> None:
        self.db, self.view, self.args, self.device = db, view, args, device
        self.images = list(dict.fromkeys(images))
        self.row = {name: i for i, name in enumerate(self.images)}
        self.mos = torch.from_numpy(db.scores(self.images).astype(np.float32))
        self.features: torch.Tensor | None = None
        if features is not None:
            self.set_features(features)
        self.dataset = ImageDataset(db, self.images, view, erp_size=args.erp_size, face_size=args.face_size,
                                    faces_source=getattr(args, "faces", "auto"))
        self.mode = self._choose_cache(args.cache, progress)
        self.pixels: torch.Tensor | None = None
        if self.mode != "none":
            self.pixels = self._decode_all(progress)

    def set_features(self, features: dict[str, torch.Tensor]) -> None:
        """Carry each image's cached teacher feature in its batches (kept on the training device)."""
        missing = [x for x in self.images if x not in features]
        if missing:
            raise UserError(f"teacher features lack {len(missing)} image(s), e.g. {missing[0]!r}")
        self.features = torch.stack([features[x].float() for x in self.images]).to(self.device)

    def _choose_cache(self, request: str, progress: bool) -> str:
        nbytes = len(self.images) * int(np.prod(_pixel_shape(self.view, self.args)))
        gib = nbytes / 2**30
        if request == "auto":
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                request = "gpu" if nbytes < 0.4 * free else "cpu"
            if request != "gpu":
                request = "cpu" if nbytes < 0.4 * _available_ram() else "none"
        if request == "gpu" and self.device.type != "cuda":
            request = "cpu"  # --cache gpu on a CPU run is the CPU cache
        if progress:
            print(f"pixel cache: {request} ({len(self.images)} images, {self.view}, {gib:.2f} GiB uint8)", flush=True)
        return request

    def _decode_all(self, progress: bool) -> torch.Tensor:
        from tqdm import tqdm

        shape = _pixel_shape(self.view, self.args)
        target = self.device if self.mode == "gpu" else torch.device("cpu")
        pixels = torch.empty((len(self.images), *shape), dtype=torch.uint8, device=target)
        online = self.view == "faces" and self._faces_online()
        if online:
            # Faces not on disk: decode the original ERPs in the workers, project on the device.
            from viewport.project import cube_faces

            source = ImageDataset(self.db, self.images, "erp_native")
            loader = torch.utils.data.DataLoader(source, batch_size=1, num_workers=self.args.workers,
                                                 collate_fn=_collate)
        else:
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=8, num_workers=self.args.workers,
                                                 collate_fn=_collate)
        desc = f"decode {self.view}" + (f" (cube faces on {self.device.type})" if online else "")
        bar = tqdm(total=len(self.images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
        with bar:
            for batch in loader:
                chunk = batch["pixels"]
                if online:
                    chunk = cube_faces(chunk.to(self.device), self.args.face_size, antialias=True)
                pixels[batch["index"].to(target)] = chunk.to(target)
                bar.update(len(batch["index"]))
        return pixels

    def _faces_online(self) -> bool:
        source = getattr(self.args, "faces", "auto")
        if source != "auto":
            return source == "online"
        return not all(p.is_file() for image in self.images for p in self.db.face_paths(image, self.args.face_size))

    def batches(self, images: Sequence[str], batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, shard: bool = False) -> Iterator[dict]:
        """Batches of `images` (shuffled by `generator`). With `shard` under torchrun, each global
        batch is split across the ranks (rank r takes rows r, r+N, ...); a rank whose share of a
        short last batch is empty gets a batch with no rows. Each batch records `n_global`."""
        rows = torch.tensor([self.row[x] for x in images], dtype=torch.long)
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        rank, world = (DIST.rank, DIST.world) if shard else (0, 1)
        global_batches = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
        local = [idx[rank::world] for idx in global_batches]
        if self.pixels is not None:
            for idx, whole in zip(local, global_batches):
                yield self._batch(idx, self.pixels[idx.to(self.pixels.device)], len(whole))
            return
        loader = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=[i.tolist() for i in local if len(i)],
                                                  num_workers=self.args.workers, collate_fn=_collate,
                                                  pin_memory=self.device.type == "cuda"))
        for idx, whole in zip(local, global_batches):
            if len(idx):
                batch = next(loader)
                yield self._batch(batch["index"], batch["pixels"], len(whole))
            else:
                yield self._batch(idx, torch.empty((0, *_pixel_shape(self.view, self.args)), dtype=torch.uint8),
                                  len(whole))

    def _batch(self, idx: torch.Tensor, pixels: torch.Tensor, n_global: int | None = None) -> dict:
        nb = self.device.type == "cuda"
        batch = {"pixels": pixels.to(self.device, non_blocking=nb), "mos": self.mos[idx].to(self.device),
                 "images": [self.images[i] for i in idx.tolist()], "rows": idx,
                 "n_global": len(idx) if n_global is None else n_global}
        if self.features is not None:
            batch["teacher_feature"] = self.features[idx.to(self.features.device)]
        return batch


def _collate(items: list[dict]) -> dict:
    return {"index": torch.tensor([it["index"] for it in items]),
            "pixels": torch.stack([it["pixels"] for it in items])}


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


# ----------------------------------------------------------------------------------------------
# Mixed precision.

def autocast_for(args: argparse.Namespace, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Evaluation.

@torch.no_grad()
def predict_scores(method: Method, store: ImageStore, images: Sequence[str], batch_size: int,
                   autocast: Callable, scale: TargetScale) -> np.ndarray:
    """Scores of `images` in their order; under torchrun each rank scores a share, then all gather."""
    for module in method.modules().values():
        module.eval()
    positions = torch.arange(len(images))[DIST.rank::DIST.world]
    mine = [images[i] for i in positions.tolist()]
    out = []
    for batch in store.batches(mine, batch_size):
        with autocast():
            out.append(method.predict(batch).float())
    values = torch.cat(out) if out else torch.zeros(0, device=store.device)
    values = DIST.gather_rows(values, positions.to(values.device))
    return scale.to_score(values.cpu().numpy().astype(np.float64))


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of a 1-based epoch: constant (the paper) or cosine decay towards 0."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    return 1.0


def train_one_epoch(method: Method, store: ImageStore, images: Sequence[str], optimizer: torch.optim.Optimizer,
                    grad_scaler: torch.amp.GradScaler, autocast: Callable, scale: TargetScale, batch_size: int,
                    epoch: int, generator: torch.Generator) -> dict[str, float]:
    """One pass over `images`: mean loss and the method's scalars. Losses stay on the device until the
    end of the epoch (no host sync per step); under torchrun the batch is split across the ranks."""
    for module in method.modules().values():
        module.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for batch in store.batches(images, batch_size, shuffle=True, generator=generator, shard=True):
        optimizer.zero_grad(set_to_none=True)
        n_local = len(batch["rows"])
        if n_local:
            batch["target"] = scale.to_target(batch["mos"])
            with autocast():
                loss, scalars = method.training_loss(batch, epoch)
            grad_scaler.scale(loss).backward()
            for name, value in {"train_loss": loss, **scalars}.items():
                value = torch.as_tensor(value, device=store.device).detach().float()
                sums[name] = sums[name] + value if name in sums else value
        DIST.average_gradients(params, n_local / batch["n_global"])
        grad_scaler.step(optimizer)
        grad_scaler.update()
        steps += 1
    DIST.broadcast_buffers(list(method.modules().values()))
    return {name: float(total) / max(1, steps) for name, total in sums.items()}


def score_split(pred: np.ndarray, mos: np.ndarray, db: Database, fit: str,
                train_higher_is_better: bool | None = None) -> dict:
    """Metrics on `db`'s scores; `train_higher_is_better` (cross-database) flips them when directions differ."""
    return metrics.evaluate(pred, mos, higher_is_better=db.higher_is_better, fit=fit,
                            train_higher_is_better=train_higher_is_better)


def train_direction(run: Run) -> bool | None:
    """The training database's score direction when the run is scored on another database, else None."""
    return run.db.higher_is_better if run.test_db is not None else None


def save_scatter(path: Path, pred: np.ndarray, mos: np.ndarray, result: dict, title: str, fit: str) -> None:
    """Prediction vs score with the fitted mapping (the curve PLCC/RMSE were computed after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    ax.scatter(pred, mos, s=10, alpha=0.7, edgecolors="none")
    if len(pred) and np.ptp(pred) > 0:
        xs = np.linspace(pred.min(), pred.max(), 200)
        fitted = metrics.fit_logistic(pred, mos, fit)
        ax.plot(xs, fitted.predict(xs), color="C3", lw=1.5, label=f"{fitted.kind} fit")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("subjective score")
    ax.set_title(f"{title}\nSRCC {result['srcc']:.3f}  PLCC {result['plcc']:.3f}  RMSE {result['rmse']:.3g}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# One run: its database, folds, run folder and writers.

@dataclass
class Run:
    script: str
    args: argparse.Namespace
    db: Database
    folds: FoldSet
    fold_ids: list[int]
    run_dir: Path
    device: torch.device
    progress: bool
    test_db: Database | None = None        # cross-database: scored on another database
    extra: dict = field(default_factory=dict)
    opened: bool = False

    def open(self) -> Path:
        """Create the run folder and write args.json, once: deferred until the data are decoded and
        every input is checked, so that a bad input leaves no half-made run behind."""
        if not self.opened and DIST.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_args(self.run_dir, self.args, self.script, self.extra)
        self.opened = True
        return self.run_dir

    @property
    def eval_db(self) -> Database:
        return self.test_db if self.test_db is not None else self.db

    def log(self, record: dict) -> None:
        if not DIST.is_main:
            return
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(jsonable(record)) + "\n")

    def trim_log(self, fold: int, start_epoch: int) -> None:
        """Drop fold `fold`'s records from `start_epoch` on (an interrupted run logged epochs after its
        last checkpoint): a resumed run's log.jsonl reads as if it had never stopped."""
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
                stale = record.get("fold") == fold and record.get("epoch", 0) >= start_epoch
            except (ValueError, AttributeError):  # a line torn by the kill
                stale = True
            if not stale:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))


def start_run(script: str, args: argparse.Namespace, *, db: Database | None = None, folds: FoldSet | None = None,
              test_db: Database | None = None, run_key: str | None = None) -> Run:
    """Validate the arguments, load the data, seed, and create (or reopen) the run folder."""
    from common import check_training_args

    check_training_args(args)
    device = DIST.init(args.device)
    if DIST.enabled and args.batch_size < DIST.world:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the {DIST.world} processes; each step's batch "
                        f"is split across them")
    if db is None:
        db = load_database(args.database, args.data_root)
    if folds is None:
        folds = resolve_folds(db, args.folds_file, seed=args.seed)
    if args.fold is not None and not 0 <= args.fold < len(folds):
        raise UserError(f"--fold {args.fold} is out of range: the fold file has folds 0..{len(folds) - 1}")
    fold_ids = [args.fold] if args.fold is not None else list(range(len(folds)))
    run_dir = make_run_dir(script, run_key or database_key(db), args.out, resume=args.resume, create=False)
    if args.resume:
        _check_resume_args(run_dir, args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    extra = {"database_name": db.name, "database_root": str(db.root), "folds_source": folds.source,
             "folds_path": str(folds.path) if folds.path else None, "device_used": str(device)}
    if test_db is not None:
        extra.update(test_database_name=test_db.name, test_database_root=str(test_db.root))
    progress = not args.no_progress and DIST.is_main
    if DIST.is_main:
        world = f", {DIST.world} processes" if DIST.enabled else ""
        print(f"{script}: {db.name} ({len(db)} images), {len(fold_ids)} fold(s), run folder {run_dir}{world}", flush=True)
        if args.select == "test":
            print(f"note: {TEST_SELECTION_NOTE}", flush=True)
    return Run(script, args, db, folds, fold_ids, run_dir, device, progress, test_db, extra)


_RESUME_CRITICAL = ("database", "arch", "epochs", "batch_size", "lr", "weight_decay", "seed", "select", "face_size",
                    "erp_size", "normalize", "target_scale", "kd", "folds_file", "lr_schedule")


def _check_resume_args(run_dir: Path, args: argparse.Namespace) -> None:
    try:
        saved = json.loads((run_dir / "args.json").read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{run_dir / 'args.json'}: unreadable ({err}); cannot check the run to resume") from None
    for key in _RESUME_CRITICAL:
        if key in saved and hasattr(args, key) and jsonable(getattr(args, key)) != saved[key]:
            raise UserError(f"{run_dir / 'args.json'}: --{key.replace('_', '-')} was {saved[key]!r} in this run, "
                            f"now {jsonable(getattr(args, key))!r}; resume with the same settings or start a new --out")


# ----------------------------------------------------------------------------------------------
# Training.

@dataclass
class FoldResult:
    fold: int
    epoch: int
    metrics: dict
    images: list[str]
    pred: np.ndarray
    mos: np.ndarray


def train_folds(run: Run, build_method: Callable[[int, FoldSplit], Method], *,
                features_for_fold: Callable[[int], dict[str, torch.Tensor]] | None = None) -> list[FoldResult]:
    """Train and evaluate every fold of the run; write per-fold and overall results."""
    args = run.args
    results = []
    store_cache: dict = {}
    for k in run.fold_ids:
        split = run.folds.folds[k]
        seed_everything(args.seed + k)
        method = build_method(k, split)
        view = method.view
        feats = features_for_fold(k) if features_for_fold is not None else None
        # One decoded cache serves every fold (features differ per fold, so they are swapped in).
        key = (view, id(run.db))
        if key not in store_cache:
            names = run.db.images
            store_cache[key] = ImageStore(run.db, names, view, args, run.device, progress=run.progress)
        store = store_cache[key]
        if feats is not None:
            store.set_features(feats)
        test_store = store
        if run.test_db is not None:
            tkey = (view, id(run.test_db))
            if tkey not in store_cache:
                store_cache[tkey] = ImageStore(run.test_db, run.test_db.images, view, args, run.device,
                                               progress=run.progress)
            test_store = store_cache[tkey]
        results.append(train_fold(run, k, split, method, store, test_store))
    if DIST.is_main:
        finish_run(run, results)
    DIST.barrier()
    return results


def train_fold(run: Run, k: int, split: FoldSplit, method: Method, store: ImageStore,
               test_store: ImageStore) -> FoldResult:
    from tqdm import tqdm

    args, device = run.args, run.device
    fold_dir = run.open() / f"fold{k}"
    if DIST.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    train_images, val_images = list(split.train), []
    if args.select == "val":
        train_images, val_images = holdout_validation(run.db, split.train, args.val_fraction, args.seed + k)
    scale = TargetScale.from_args(args, run.db)
    autocast = autocast_for(args, device)
    for module in method.modules().values():
        module.to(device)
        if device.type == "cuda":
            module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(method.param_groups(args), lr=args.lr, weight_decay=args.weight_decay)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda")
    ckpt_path = fold_dir / "checkpoint.pt"
    start_epoch, history, selected = 1, [], None
    if args.resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        _check_checkpoint_matches(ckpt, method, ckpt_path)
        try:
            for name, module in method.modules().items():
                module.load_state_dict(ckpt["modules"][name])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, history, selected = ckpt["epoch"] + 1, list(ckpt["history"]), ckpt.get("selected")
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise UserError(f"{ckpt_path}: cannot resume from this checkpoint ({type(err).__name__}: {first}); "
                            f"it belongs to another model or settings: start a new --out") from None
        if DIST.is_main:
            print(f"fold {k}: resumed at epoch {ckpt['epoch']} from {ckpt_path}", flush=True)
    else:
        mean_target = float(scale.to_target(torch.from_numpy(run.db.scores(train_images))).mean())
        method.init_output(mean_target)
    if DIST.is_main:
        run.trim_log(k, start_epoch)
    if args.compile and device.type == "cuda":
        method.runner = torch.compile(method.model)  # state dicts keep coming from the eager module

    writer = _summary_writer(fold_dir) if DIST.is_main else None
    test_mos = run.eval_db.scores(split.test if run.test_db is None else run.test_db.images)
    test_images = list(split.test) if run.test_db is None else run.test_db.images
    val_mos = run.db.scores(val_images) if val_images else None
    epoch_bar = tqdm(range(start_epoch, args.epochs + 1), desc=f"fold {k}", unit="epoch", disable=not run.progress,
                     dynamic_ncols=True, initial=start_epoch - 1, total=args.epochs)
    last_eval = None
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        factor = lr_factor(args.lr_schedule, epoch, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        scalars = train_one_epoch(method, store, train_images, optimizer, grad_scaler, autocast, scale,
                                  args.batch_size, epoch, _epoch_generator(args.seed, k, epoch))
        if not all(math.isfinite(x) for x in scalars.values()):
            raise UserError(f"fold {k} epoch {epoch}: the training loss is not finite; lower --lr or use --amp none")
        record = {"fold": k, "epoch": epoch, **scalars, **method.epoch_scalars(), "lr": args.lr * factor,
                  "epoch_seconds": time.perf_counter() - t0}
        is_last = epoch == args.epochs
        if is_last or epoch % args.eval_every == 0 or args.select != "last":
            pred = predict_scores(method, test_store, test_images, args.batch_size * 2, autocast, scale)
            test_result = score_split(pred, test_mos, run.eval_db, args.fit, train_direction(run))
            record.update({f"test_{m}": test_result[m] for m in ("srcc", "krcc", "plcc", "rmse")})
            last_eval = (epoch, test_result, pred)
            criterion = test_result["srcc"] + test_result["plcc"]  # the paper's selection criterion
            if val_images:
                vpred = predict_scores(method, store, val_images, args.batch_size * 2, autocast, scale)
                val_result = score_split(vpred, val_mos, run.db, args.fit)
                record.update({f"val_{m}": val_result[m] for m in ("srcc", "plcc")})
                criterion = val_result["srcc"] + val_result["plcc"]
            if args.select != "last" and (selected is None or criterion > selected["criterion"]):
                selected = {"epoch": epoch, "criterion": float(criterion),
                            "modules": {n: _cpu_state(m) for n, m in method.modules().items()}}
        history.append(record)
        run.log(record)
        if writer is not None:
            for name, value in record.items():
                if name not in ("fold", "epoch") and isinstance(value, (int, float)):
                    writer.add_scalar(name, value, epoch)
            writer.flush()
        epoch_bar.set_postfix(loss=f"{record['train_loss']:.4g}",
                              srcc=f"{record.get('test_srcc', float('nan')):.3f}")
        if DIST.is_main and (is_last or epoch % max(1, args.save_every) == 0):
            _save_checkpoint(ckpt_path, method, optimizer, epoch, history, selected, run)
    epoch_bar.close()
    if writer is not None:
        writer.close()

    # The reported model: the last epoch, or the selected one.
    if args.select != "last" and selected is not None:
        for name, module in method.modules().items():
            module.load_state_dict(selected["modules"][name])
        sel_epoch = selected["epoch"]
    else:
        sel_epoch = args.epochs
    if last_eval is not None and last_eval[0] == sel_epoch:
        _, result, pred = last_eval
    else:
        pred = predict_scores(method, test_store, test_images, args.batch_size * 2, autocast, scale)
        result = score_split(pred, test_mos, run.eval_db, args.fit, train_direction(run))
    fold_result = FoldResult(k, sel_epoch, result, test_images, pred, test_mos)
    if DIST.is_main:
        _write_fold_outputs(run, fold_dir, fold_result)
    DIST.barrier()  # every rank starts the next fold with rank 0's files written
    return fold_result


def _cpu_state(module: nn.Module) -> dict:
    return {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}


def _save_checkpoint(path: Path, method: Method, optimizer: torch.optim.Optimizer, epoch: int, history: list,
                     selected: dict | None, run: Run) -> None:
    ckpt = {
        "kind": method.kind,
        "model_config": method.config(),
        "model": _cpu_state(method.model) if selected is None or run.args.select == "last"
        else selected["modules"]["model"],
        "modules": {n: _cpu_state(m) for n, m in method.modules().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "epochs": run.args.epochs,
        "history": jsonable(history),
        "selected": selected,
        "selection": run.args.select,
        "args": jsonable(vars(run.args)),
        "database": {"name": run.db.name, "higher_is_better": run.db.higher_is_better,
                     "score_range": list(run.db.score_range), "score": run.db.describe_scores()},
        "target_scale": {"offset": TargetScale.from_args(run.args, run.db).offset,
                         "scale": TargetScale.from_args(run.args, run.db).scale},
    }
    atomic_torch_save(ckpt, path)


def _check_checkpoint_matches(ckpt: dict, method: Method, path: Path) -> None:
    if ckpt.get("model_config") != method.config():
        raise UserError(f"{path}: checkpoint of another model ({ckpt.get('model_config')}); "
                        f"resume with the same --arch and settings or start a new --out")


def _summary_writer(fold_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(fold_dir))


def _write_fold_outputs(run: Run, fold_dir: Path, res: FoldResult) -> None:
    fitted = metrics.fit_logistic(res.pred, res.mos, run.args.fit)
    frame = pd.DataFrame({"image": res.images, "mos": res.mos, "prediction": res.pred,
                          "fitted": fitted.predict(res.pred)})
    atomic_write_csv(fold_dir / "predictions.csv", frame)
    atomic_write_json(fold_dir / "metrics.json", {"fold": res.fold, "epoch": res.epoch,
                                                  "selection": SELECTION_NOTES[run.args.select],
                                                  **jsonable(res.metrics)})
    title = f"{run.script} {run.eval_db.name} fold {res.fold} (epoch {res.epoch})"
    save_scatter(fold_dir / "scatter.png", res.pred, res.mos, res.metrics, title, run.args.fit)


def finish_run(run: Run, results: list[FoldResult]) -> pd.DataFrame:
    """results.csv (a row per fold, then mean, std and median), predictions.csv, the printed table."""
    run.open()
    rows = [{"fold": r.fold, "epoch": r.epoch, **{m: r.metrics[m] for m in ("srcc", "krcc", "plcc", "rmse")},
             "n": r.metrics["n"], "fit": r.metrics.get("fit")} for r in results]
    summary = metrics.summarize(rows)
    table = pd.DataFrame(summary)
    for column in ("epoch", "n"):
        table[column] = table[column].astype("Int64")
    table["selection"] = SELECTION_NOTES[run.args.select]
    flipped = any(r.metrics.get("sign_flipped") for r in results)
    if run.test_db is not None:
        table["sign_flipped"] = flipped
    atomic_write_csv(run.run_dir / "results.csv", table)
    preds = pd.concat([pd.DataFrame({"fold": r.fold, "image": r.images, "mos": r.mos, "prediction": r.pred})
                       for r in results], ignore_index=True)
    atomic_write_csv(run.run_dir / "predictions.csv", preds)
    heading = f"{run.script} on {run.eval_db.name}: {SELECTION_NOTES[run.args.select]}"
    if flipped:
        heading += f"; scores of {run.eval_db.name} flipped (DMOS vs MOS)"
    elif not run.eval_db.higher_is_better:
        heading += (f"; {run.eval_db.name} scores are DMOS (higher is worse) and the model predicts them, "
                    f"so a good model correlates positively")
    print("\n" + heading)
    print(metrics.format_results_table(summary))
    print(f"results: {run.run_dir / 'results.csv'}", flush=True)
    return table


def load_run_checkpoint(run_dir: Path, fold: int) -> tuple[dict, Path]:
    path = Path(run_dir) / f"fold{fold}" / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint for fold {fold}; train it first (or check --run)")
    return load_checkpoint(path), path


def model_from_checkpoint(ckpt: dict, path: Path) -> nn.Module:
    """The checkpoint's model with its weights; a foreign architecture or layout is one line naming the file."""
    from models import model_from_config

    try:
        model = model_from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    except (RuntimeError, TypeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: its weights do not fit its model_config {ckpt.get('model_config')} ({first})") from None
    return model


def copy_args(args: argparse.Namespace, **changes) -> argparse.Namespace:
    new = copy.copy(args)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


@torch.no_grad()
def infer(model: nn.Module, store: ImageStore, images: Sequence[str], batch_size: int,
          autocast: Callable, *, progress: bool = True, desc: str = "infer") -> tuple[np.ndarray, torch.Tensor]:
    """Raw model outputs (score in target units, feature) of every image, in the given order."""
    from tqdm import tqdm

    model.eval()
    scores, feats = [], []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in store.batches(images, batch_size):
            with autocast():
                score, feat = model(batch["pixels"])
            scores.append(score.float().cpu())
            feats.append(feat.float().cpu())
            bar.update(len(batch["images"]))
    return torch.cat(scores).numpy().astype(np.float64), torch.cat(feats)
