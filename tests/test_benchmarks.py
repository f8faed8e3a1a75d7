"""benchmarks/run_gpu.sh cannot rot: its cheapest steps run here with --cpu, each leaves its line in
results.jsonl, CUDA-only steps say so, and its step limits fit the 6 minutes of a GPU run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_gpu.sh"


def test_gpu_step_limits_fit_six_minutes():
    limits = {m.group(1): (int(m.group(2)), int(m.group(3)))
              for m in re.finditer(r"^\s*run (\w+) (\d+) (\d+) ", SCRIPT.read_text(), re.M)}
    assert {"env", "prepare", "smoke", "compile", "viewport", "training", "end_to_end", "end_to_end_parallel"} <= set(limits)
    assert sum(gpu for gpu, _ in limits.values()) <= 360, limits


def test_run_gpu_cpu_records_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SCRATCH": str(tmp_path / "scratch"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--only", "env,end_to_end_parallel"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in records] == [("env", "ok"), ("end_to_end_parallel", "skipped: needs CUDA")]
    assert "torch" in (out / "run_gpu.log").read_text()
    assert (out / "summary.txt").read_text().splitlines()[-1].startswith("end_to_end_parallel: skipped: needs CUDA")


def test_run_gpu_records_a_failed_step(tmp_path):
    """A step that fails still leaves its line (with the log's tail), and the script's exit code says so."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SCRATCH": str(tmp_path / "scratch"), "PYTHON": "/bin/false"}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--only", "viewport"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["name"] == "viewport" and record["status"] == "failed (exit 1)" and "log_tail" in record
