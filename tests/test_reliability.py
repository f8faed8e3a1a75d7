"""Reliability: kill-and-resume, atomic writes, bad input everywhere, safe loading, determinism."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import common
import teacher_train
from conftest import make_tiny_db
from dataset import load_database, make_folds, write_folds

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "32", "--erp-size", "64x32",
        "--batch-size", "4", "--deterministic"]


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def rdb(tmp_path_factory) -> dict:
    """A private tiny database (tests here corrupt copies of it) with a 2-fold file."""
    root = make_tiny_db(tmp_path_factory.mktemp("reliab") / "Tiny")
    folds = write_folds(make_folds(load_database(root), k=2, seed=1), root / "folds" / "k2_seed1.json")
    return {"db": root, "folds": folds}


def _tensors_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------------------------
# 1. Kill and resume gives the bit-identical run.

def _kill_after_first_checkpoint(cmd: list[str], ckpt: Path, timeout: float = 120) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ckpt.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint appeared in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # mid-epoch 3: the next checkpoint (epoch 4) is two epochs away
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def test_kill_and_resume_is_bit_identical(rdb, tmp_path):
    base = ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--fold", "0", "--epochs", "4",
            *FAST, "--erp-size", "64x32"]
    straight = tmp_path / "straight"
    teacher_train.main([*base, "--out", str(straight)])

    resumed = tmp_path / "resumed"
    ckpt_path = resumed / "fold0" / "checkpoint.pt"
    # --save-every 2: the first checkpoint is epoch 2's; the process is killed while it trains epoch 3.
    _kill_after_first_checkpoint([sys.executable, "teacher_train.py", *base, "--save-every", "2", "--out",
                                  str(resumed)], ckpt_path)
    assert torch.load(ckpt_path, weights_only=True)["epoch"] == 2
    assert not (resumed / "results.csv").exists()
    # Without --resume the folder is refused; with it the run continues to epoch 4.
    proc = run_script("teacher_train.py", *base, "--out", str(resumed))
    assert_one_line_error(proc, "already holds a run", "--resume")
    teacher_train.main([*base, "--out", str(resumed), "--resume"])

    a = torch.load(straight / "fold0" / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt_path, weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    _tensors_equal(a["model"], b["model"], "model")
    _tensors_equal(a["modules"], b["modules"], "modules")
    _tensors_equal(a["optimizer"], b["optimizer"], "optimizer")
    strip = lambda hist: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in hist]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    ra, rb = pd.read_csv(straight / "results.csv"), pd.read_csv(resumed / "results.csv")
    metric_cols = ["srcc", "krcc", "plcc", "rmse"]
    np.testing.assert_allclose(ra.loc[0, metric_cols].astype(float), rb.loc[0, metric_cols].astype(float), atol=1e-6)
    pa, pb = pd.read_csv(straight / "predictions.csv"), pd.read_csv(resumed / "predictions.csv")
    assert pa["image"].tolist() == pb["image"].tolist()
    np.testing.assert_allclose(pa["prediction"], pb["prediction"], atol=1e-6)

    # Resuming a finished fold re-reports it without training.
    before = (resumed / "log.jsonl").read_text()
    teacher_train.main([*base, "--out", str(resumed), "--resume"])
    assert (resumed / "log.jsonl").read_text() == before
    rc = pd.read_csv(resumed / "results.csv")
    np.testing.assert_allclose(rc.loc[0, metric_cols].astype(float), rb.loc[0, metric_cols].astype(float), atol=1e-6)
    _tensors_equal(b["model"], torch.load(ckpt_path, weights_only=True)["model"], "model")


# ----------------------------------------------------------------------------------------------
# 2. Atomic writes: a process killed mid-write leaves the old file or the new one.

_WRITER = r"""
import sys, torch
sys.path.insert(0, {repo!r})
from common import atomic_torch_save
i = 0
print("ready", flush=True)
while True:
    i += 1
    atomic_torch_save({{"version": i, "blob": torch.full((3_000_000,), float(i))}}, {target!r})
"""


def test_killed_writer_never_tears_the_file(tmp_path):
    target = tmp_path / "out" / "checkpoint.pt"
    common.atomic_torch_save({"version": 0, "blob": torch.zeros(3_000_000)}, target)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(repo=str(REPO), target=str(target))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.6)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        record = torch.load(target, weights_only=True)  # never torn
        assert torch.equal(record["blob"], torch.full((3_000_000,), float(record["version"])))
        seen.add(record["version"])
    assert seen != {0}, "the writer never replaced the file"
    # Leftover temporaries are hidden (.checkpoint.*.tmp.pt) and never take an output's name.
    leftovers = [p.name for p in target.parent.iterdir() if p != target]
    assert all(name.startswith(".checkpoint.") and ".tmp" in name for name in leftovers), leftovers
    assert [p for p in target.parent.glob("*.pt") if not p.name.startswith(".")] == [target]


def test_atomic_outputs_keep_the_usual_mode(tmp_path):
    common.atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_writers_use_atomic_helpers():
    """Every writer of checkpoints, features, results, predictions, folds, meta.csv and args.json."""
    offenders = []
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("viewport/*.py")) + sorted(REPO.glob("models/*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "torch.save(" in code and "buffer" not in code and "tmp" not in code:
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
            if (".to_csv(" in code or ".write_text(" in code) and "tmp" not in code and "staging" not in code:
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not offenders, offenders


def test_disk_full_is_one_line(rdb, tmp_path, monkeypatch, capsys):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "k2.json"))

    import dataset

    monkeypatch.setattr(dataset, "atomic_write_json", full)
    with pytest.raises(SystemExit) as exc:
        common.run_cli(lambda: dataset.main(["folds", "--database", str(rdb["db"]), "--k", "2",
                                             "--out", str(tmp_path / "out" / "k2.json")]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "k2.json" in err[0]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder_is_one_line(rdb, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        proc = run_script("dataset.py", "folds", "--database", str(rdb["db"]), "--k", "2", "--out", str(out / "f.json"))
        assert_one_line_error(proc, "Permission denied")
    finally:
        out.chmod(0o700)
