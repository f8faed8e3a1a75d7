"""Training rate through the engine's data path vs the pure-compute rate (not a test).

For the teacher (six faces) and the student (ERP), images per second of
  engine   `engine.train_one_epoch` over the decoded uint8 pixel cache (`--cache gpu` on CUDA, cpu
           otherwise): shuffled index selection, transfer, normalisation, AMP, Adam: a real epoch;
  compute  the same method, loss and optimiser stepping over one batch already on the device.
The ratio engine/compute is the data-path efficiency (issue 6 target: >= 0.8). The cache is filled
with random pixels: decoding happens once per run and is not what this measures.

    python benchmarks/bench_training.py --device cuda                 # paper sizes, batch 6, bf16
    python benchmarks/bench_training.py --device cpu --images 12 --face-size 64 --erp-size 256x128
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from bench_utils import machine, report, sync_for

import engine
from common import parse_size
from dataset import Database
from mask_train import StudentMethod
from mask_train import build_parser as student_parser
from models import build_model
from teacher_train import TeacherMethod


def rates(method: engine.Method, store: engine.ImageStore, args: argparse.Namespace, device: torch.device,
          epochs: int) -> dict[str, float]:
    autocast = engine.autocast_for(args, device)
    for module in method.modules().values():
        module.to(device)
        if device.type == "cuda":
            module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(method.param_groups(args), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    scale = engine.TargetScale()
    images = store.images
    sync = sync_for(device)

    def engine_epochs(n: int) -> float:
        sync()
        start = time.perf_counter()
        for epoch in range(n):
            engine.train_one_epoch(method, store, images, optimizer, scaler, autocast, scale, args.batch_size,
                                   epoch + 20, torch.Generator().manual_seed(epoch))
        sync()
        return n * len(images) / (time.perf_counter() - start)

    fixed = next(store.batches(images[:args.batch_size], args.batch_size))
    fixed["target"] = scale.to_target(fixed["mos"])

    def compute_steps(n: int) -> float:
        for module in method.modules().values():
            module.train()
        sync()
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = method.training_loss(fixed, 20)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        float(total)
        sync()
        return n * args.batch_size / (time.perf_counter() - start)

    steps = epochs * -(-len(images) // args.batch_size)
    engine_epochs(1), compute_steps(3)  # warm-up (cuDNN autotuning, allocator)
    measured_compute = compute_steps(steps)
    measured_engine = engine_epochs(epochs)
    return {"engine_img_per_s": measured_engine, "compute_img_per_s": measured_compute,
            "efficiency": measured_engine / measured_compute}


def fake_store(view: str, n: int, args: argparse.Namespace, device: torch.device, features: bool) -> engine.ImageStore:
    meta = pd.DataFrame({"image": [f"img{i}.png" for i in range(n)], "mos": torch.rand(n).mul(100).tolist(),
                         "ref": [f"c{i % 8}" for i in range(n)]})
    db = Database(name="bench", root=None, meta=meta, higher_is_better=True, score_range=(0.0, 100.0))
    feats = {name: torch.randn(512) for name in meta["image"]} if features else None
    store = engine.ImageStore(db, db.images, view, argparse.Namespace(**{**vars(args), "cache": "none"}), device,
                              features=feats, progress=False)
    shape = engine._pixel_shape(view, args)
    on = device if device.type == "cuda" else torch.device("cpu")
    store.pixels = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, device=on)
    store.mode = "gpu" if device.type == "cuda" else "cpu"
    return store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=240, help="images per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--face-size", type=int, default=256)
    p.add_argument("--erp-size", type=parse_size, default=(1024, 512))
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto")
    opts = p.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args = student_parser().parse_args(["--database", "bench", "--amp", opts.amp, "--batch-size", str(opts.batch_size),
                                        "--face-size", str(opts.face_size), "--workers", "0", "--kd", "mask",
                                        "--erp-size", f"{opts.erp_size[0]}x{opts.erp_size[1]}"])
    result = {"machine": machine(device), "settings": {k: v for k, v in vars(opts).items()}}
    teacher = TeacherMethod(build_model("teacher", pretrained=False))
    result["teacher"] = rates(teacher, fake_store("faces", opts.images, args, device, False), args, device, opts.epochs)
    student = StudentMethod(build_model("student", pretrained=False), args)  # epoch 20: the mask-KD phase
    result["student_mask_kd"] = rates(student, fake_store("erp", opts.images, args, device, True), args, device,
                                      opts.epochs)
    t, s = result["teacher"], result["student_mask_kd"]
    report("training", result, f"teacher {t['engine_img_per_s']:.1f} img/s = {t['efficiency']:.2f} of compute; "
           f"student (mask KD) {s['engine_img_per_s']:.1f} img/s = {s['efficiency']:.2f} of compute "
           f"[{device}, batch {opts.batch_size}]")


if __name__ == "__main__":
    main()
