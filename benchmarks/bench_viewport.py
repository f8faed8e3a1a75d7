"""Benchmark `viewport.project` against py360convert (a script, not a test).

Measured side by side in one run, median of `--repeat` timed calls after a warm-up:
  (a) the six 256x256 cube faces of a 2048x1024 float32 ERP, ours (antialias=False, grid cached)
      vs `py360convert.e2p` looped over the faces;
  (b) twenty 90 degree 256x256 viewports with centres spread over the sphere, same comparison;
  (c) what antialias=True (ours: sampled at the paper's native face size, then resized) costs over (a);
  (d) with --device cuda: images/s for the six antialiased 256x256 faces of 4096x2048 uint8 ERPs
      already on the GPU, for several batch sizes;
  (e) the paper's geometry (`viewport.equi2cubic`, float64) against ours (antialias=False) for the six
      native-size 648x648 faces of a 2048x1024 uint8 ERP, on the device.
Prints one JSON object (timings in ms: median and fastest call; max abs differences in [0, 1]
units; the 1-minute load average, since other processes skew CPU timings) and a summary line.

    python benchmarks/bench_viewport.py --device cpu --threads 2 --repeat 10
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utils import machine, report, timed

from kdoiqa.viewport.equi2cubic import equi2cubic
from kdoiqa.viewport.project import FACE_CENTERS_DEG, cube_faces, extract, native_face_size


def sphere_centres(n: int) -> list[tuple[float, float]]:
    """`n` (lon, lat) centres spread evenly over the sphere (Fibonacci lattice)."""
    golden = math.pi * (3 - math.sqrt(5))
    out = []
    for i in range(n):
        z = 1 - 2 * (i + 0.5) / n
        lon = math.degrees((i * golden) % (2 * math.pi)) - 180.0
        out.append((lon, math.degrees(math.asin(z))))
    return out


def test_panorama(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A float32 [H, W, 3] panorama in [0, 1]: smooth spherical pattern plus fine texture."""
    rng = np.random.default_rng(seed)
    lon = (np.arange(w) + 0.5) / w * 2 * np.pi - np.pi
    lat = np.pi / 2 - (np.arange(h) + 0.5) / h * np.pi
    lo, la = np.meshgrid(lon, lat)
    x, y, z = np.cos(la) * np.sin(lo), np.sin(la), np.cos(la) * np.cos(lo)
    base = np.stack([0.5 + 0.4 * np.sin(3 * x + 2 * y), 0.5 + 0.4 * np.cos(4 * z - y),
                     0.5 + 0.4 * np.sin(5 * y * x + z)], -1)
    return np.clip(base + 0.1 * rng.standard_normal((h, w, 3)), 0, 1).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batches", default="1,8,32", help="(d) batch sizes on cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        import py360convert
    except ImportError:  # a test dependency: without it only the GPU throughput (d) is measured
        py360convert = None
    if py360convert is None and args.device != "cuda":
        print("error: the CPU comparison needs py360convert (pip install -r requirements-dev.txt)", file=sys.stderr)
        return 2

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    H, W, n = 1024, 2048, 256
    img = test_panorama(H, W)
    erp = torch.from_numpy(img).permute(2, 0, 1).contiguous().unsqueeze(0).to(device)
    result: dict[str, Any] = {"device": str(device), "threads": args.threads, "repeat": args.repeat,
                              "torch": torch.__version__,
                              "py360convert": py360convert.__version__ if py360convert else "not installed",
                              "erp": f"{W}x{H} float32", "size": n}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    def compare(ours: Callable[[], Any], ref: Callable[[], Any]) -> dict[str, float]:
        row = timed({"ours": ours, "py360convert": ref}, args.repeat, sync)
        row["speedup"] = row["py360convert_ms"] / row["ours_ms"]
        row["speedup_min"] = row["py360convert_min_ms"] / row["ours_min_ms"]
        if device.type == "cpu" and args.threads != 1:  # for scale: ours on one core
            torch.set_num_threads(1)
            one = timed({"ours_1thread": ours}, args.repeat)
            torch.set_num_threads(args.threads)
            row.update(one)
        return row

    if py360convert is not None:
        compare_with_py360convert(result, img, erp, n, compare, sync, args.repeat)
    d_cuda(result, device, n, args, sync)
    e_equi2cubic(result, img, device, args.repeat, sync)
    if hasattr(os, "getloadavg"):  # other processes on the machine skew CPU timings
        result["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
    result["machine"] = machine(device)
    parts = []
    if "a_six_faces" in result:
        a, b, c = result["a_six_faces"], result["b_twenty_viewports"], result["c_antialias"]
        parts.append(f"six faces {a['ours_ms']:.1f} ms vs py360convert {a['py360convert_ms']:.1f} ms "
                     f"({a['speedup']:.1f}x); twenty viewports {b['ours_ms']:.1f} vs {b['py360convert_ms']:.1f} ms "
                     f"({b['speedup']:.1f}x); antialias costs {c['cost_ratio']:.1f}x (max diff vs exact "
                     f"{c['max_abs_diff_vs_exact']:.1e}); max diff vs py360convert "
                     f"{max(a['max_abs_diff'], b['max_abs_diff']):.1e}")
    else:
        parts.append("py360convert not installed: no comparison")
    if "d_cuda_uint8_4096x2048_antialias" in result:
        best = max(r["images_per_s"] for r in result["d_cuda_uint8_4096x2048_antialias"]["batches"].values())
        parts.append(f"cuda {best:.0f} images/s (4096x2048 uint8, six antialiased 256 px faces each; target >= 2000)")
    e = result["e_equi2cubic_2048x1024_uint8"]
    parts.append(f"the paper's equi2cubic {e['equi2cubic_ms']:.0f} ms vs ours {e['ours_native_ms']:.0f} ms "
                 f"(six {e['native_size']} px faces)")
    report("viewport", result, f"{device.type} x{args.threads}: " + "; ".join(parts))
    return 0


def compare_with_py360convert(result: dict, img: np.ndarray, erp: torch.Tensor, n: int, compare: Callable,
                              sync: Callable, repeat: int) -> None:
    """(a)-(c): ours against py360convert on the same panorama."""
    import py360convert

    H, W = img.shape[:2]
    # (a) six faces.
    ours_a = cube_faces(erp, n, antialias=False)[0].permute(0, 2, 3, 1).cpu().numpy()
    ref_a = np.stack([py360convert.e2p(img, 90, lon, lat, (n, n)) for lon, lat in FACE_CENTERS_DEG])
    result["a_six_faces"] = compare(
        lambda: cube_faces(erp, n, antialias=False),
        lambda: [py360convert.e2p(img, 90, lon, lat, (n, n)) for lon, lat in FACE_CENTERS_DEG])
    result["a_six_faces"]["max_abs_diff"] = float(np.abs(ours_a - ref_a).max())

    # (b) twenty viewports (py360convert's own grid cache holds 8, so it rebuilds grids in a loop of 20).
    centres = sphere_centres(20)
    ours_b = extract(erp, centres, 90, n, antialias=False)[0].permute(0, 2, 3, 1).cpu().numpy()
    ref_b = np.stack([py360convert.e2p(img, 90, lon, lat, (n, n)) for lon, lat in centres])
    result["b_twenty_viewports"] = compare(
        lambda: extract(erp, centres, 90, n, antialias=False),
        lambda: [py360convert.e2p(img, 90, lon, lat, (n, n)) for lon, lat in centres])
    result["b_twenty_viewports"]["max_abs_diff"] = float(np.abs(ours_b - ref_b).max())

    # (c) antialias cost, and agreement with the exact pipeline (py360convert at the native size,
    # then torch's antialiased bilinear resize).
    n0 = native_face_size(W)
    row = timed({"antialias": lambda: cube_faces(erp, n, antialias=True),
                 "plain": lambda: cube_faces(erp, n, antialias=False)}, repeat, sync)
    ours_c = cube_faces(erp, n, antialias=True)[0].cpu()
    native = torch.from_numpy(np.stack([py360convert.e2p(img, 90, lon, lat, (n0, n0))
                                        for lon, lat in FACE_CENTERS_DEG])).permute(0, 3, 1, 2)
    ref_c = F.interpolate(native, size=(n, n), mode="bilinear", antialias=True, align_corners=False)
    diff_c = (ours_c - ref_c).abs()
    result["c_antialias"] = {"native_size": n0, **row, "cost_ratio": row["antialias_ms"] / row["plain_ms"],
                             "max_abs_diff_vs_exact": float(diff_c.max()),
                             "mean_abs_diff_vs_exact": float(diff_c.mean())}


def d_cuda(result: dict, device: torch.device, n: int, args: argparse.Namespace, sync: Callable) -> None:
    """(d) GPU throughput on decoded uint8 batches."""
    if device.type != "cuda":
        return
    big = torch.from_numpy((test_panorama(2048, 4096, seed=1) * 255).round().astype(np.uint8))
    big = big.permute(2, 0, 1).contiguous().to(device)
    rows = {}
    for bs in (int(v) for v in args.batches.split(",")):
        batch = big.unsqueeze(0).expand(bs, -1, -1, -1).contiguous()
        ms = timed({"batch": lambda b=batch: cube_faces(b, n, antialias=True)}, args.repeat, sync)["batch_ms"]
        rows[str(bs)] = {"ms_per_batch": ms, "images_per_s": 1e3 * bs / ms}
        del batch
    result["d_cuda_uint8_4096x2048_antialias"] = {"native_size": native_face_size(4096), "batches": rows}


def e_equi2cubic(result: dict, img: np.ndarray, device: torch.device, repeat: int, sync: Callable) -> None:
    """(e) the paper's cube faces (equi2cubic.m's geometry in float64) against ours, at the native size."""
    erp = torch.from_numpy((img * 255).round().astype(np.uint8)).permute(2, 0, 1).contiguous()[None].to(device)
    n0 = native_face_size(erp.shape[-1])
    row = timed({"equi2cubic": lambda: equi2cubic(erp), "ours_native": lambda: cube_faces(erp, n0, antialias=False)},
                repeat, sync)
    result["e_equi2cubic_2048x1024_uint8"] = {"native_size": n0, **row}


if __name__ == "__main__":
    sys.exit(main())
