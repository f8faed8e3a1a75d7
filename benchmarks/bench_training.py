"""Training rate through the engine's data path vs the pure-compute rate (not a test).

For the teacher (six faces) and the student (ERP), images per second of
  engine   `engine.train_one_epoch` over the decoded uint8 pixel cache (`--cache gpu` on CUDA, cpu
           otherwise): shuffled index selection, transfer, normalisation, AMP, Adam: a real epoch;
  compute  the same method, loss and optimiser stepping over one batch already on the device.
The ratio engine/compute is the data-path efficiency (target: >= 0.8). The cache is filled
with random pixels: decoding happens once per run and is not what this measures.
Checkpoint cost: one write of the resumable state (model + Adam) is timed and sized, and with the
measured epoch time of an OIQA fold (256 training images, 100 epochs) gives the bytes written per
fold and the share of the fold's time spent saving, under the old rule (after every epoch) and the
current one (every --save-minutes, 5 by default).

    python benchmarks/bench_training.py --device cuda                 # paper sizes, batch 6, bf16
    python benchmarks/bench_training.py --device cpu --images 12 --face-size 64 --erp-size 256x128
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from bench_utils import machine, report, sync_for

from kdoiqa import engine
from kdoiqa.cli import size_type
from kdoiqa.databases import Database
from kdoiqa.image_store import ImageStore
from kdoiqa.methods import StudentMethod, TargetScale, TeacherMethod
from kdoiqa.models import build_model
from kdoiqa.settings import DataSettings, DistillSettings, OptimSettings, RunSettings


def rates(method, store: ImageStore, optim: OptimSettings, amp: str, device: torch.device,
          epochs: int) -> dict[str, float]:
    autocast = engine.autocast_for(amp, device)
    method.to(device)
    if device.type == "cuda":
        method.to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(method, optim)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    scale = TargetScale()
    images = store.images
    sync = sync_for(device)

    def engine_epochs(n: int) -> float:
        sync()
        start = time.perf_counter()
        for epoch in range(n):
            engine.train_one_epoch(method, method, store, images, optimizer, scaler, autocast, scale, optim.batch_size,
                                   epoch + 20, torch.Generator().manual_seed(epoch))
        sync()
        return n * len(images) / (time.perf_counter() - start)

    fixed = next(store.batches(images[:optim.batch_size], optim.batch_size))
    target = scale.to_target(fixed["mos"])

    def compute_steps(n: int) -> float:
        method.train()
        sync()
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = method(fixed["pixels"], target, fixed.get("teacher_feature"), epoch=20)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        float(total)
        sync()
        return n * optim.batch_size / (time.perf_counter() - start)

    steps = epochs * -(-len(images) // optim.batch_size)
    engine_epochs(1), compute_steps(3)  # warm-up (cuDNN autotuning, allocator)
    measured_compute = compute_steps(steps)
    measured_engine = engine_epochs(epochs)
    return {"engine_img_per_s": measured_engine, "compute_img_per_s": measured_compute,
            "efficiency": measured_engine / measured_compute, "saving": save_cost(method, optimizer, measured_engine)}


def save_cost(method, optimizer, img_per_s: float, fold_images: int = 256, epochs: int = 100) -> dict[str, float]:
    """Bytes and seconds of one resumable-state write (as training._save_resume_state writes it), and what
    they come to per fold of `epochs` epochs over `fold_images` images: after every epoch vs every
    --save-minutes."""
    from kdoiqa.checkpoints import cpu_state
    from kdoiqa.common import atomic_torch_save

    state = {"modules": {name: cpu_state(net) for name, net in method.nets().items()},
             "optimizer": optimizer.state_dict(), "epoch": 1, "history": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resume.pt"
        times = []
        for _ in range(3):
            start = time.perf_counter()
            atomic_torch_save(state, path)
            times.append(time.perf_counter() - start)
        size = path.stat().st_size
    write_s = sorted(times)[1]
    epoch_s = fold_images / img_per_s
    minutes = RunSettings().save_minutes
    every_epoch = {"writes": epochs - 1, "bytes": (epochs - 1) * size}
    every_epoch["share"] = every_epoch["writes"] * write_s / (epochs * epoch_s + every_epoch["writes"] * write_s)
    by_time = {"writes": min(epochs - 1, math.floor(epochs * epoch_s / (60 * minutes)))}
    by_time["bytes"] = by_time["writes"] * size
    by_time["share"] = by_time["writes"] * write_s / (epochs * epoch_s + by_time["writes"] * write_s)
    return {"state_bytes": size, "write_seconds": write_s, "epoch_seconds": epoch_s, "save_minutes": minutes,
            "every_epoch": every_epoch, "by_time": by_time}


def fake_store(view: str, n: int, data: DataSettings, device: torch.device, features: bool) -> ImageStore:
    """The pixel cache filled with random pixels (decoding happens once per run and is not measured here)."""
    meta = pd.DataFrame({"image": [f"img{i}.png" for i in range(n)], "mos": torch.rand(n).mul(100).tolist(),
                         "ref": [f"c{i % 8}" for i in range(n)]})
    db = Database(name="bench", root=None, meta=meta, higher_is_better=True, score_range=(0.0, 100.0))
    on = device if device.type == "cuda" else torch.device("cpu")
    shape = (6, 3, data.face_size, data.face_size) if view == "faces" else (3, data.erp_size[1], data.erp_size[0])
    store = ImageStore.from_pixels(db, view, data, device, torch.randint(0, 256, (n, *shape), dtype=torch.uint8, device=on))
    if features:
        store.set_features({name: torch.randn(512) for name in meta["image"]})
    return store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=240, help="images per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--face-size", type=int, default=256)
    p.add_argument("--erp-size", type=size_type("--erp-size"), default=(1024, 512))
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto")
    opts = p.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = DataSettings(face_size=opts.face_size, erp_size=tuple(opts.erp_size), workers=0)
    optim = OptimSettings(batch_size=opts.batch_size)
    result = {"machine": machine(device), "settings": {k: v for k, v in vars(opts).items()}}
    teacher = TeacherMethod(build_model("teacher", pretrained=False))
    result["teacher"] = rates(teacher, fake_store("faces", opts.images, data, device, False), optim, opts.amp, device,
                              opts.epochs)
    student = StudentMethod(build_model("student", pretrained=False), DistillSettings(kd="mask"))  # epoch 20: mask KD
    result["student_mask_kd"] = rates(student, fake_store("erp", opts.images, data, device, True), optim, opts.amp,
                                      device, opts.epochs)
    t, s = result["teacher"], result["student_mask_kd"]
    saves = "; ".join(
        f"{name} state {r['saving']['state_bytes'] / 2**20:.0f} MB in {r['saving']['write_seconds']:.2f} s, per fold "
        f"{r['saving']['every_epoch']['bytes'] / 2**30:.1f} GB = {100 * r['saving']['every_epoch']['share']:.0f}% of "
        f"its time after every epoch vs {r['saving']['by_time']['bytes'] / 2**30:.2f} GB = "
        f"{100 * r['saving']['by_time']['share']:.1f}% every {r['saving']['save_minutes']:g} min"
        for name, r in (("teacher", t), ("student", s)))
    report("training", result, f"teacher {t['engine_img_per_s']:.1f} img/s = {t['efficiency']:.2f} of compute; "
           f"student (mask KD) {s['engine_img_per_s']:.1f} img/s = {s['efficiency']:.2f} of compute; {saves} "
           f"[{device}, batch {opts.batch_size}]")


if __name__ == "__main__":
    main()
