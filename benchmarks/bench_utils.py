"""Timing helpers shared by the benchmark scripts (not a test module)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fns: dict[str, Callable[[], Any]], repeat: int, sync: Callable[[], None] = lambda: None,
          warmup: int = 2) -> dict[str, float]:
    """Median and fastest wall time (ms) of each function over `repeat` rounds, after warm-ups.

    The functions run in turn within each round, so load from other processes hits all alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    out: dict[str, float] = {}
    for name, ts in times.items():
        out[f"{name}_ms"] = 1e3 * statistics.median(ts)
        out[f"{name}_min_ms"] = 1e3 * min(ts)
    return out


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        try:
            info["load_avg_1min"] = os.getloadavg()[0]
        except OSError:
            pass
    return info


def report(name: str, result: dict[str, Any], summary: str) -> None:
    """Print the JSON and the one-line summary; when OUT is set, also append them at once, as one line, to
    $OUT/results.jsonl (and the summary to $OUT/summary.txt): a later step that is killed loses only itself."""
    text = json.dumps(result, indent=2, default=float)
    print(text)
    print(f"SUMMARY {name}: {summary}", flush=True)
    append_record({"name": name, "status": "ok", "summary": summary, "result": result})


def append_record(record: dict[str, Any]) -> None:
    """One line of $OUT/results.jsonl (and the summary line of $OUT/summary.txt), written and flushed now."""
    out = os.environ.get("OUT")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "results.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")
    with open(Path(out) / "summary.txt", "a", encoding="utf-8") as handle:
        handle.write(f"{record['name']}: {record.get('status', 'ok')}: {record.get('summary', '')}\n")
