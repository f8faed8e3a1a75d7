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
from conftest import kill_after_first, make_tiny_db

import teacher_train
from kdoiqa import checkpoints, common
from kdoiqa.databases import database_key, load_database
from kdoiqa.folds import make_folds, write_folds

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "32", "--erp-size", "64x32",
        "--batch-size", "4", "--deterministic"]


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
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

def test_kill_and_resume_is_bit_identical(rdb, tmp_path, capsys):
    base = ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--fold", "0", "--epochs", "4",
            *FAST, "--erp-size", "64x32"]
    straight = tmp_path / "straight"
    teacher_train.main([*base, "--save-every", "4", "--out", str(straight)])  # (fewer 200 MB writes)

    resumed = tmp_path / "resumed"
    ckpt_path = resumed / "fold0" / "checkpoint.pt"
    state_path = resumed / "fold0" / "resume.pt"
    # --save-every 2: the first resumable state is epoch 2's; the process is killed while it trains epoch 3.
    kill_after_first([sys.executable, "teacher_train.py", *base, "--save-every", "2", "--out",
                                  str(resumed)], state_path)
    state = torch.load(state_path, weights_only=True)
    assert state["epoch"] == 2 and {"optimizer", "grad_scaler", "modules"} <= set(state)
    assert not (resumed / "results.csv").exists() and not ckpt_path.exists()
    # Without --resume the folder is refused; with it the run continues to epoch 4.
    err = cli(capsys, teacher_train.main, [*base, "--out", str(resumed)])
    assert "already holds a run" in err and "--resume" in err
    teacher_train.main([*base, "--save-every", "4", "--out", str(resumed), "--resume"])

    a = torch.load(straight / "fold0" / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt_path, weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and not state_path.exists()
    _tensors_equal(a["model"], b["model"], "model")
    strip = lambda hist: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in hist]
    assert strip(a["history"]) == strip(b["history"])
    assert (straight / "fold0" / "checkpoint.pt").read_bytes() == ckpt_path.read_bytes()
    # Epochs logged after the last checkpoint by the killed process are not repeated.
    logs = [strip(json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()) for d in (straight, resumed)]
    assert logs[0] == logs[1] and [r["epoch"] for r in logs[1]] == [1, 2, 3, 4]
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


def test_ctrl_c_saves_the_epoch_and_resumes_bit_identical(rdb, tmp_path):
    """The resumable state is written by time (none within the default 5 minutes here) and on Ctrl-C, after
    the epoch in progress: exit 130, the state of that epoch, and a resumed run identical to a straight one."""
    base = ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--fold", "0", "--epochs", "5", *FAST]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    teacher_train.main([*base, "--out", str(straight)])
    assert not (straight / "fold0" / "resume.pt").exists()
    proc = subprocess.Popen([sys.executable, "teacher_train.py", *base, "--out", str(stopped)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = stopped / "fold0" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not (stopped / "fold0" / "resume.pt").exists()  # nothing written by time so far
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    saved = torch.load(stopped / "fold0" / "resume.pt", weights_only=True)
    logged = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert saved["epoch"] == logged[-1] >= 1 and saved["epoch"] < 5
    teacher_train.main([*base, "--out", str(stopped), "--resume"])
    assert (straight / "fold0" / "checkpoint.pt").read_bytes() == (stopped / "fold0" / "checkpoint.pt").read_bytes()


def test_save_minutes_zero_writes_after_every_epoch(rdb, tmp_path, monkeypatch):
    from kdoiqa import training

    written = []
    real = training._save_resume_state
    monkeypatch.setattr(training, "_save_resume_state", lambda run, k, state, epoch: (written.append(epoch),
                                                                                       real(run, k, state, epoch)))
    base = ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--fold", "0", "--epochs", "3", *FAST]
    teacher_train.main([*base, "--save-minutes", "0", "--out", str(tmp_path / "every")])
    assert written == [1, 2]  # the last epoch writes checkpoint.pt instead
    written.clear()
    teacher_train.main([*base, "--save-every", "2", "--out", str(tmp_path / "second")])
    assert written == [2]
    written.clear()
    teacher_train.main([*base, "--out", str(tmp_path / "default")])
    assert written == []  # 5 minutes by default


_INTERRUPTED_WRITER = r"""
import os, signal, sys, threading, torch
sys.path.insert(0, {repo!r})
from kdoiqa.common import atomic_torch_save, interrupt_hint, run_cli
real_save = torch.save
def slow_save(obj, handle, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while torch's zip writer is writing
    return real_save(obj, handle, *args, **kwargs)
torch.save = slow_save
def main():
    with interrupt_hint("python teacher_train.py --resume --out RUN"):
        atomic_torch_save({{"blob": torch.zeros(2_000_000)}}, {target!r})
run_cli(main)
"""


def test_ctrl_c_during_a_checkpoint_write(tmp_path):
    target = tmp_path / "resume.pt"
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_WRITER.format(repo=str(REPO), target=str(target))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted; continue it with: python teacher_train.py --resume --out RUN"
    assert torch.load(target, weights_only=True)["blob"].shape == (2_000_000,)  # the write completed first
    assert [p.name for p in tmp_path.iterdir()] == ["resume.pt"]  # no temporary left behind


# ----------------------------------------------------------------------------------------------
# 2. Atomic writes: a process killed mid-write leaves the old file or the new one.

_WRITER = r"""
import sys, torch
sys.path.insert(0, {repo!r})
from kdoiqa.common import atomic_torch_save
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
    from kdoiqa import folds

    monkeypatch.setattr(folds, "atomic_write_json", full)
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


# ----------------------------------------------------------------------------------------------
# 3. Bad input, everywhere: one line naming the file and the problem, exit code 2, nothing written.

def cli(capsys, main, argv: list[str]) -> str:
    """Run a script's main in-process through run_cli; return its one error line (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        common.run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _copy_db(rdb, tmp_path: Path, name: str = "Copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(rdb["db"], dst)
    return dst


GOOD_META = None  # filled lazily from the fixture's meta.csv


def _meta_lines(rdb) -> list[str]:
    return (rdb["db"] / "meta.csv").read_text().splitlines()


BAD_META = {
    "missing column": (lambda L: [L[0].replace(",ref", ",content")] + L[1:], "missing column(s) ref"),
    "extra column": (lambda L: [L[0] + ",comment"] + [x + ",hi" for x in L[1:]], "unexpected column(s) 'comment'"),
    "ragged row": (lambda L: L[:2] + [L[2] + ",1,2,3"] + L[3:], "meta.csv"),
    "short row": (lambda L: L[:2] + [L[2].split(",")[0]] + L[3:], "row 3"),
    "absolute path": (lambda L: L[:2] + ["/etc/passwd.png" + L[2][L[2].index(","):]] + L[3:], "absolute image path"),
    "escaping path": (lambda L: L[:2] + ["images/../../x.png" + L[2][L[2].index(","):]] + L[3:], "leaves the database"),
    "nan score": (lambda L: L[:3] + [L[3].replace(L[3].split(",")[1], "nan")] + L[4:], "row 4: mos"),
    "text score": (lambda L: L[:3] + [L[3].replace(L[3].split(",")[1], "good")] + L[4:], "row 4: mos 'good'"),
    "duplicate": (lambda L: L + [L[1]], "duplicate image"),
    "empty file": (lambda L: [], "empty file"),
    "header only": (lambda L: L[:1], "no rows"),
    "binary": (lambda L: ["\x00\xff\xfe garbage"], "meta.csv"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_bad_meta_csv(rdb, tmp_path, capsys, case):
    import dataset

    root = _copy_db(rdb, tmp_path)
    edit, needle = BAD_META[case]
    lines = edit(_meta_lines(rdb))
    (root / "meta.csv").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8",
                                   errors="surrogateescape")
    err = cli(capsys, dataset.main, ["info", "--database", str(root)])
    assert "meta.csv" in err and needle in err, err
    out = tmp_path / "run"
    err = cli(capsys, teacher_train.main, ["--database", str(root), "--epochs", "1", "--out", str(out), *FAST])
    assert "meta.csv" in err and needle in err, err
    assert not out.exists()
    assert not (root / "folds" / "k5_seed2023.json").exists()


def test_meta_with_bom_and_quotes_works(rdb, tmp_path, capsys):
    import dataset

    root = _copy_db(rdb, tmp_path)
    lines = _meta_lines(rdb)
    quoted = [lines[0]] + [f'"{x.split(",")[0]}",' + ",".join(x.split(",")[1:]) for x in lines[1:]]
    (root / "meta.csv").write_bytes(("\ufeff" + "\n".join(quoted) + "\n").encode("utf-8"))
    dataset.main(["info", "--database", str(root)])
    assert "12 images of 4 contents" in capsys.readouterr().out
    db = load_database(root)
    assert db.images == load_database(rdb["db"]).images


def test_missing_and_truncated_images(rdb, tmp_path, capsys):
    import dataset

    root = _copy_db(rdb, tmp_path)
    (root / "images" / "c1_blur2.png").unlink()
    err = cli(capsys, dataset.main, ["info", "--database", str(root)])
    assert "meta.csv" in err and "missing" in err and "c1_blur2.png" in err
    out = tmp_path / "run"
    err = cli(capsys, teacher_train.main, ["--database", str(root), "--epochs", "1", "--out", str(out), *FAST])
    assert "c1_blur2.png" in err and not out.exists()

    root = _copy_db(rdb, tmp_path, "Trunc")
    data = (root / "images" / "c2_blur1.png").read_bytes()
    (root / "images" / "c2_blur1.png").write_bytes(data[: len(data) // 2])
    for argv_main, argv in ((teacher_train.main, ["--epochs", "1", "--faces", "online", *FAST]),):
        err = cli(capsys, argv_main, ["--database", str(root), "--folds-file", str(rdb["folds"]), "--out", str(out),
                                      *argv])
        assert "c2_blur1.png" in err and ("unreadable" in err or "truncated" in err), err
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_fold_file_of_another_database(rdb, tmp_path, capsys):
    other = make_tiny_db(tmp_path / "Other", contents=3, seed=5)
    (other / "images" / "c0_blur0.png").rename(other / "images" / "zz.png")
    meta = (other / "meta.csv").read_text().replace("c0_blur0.png", "zz.png")
    (other / "meta.csv").write_text(meta)
    out = tmp_path / "run"
    err = cli(capsys, teacher_train.main, ["--database", str(other), "--folds-file", str(rdb["folds"]),
                                           "--out", str(out), *FAST])
    assert "k2_seed1.json" in err and "another database" in err and not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"folds": [{"train": ["images/c0_blur0.png"], "test": ["images/c0_blur0.png"]}]}')
    err = cli(capsys, teacher_train.main, ["--database", str(rdb["db"]), "--folds-file", str(bad),
                                           "--out", str(out), *FAST])
    assert "bad.json" in err and "both in train and test" in err and not out.exists()


def test_fold_out_of_range_everywhere(rdb, teacher_run, tmp_path, capsys):
    import feat_save
    import mask_train

    out = tmp_path / "run"
    for main, argv in ((teacher_train.main, ["--fold", "2", "--out", str(out), *FAST]),
                       (teacher_train.main, ["--fold", "-1", "--out", str(out), *FAST]),
                       (mask_train.main, ["--kd", "none", "--fold", "5", "--out", str(out), *FAST]),
                       (mask_train.main, ["--kd", "mask", "--features", str(tmp_path / "f"), "--fold", "5",
                                          "--out", str(out), *FAST]),
                       (feat_save.main, ["--run", str(teacher_run), "--fold", "3", "--features-dir",
                                         str(tmp_path / "f"), "--workers", "0", "--no-progress"])):
        err = cli(capsys, main, ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), *argv]
                  if main is not feat_save.main else ["--database", str(rdb["db"]), *argv])
        # (mask KD without any feature file: the missing cache is reported first, also fine)
        assert ("--fold" in err and "out of range" in err) or "no teacher features" in err, err
        assert not out.exists() and not (tmp_path / "f").exists()


@pytest.fixture(scope="module")
def teacher_run(rdb, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    teacher_train.main(["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--fold", "0",
                        "--epochs", "1", "--out", str(run), *FAST])
    return run


def test_output_path_is_a_file(rdb, teacher_run, tmp_path, capsys):
    import feat_save
    import predict

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    err = cli(capsys, teacher_train.main, ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]),
                                           "--out", str(afile), *FAST])
    assert "afile" in err and "is a file" in err
    err = cli(capsys, feat_save.main, ["--database", str(rdb["db"]), "--run", str(teacher_run), "--features-dir",
                                       str(afile), "--workers", "0", "--no-progress"])
    assert "afile" in err and "is a file" in err
    assert afile.read_text() == "keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    image = rdb["db"] / "images" / "c0_blur0.png"
    err = cli(capsys, predict.main, [str(teacher_run / "fold0" / "checkpoint.pt"), str(image), "--csv", str(folder),
                                     "--no-progress", "--device", "cpu"])
    assert "folder" in err and "--csv" in err
    assert list(folder.iterdir()) == []
    capsys.readouterr()
    with pytest.raises(SystemExit):
        common.run_cli(lambda: predict.main([str(teacher_run / "fold0" / "checkpoint.pt"), str(image), "--csv",
                                             str(afile / "x.csv"), "--no-progress", "--device", "cpu"]))
    out, err = capsys.readouterr()
    assert out == "" and "afile" in err and len(err.strip().splitlines()) == 1  # refused before any scoring


def test_checkpoint_of_another_layout_or_arch(rdb, teacher_run, tmp_path, capsys):
    import predict

    ckpt = torch.load(teacher_run / "fold0" / "checkpoint.pt", weights_only=True)
    image = str(rdb["db"] / "images" / "c0_blur0.png")
    altered = dict(ckpt, model_config={**ckpt["model_config"], "face_layout": ["F", "L", "BA", "R", "T", "BO"]})
    path = tmp_path / "layout.pt"
    torch.save(altered, path)
    err = cli(capsys, predict.main, [str(path), image, "--no-progress", "--device", "cpu"])
    assert "layout.pt" in err and "face" in err
    altered = dict(ckpt, model_config={**ckpt["model_config"], "arch": "resnet34"})
    path = tmp_path / "arch.pt"
    torch.save(altered, path)
    err = cli(capsys, predict.main, [str(path), image, "--no-progress", "--device", "cpu"])
    assert "arch.pt" in err
    path = tmp_path / "torn.pt"
    path.write_bytes((teacher_run / "fold0" / "checkpoint.pt").read_bytes()[:5000])
    err = cli(capsys, predict.main, [str(path), image, "--no-progress", "--device", "cpu"])
    assert "torn.pt" in err and "not a readable checkpoint" in err


def test_resume_onto_a_run_of_another_arch(rdb, tmp_path, capsys):
    import mask_train

    run = tmp_path / "student"
    base = ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--kd", "none", "--fold", "0",
            "--epochs", "2", *FAST]
    (run / "fold0").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"script": "mask_train", "args": {"arch": "resnet34", "epochs": 2}}))
    err = cli(capsys, mask_train.main, [*base, "--arch", "resnet18", "--out", str(run), "--resume"])
    assert "args.json" in err and "--arch" in err and "resnet34" in err
    (run / "args.json").write_text("{not json")
    err = cli(capsys, mask_train.main, [*base, "--out", str(run), "--resume"])
    assert "args.json" in err
    assert sorted(p.name for p in run.rglob("*")) == ["args.json", "fold0"]


def test_features_of_another_database_or_fold(rdb, tmp_path, capsys):
    import dataclasses

    import mask_train
    from kdoiqa.teacher_features import save_features

    db = load_database(rdb["db"])
    folds = json.loads(rdb["folds"].read_text())["folds"]
    dummy = tmp_path / "teacher.pt"
    dummy.write_bytes(b"x")
    feats = tmp_path / "features"

    def write(fold_file: int, *, fold: int, database) -> None:
        save_features(feats / f"fold{fold_file}.pt", db=database, names=db.images, feats=torch.zeros(len(db), 512),
                      fold=fold, test_images=folds[fold]["test"], folds_sha256=None, face_size=32,
                      provenance={"kind": "teacher run", "teacher_checkpoint": dummy, "folds_path": str(rdb["folds"]),
                                  "teacher_checkpoint_sha256": common.sha256_file(dummy)},
                      rebuild="python feat_save.py ...")

    out = tmp_path / "run"
    base = ["--database", str(rdb["db"]), "--features", str(feats), "--fold", "0", "--epochs", "1",
            "--kd-warmup", "0", "--kd-feature-epochs", "0", "--out", str(out), *FAST]
    write(0, fold=1, database=db)
    err = cli(capsys, mask_train.main, base)
    assert "fold0.pt" in err and "fold 1" in err and "feat_save.py" in err and not out.exists()
    other = dataclasses.replace(db, name="Other", meta_sha256="0" * 64)
    write(0, fold=0, database=other)
    err = cli(capsys, mask_train.main, base)
    assert "fold0.pt" in err and f"'{database_key(other)}'" in err and "feat_save.py" in err and not out.exists()
    (feats / "fold0.pt").write_bytes(b"garbage")
    err = cli(capsys, mask_train.main, base)
    assert "fold0.pt" in err and not out.exists()


def test_subprocess_errors_are_one_line(rdb, tmp_path):
    """The same contract through real processes (exit code 2, one stderr line)."""
    root = _copy_db(rdb, tmp_path)
    (root / "meta.csv").write_text("image,mos\nimages/c0_blur0.png,1\n")
    assert_one_line_error(run_script("dataset.py", "info", "--database", str(root)), "meta.csv", "missing column")
    out = tmp_path / "run"
    assert_one_line_error(run_script("teacher_train.py", "--database", str(root), "--out", str(out), *FAST),
                          "meta.csv")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# 5. Safe loading: every torch.load is weights_only=True; every kind of file loads that way.

def test_every_torch_load_is_weights_only():
    offenders = []
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("viewport/*.py")) + sorted(REPO.glob("models/*.py")):
        text = path.read_text()
        start = 0
        while (i := text.find("torch.load(", start)) >= 0:
            call = text[i:text.find(")", i) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
            start = i + 1
    assert not offenders, offenders


def _plain(obj, where: str = "") -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, (str, int)), f"{where}: key {key!r}"
            _plain(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _plain(value, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)), f"{where}: {type(obj)}"


def test_each_kind_loads_weights_only(rdb, teacher_run, tmp_path):
    import feat_save
    import mask_train

    feats = tmp_path / "features"
    feat_save.main(["--database", str(rdb["db"]), "--run", str(teacher_run), "--features-dir", str(feats),
                    "--workers", "0", "--no-progress"])
    student = tmp_path / "student"
    mask_train.main(["--database", str(rdb["db"]), "--features", str(feats), "--fold", "0", "--epochs", "1",
                     "--kd-warmup", "0", "--kd-feature-epochs", "0", "--out", str(student), *FAST])
    files = {"teacher": teacher_run / "fold0" / "checkpoint.pt", "student": student / "fold0" / "checkpoint.pt",
             "features": feats / "fold0.pt"}
    for kind, path in files.items():
        record = torch.load(path, map_location="cpu", weights_only=True)
        _plain(record, kind)
        if kind == "features":
            assert record["feats"].shape == (12, 512) and record["face_layout"] == ["F", "R", "BA", "L", "T", "BO"]
        else:
            assert record["kind"] == kind and record["epoch"] == 1
            assert checkpoints.load_checkpoint(path)["model_config"]["kind"] == kind


# ----------------------------------------------------------------------------------------------
# 6. Determinism: the same seed gives the same folds and the same CPU results.

def test_same_seed_same_folds(rdb):
    db = load_database(rdb["db"])
    a, b, c = make_folds(db, 2, seed=5), make_folds(db, 2, seed=5), make_folds(db, 3, seed=6)
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()
    for fold in a.folds:  # content-disjoint and complete
        assert sorted(fold.train + fold.test) == sorted(db.images)
        assert not set(db.refs(fold.train)) & set(db.refs(fold.test))


def test_same_seed_same_results(rdb, tmp_path):
    import mask_train

    tables = []
    for name in ("a", "b"):
        out = tmp_path / name
        mask_train.main(["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--kd", "none",
                         "--fold", "1", "--epochs", "2", "--out", str(out), *FAST])
        tables.append(((out / "results.csv").read_text(), (out / "predictions.csv").read_text()))
    assert tables[0] == tables[1]


@pytest.mark.parametrize("argv", [
    ["teacher_train", "--database", "X", "--epochs", "abc"],
    ["mask_train", "--kd", "bogus"],
    ["img_resize", "--database", "X", "--erp-size", "0x5"],
    ["predict"],
    ["dataset", "folds"],
    ["make_synthetic_db", "--out", "x", "--contents", "0"],
])
def test_argparse_errors_are_one_line(argv, capsys):
    import importlib

    err = cli(capsys, importlib.import_module(argv[0]).main, argv[1:])
    assert "--help" in err


def test_argparse_error_one_line_in_a_process():
    assert_one_line_error(run_script("dataset.py", "folds", "--k", "x"), "dataset.py folds", "--k", "--help")


def test_pickled_objects_are_refused(tmp_path, capsys):
    import argparse

    import predict

    path = tmp_path / "pickled.pt"
    torch.save({"model": argparse.Namespace(a=1), "model_config": {}}, path)  # not weights-only loadable
    err = cli(capsys, predict.main, [str(path), str(tmp_path / "x.png")])
    assert "pickled.pt" in err and "weights_only" in err


def test_derived_image_scripts_refuse_a_truncated_image_before_writing(rdb, tmp_path, capsys):
    import img_resize

    root = _copy_db(rdb, tmp_path, "Trunc")
    data = (root / "images" / "c3_blur2.png").read_bytes()
    (root / "images" / "c3_blur2.png").write_bytes(data[: len(data) // 2])
    err = cli(capsys, img_resize.main, ["--database", str(root), "--erp-size", "64x32", "--no-progress"])
    assert "c3_blur2.png" in err and "unreadable" in err
    err = cli(capsys, img_resize.main, ["--faces", "--database", str(root), "--face-size", "16", "--device", "cpu",
                                        "--no-progress"])
    assert "c3_blur2.png" in err and "unreadable" in err
    assert sorted(p.name for p in root.iterdir()) == ["folds", "images", "meta.csv"]


def test_feat_save_refuses_a_broken_run_record(rdb, tmp_path, capsys):
    import feat_save

    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text("{torn")
    feats = tmp_path / "features"
    err = cli(capsys, feat_save.main, ["--database", str(rdb["db"]), "--run", str(run), "--features-dir", str(feats),
                                       "--workers", "0", "--no-progress"])
    assert "args.json" in err and not feats.exists()
    (run / "args.json").write_text(json.dumps({"script": "teacher_train", "database_name": "Tiny"}))
    err = cli(capsys, feat_save.main, ["--database", str(rdb["db"]), "--run", str(run), "--features-dir", str(feats),
                                       "--workers", "0", "--no-progress"])
    assert "args.json" in err and "settings" in err and not feats.exists()


def test_resume_from_a_foreign_checkpoint_is_one_line(rdb, teacher_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    ckpt_path = run / "fold0" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["model"]["head.bias"]  # weights of some other model, as an unfinished fold's state
    torch.save({"model_config": ckpt["model_config"], "modules": {"model": ckpt["model"]}, "optimizer": {},
                "epoch": 0, "history": []}, run / "fold0" / "resume.pt")
    ckpt_path.unlink()
    err = cli(capsys, teacher_train.main, ["--database", str(rdb["db"]), "--folds-file", str(rdb["folds"]), "--fold",
                                           "0", "--epochs", "1", "--out", str(run), "--resume", *FAST])
    assert "resume.pt" in err and "cannot resume" in err
