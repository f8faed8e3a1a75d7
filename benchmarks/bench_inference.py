"""Inference rate: ERP student vs cube-face teacher, against the raw backbone forward (not a test).

Side by side in one run, images per second at batch `--batch`:
  backbone   ResNet forward alone on [B, 3, H, W] ERP tensors already on the device (the ceiling);
  student    StudentNet on decoded uint8 ERP tensors on the device (normalisation included);
  teacher    cube-face extraction (antialiased, on the device) from `--source-size` uint8 ERPs + the
             six-face teacher;
  files      the student from PNG files on disk (decode + resize + forward; predict.py's path).
The target of issue 6: student >= 0.7 x backbone at 1024x512, batch 64, bf16 on a GPU.

    python benchmarks/bench_inference.py --device cuda --amp bf16 --batch 64
    python benchmarks/bench_inference.py --device cpu --amp none --batch 4 --erp-size 256x128 --quick
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_utils import machine, report, sync_for, timed
from PIL import Image

from kdoiqa.cli import size_type
from kdoiqa.models import build_model
from kdoiqa.viewport.project import cube_faces


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None, help="default bf16 on CUDA, none on CPU")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--erp-size", type=size_type("--erp-size"), default=(1024, 512))
    p.add_argument("--source-size", type=size_type("--source-size"), default=(2048, 1024), help="ERP the teacher's faces come from")
    p.add_argument("--face-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--files", type=int, default=16, help="PNG files decoded per call of the files measurement")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a CPU smoke run)")
    args = p.parse_args()
    device = torch.device(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    repeat = 2 if args.quick else args.repeat
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = (contextlib.nullcontext if amp == "none" else
                lambda: torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16))
    width, height = args.erp_size
    student = build_model("student", pretrained=False).to(device).eval().to(memory_format=torch.channels_last)
    teacher = build_model("teacher", pretrained=False).to(device).eval().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    erp_u8 = torch.randint(0, 256, (args.batch, 3, height, width), dtype=torch.uint8, generator=gen).to(device)
    erp_f = (erp_u8.float() / 255).contiguous(memory_format=torch.channels_last)
    sw, sh = args.source_size
    src_u8 = torch.randint(0, 256, (args.batch, 3, sh, sw), dtype=torch.uint8, generator=gen).to(device)

    tmp = Path(tempfile.mkdtemp(prefix="kdoiqa-bench-"))
    files = []
    for i in range(min(args.files, args.batch)):
        path = tmp / f"{i}.png"
        Image.fromarray(np.asarray(src_u8[i].permute(1, 2, 0).cpu())).save(path, compress_level=1)
        files.append(path)

    from kdoiqa.images import read_rgb, resize_rgb, to_chw

    @torch.no_grad()
    def backbone():
        with autocast():
            student.backbone(erp_f)

    @torch.no_grad()
    def student_tensor():
        with autocast():
            student(erp_u8)

    @torch.no_grad()
    def teacher_tensor():
        faces = cube_faces(src_u8, args.face_size, antialias=True)
        with autocast():
            teacher(faces)

    @torch.no_grad()
    def student_files():
        batch = torch.stack([to_chw(resize_rgb(read_rgb(f), (width, height))) for f in files])
        with autocast():
            student(batch.to(device))

    times = timed({"backbone": backbone, "student": student_tensor, "teacher": teacher_tensor,
                   "student_files": student_files}, repeat, sync_for(device), warmup=1 if args.quick else 3)
    rate = {name: args.batch / (times[f"{name}_ms"] / 1e3) for name in ("backbone", "student", "teacher")}
    rate["student_files"] = len(files) / (times["student_files_ms"] / 1e3)
    result = {"machine": machine(device), "amp": amp, "batch": args.batch, "erp_size": [width, height],
              "source_size": [sw, sh], "face_size": args.face_size, "files": len(files), "images_per_s": rate, "times": times,
              "student_over_backbone": rate["student"] / rate["backbone"],
              "student_over_teacher": rate["student"] / rate["teacher"]}
    report("inference", result,
           f"student {rate['student']:.1f} img/s = {result['student_over_backbone']:.2f} x backbone "
           f"({rate['backbone']:.1f}); teacher {rate['teacher']:.1f} img/s; from files {rate['student_files']:.1f} img/s "
           f"[{device}, {amp}, batch {args.batch}, {width}x{height}]")


if __name__ == "__main__":
    main()
