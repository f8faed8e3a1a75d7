"""Every default and documented training flag runs, and does what it says: the learning-rate
schedule, --target-scale range, the head's initialisation, --select val, --eval-every, --amp bf16,
--cache none, --folds, resume of a mask-KD student, predict.py on a teacher."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import kill_after_first, make_tiny_db

import feat_save
import mask_train
import teacher_train
from kdoiqa import engine
from kdoiqa.common import UserError
from kdoiqa.databases import load_database
from kdoiqa.folds import load_folds, make_folds, write_folds

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--erp-size", "32x16",
        "--batch-size", "4"]


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> dict:
    root = make_tiny_db(tmp_path_factory.mktemp("flags") / "Tiny", contents=4, levels=3, seed=21)
    folds = write_folds(make_folds(load_database(root), k=2, seed=2), root / "folds" / "k2.json")
    return {"root": root, "folds": folds, "base": ["--database", str(root), "--folds-file", str(folds)]}


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_lr_schedules(db, tmp_path):
    for e, epochs in ((1, 100), (51, 100), (100, 100), (3, 4)):
        assert engine.lr_factor("cosine", e, epochs) == pytest.approx(0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)))
        assert engine.lr_factor("constant", e, epochs) == 1.0
    for schedule in ("cosine", "constant"):
        run = tmp_path / schedule
        teacher_train.main([*db["base"], "--fold", "0", "--epochs", "3", "--lr", "1e-3", "--lr-schedule", schedule,
                            "--out", str(run), *FAST])
        lrs = [r["lr"] for r in log_of(run)]
        factor = {"cosine": lambda e: 0.5 * (1 + math.cos(math.pi * (e - 1) / 3)), "constant": lambda e: 1.0}[schedule]
        assert lrs == pytest.approx([1e-3 * factor(e) for e in (1, 2, 3)])


def test_head_initialisation(db, tmp_path, monkeypatch):
    from kdoiqa.methods import Method, teacher_method
    from kdoiqa.settings import ModelSettings

    for mode in ("mean", "default"):
        torch.manual_seed(0)
        method = teacher_method(ModelSettings(pretrained=False, head_init=mode))
        default_bias = method.model.head.bias.item()
        method.init_head(42.0)
        assert method.model.head.bias.item() == (42.0 if mode == "mean" else default_bias)
        assert abs(default_bias) <= 1 / math.sqrt(512)  # PyTorch's Linear initialisation bound
    seen = []
    real = Method.init_head
    monkeypatch.setattr(Method, "init_head", lambda self, value: (seen.append(value), real(self, value))[1])
    teacher_train.main([*db["base"], "--fold", "1", "--epochs", "1", "--out", str(tmp_path / "run"), *FAST])
    train = json.loads(db["folds"].read_text())["folds"][1]["train"]
    assert seen == [pytest.approx(float(load_database(db["root"]).scores(train).mean()))]  # the fold's training mean


def test_target_scale_range_end_to_end(db, tmp_path):
    run = tmp_path / "range"
    teacher_train.main([*db["base"], "--fold", "0", "--epochs", "2", "--target-scale", "range", "--out", str(run),
                        *FAST])
    base = load_database(db["root"])
    lo, hi = base.score_range
    ckpt = torch.load(run / "fold0" / "checkpoint.pt", weights_only=True)
    assert ckpt["target_scale"] == {"offset": lo, "scale": hi - lo}
    preds = pd.read_csv(run / "fold0" / "predictions.csv")
    assert preds["prediction"].between(lo - (hi - lo), hi + (hi - lo)).all()  # in score units, not [0, 1]
    files = [str(db["root"] / x) for x in preds["image"]]
    proc = subprocess.run([sys.executable, "predict.py", str(run / "fold0" / "checkpoint.pt"), *files, "--no-progress",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True, env={**os.environ,
                                                                                             "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    scores = [float(line.split("\t")[1]) for line in proc.stdout.strip().splitlines()[1:]]
    np.testing.assert_allclose(scores, preds["prediction"], atol=1e-3)  # predict.py maps back with the same scale


def test_select_val_reports_the_best_validation_epoch(db, tmp_path):
    run = tmp_path / "val"
    teacher_train.main([*db["base"], "--fold", "0", "--epochs", "4", "--select", "val", "--val-fraction", "0.5",
                        "--lr", "3e-3", "--out", str(run), *FAST])
    log = log_of(run)
    best = max(log, key=lambda r: (r["val_srcc"] + r["val_plcc"], -r["epoch"]))  # the first best, as the engine
    table = pd.read_csv(run / "results.csv")
    assert int(table.loc[0, "epoch"]) == best["epoch"]
    assert float(table.loc[0, "srcc"]) == pytest.approx(best["test_srcc"])
    assert (table["selection"] == "epoch selected on a validation split of the training contents").all()


def test_eval_every(db, tmp_path):
    run = tmp_path / "every"
    teacher_train.main([*db["base"], "--fold", "0", "--epochs", "5", "--eval-every", "2", "--out", str(run), *FAST])
    assert [r["epoch"] for r in log_of(run) if "test_srcc" in r] == [2, 4, 5]  # and always the last


def test_amp_bf16_on_cpu(db, tmp_path):
    runs = {}
    for amp in ("none", "bf16"):
        run = tmp_path / amp
        # 32-pixel faces: at 16, ResNet's last stage sees a map one pixel wide, refused under CPU bf16 (below).
        teacher_train.main([*db["base"], "--fold", "0", "--epochs", "1", "--amp", amp, "--out", str(run), *FAST,
                            "--face-size", "32"])
        runs[amp] = pd.read_csv(run / "fold0" / "predictions.csv")["prediction"].to_numpy()
        assert json.loads((run / "args.json").read_text())["settings"]["runtime"]["amp"] == amp
    bf16 = torch.tensor(runs["bf16"])
    assert not np.array_equal(runs["bf16"], runs["none"])  # the trunk ran in bfloat16: autocast ran
    assert not torch.equal(bf16.to(torch.bfloat16).double(), bf16)  # but the head's scores are fp32, not bf16 steps
    assert np.abs(runs["bf16"] - runs["none"]).max() < 2.0  # the same model, to bfloat16's resolution


def test_cpu_bf16_refuses_inputs_whose_last_stage_is_one_pixel_wide(db, tmp_path):
    """PyTorch's CPU bfloat16 convolution computes wrong weight gradients (often inf or nan) for a 3x3 stride-2
    convolution over a map one pixel wide: a teacher on 16-pixel faces trained in bf16 on CPU went non-finite
    on some runs and silently wrong on the others. Refused before any work, naming the way out."""
    with pytest.raises(UserError, match=r"--amp bf16 on CPU with --face-size 16: .*use --amp none or inputs of at "
                                        r"least 17 pixels"):
        teacher_train.main([*db["base"], "--fold", "0", "--epochs", "1", "--amp", "bf16", "--out",
                            str(tmp_path / "t"), *FAST])
    assert not (tmp_path / "t").exists()
    with pytest.raises(UserError, match=r"--amp bf16 on CPU with --erp-size 16x8"):
        mask_train.main([*db["base"], "--kd", "none", "--fold", "0", "--epochs", "1", "--amp", "bf16",
                         "--out", str(tmp_path / "s"), *FAST, "--erp-size", "16x8"])


def test_cpu_bf16_weight_gradient_is_right_at_the_smallest_accepted_input():
    """The boundary of that refusal, against float64: a 17-pixel input reaches ResNet's last stage 2 pixels wide,
    where the CPU bf16 weight gradient of its 3x3 stride-2 convolution is right (1 pixel wide it is wrong on
    most draws with torch 2.14; the refusal's message says so)."""
    torch.manual_seed(0)
    for _ in range(8):
        conv = torch.nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False)
        x = torch.randn(12, 64, 2, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x).float().square().sum().backward()
        weight = conv.weight.detach().double().requires_grad_()
        torch.nn.functional.conv2d(x.double(), weight, stride=2, padding=1).square().sum().backward()
        got = conv.weight.grad.double()
        assert torch.isfinite(got).all() and (got - weight.grad).abs().max() <= 0.05 * weight.grad.abs().max()


def test_cache_none_equals_the_cache(db, tmp_path):
    out = {}
    for cache in ("cpu", "none"):
        run = tmp_path / cache
        mask_train.main([*db["base"], "--kd", "none", "--fold", "1", "--epochs", "2", "--cache", cache,
                         "--out", str(run), *FAST])
        out[cache] = ((run / "fold1" / "predictions.csv").read_bytes(), (run / "results.csv").read_bytes())
    assert out["cpu"] == out["none"]


def test_folds_flag_makes_the_default_split(tmp_path, capsys):
    """A 4-content database trains with --folds 2 and no fold file; the split is made once and reused."""
    root = make_tiny_db(tmp_path / "Four", contents=4, levels=2, seed=9)
    teacher_train.main(["--database", str(root), "--folds", "2", "--epochs", "1", "--out", str(tmp_path / "a"), *FAST])
    split = root / "folds" / "k2_seed2023.json"
    assert split.is_file() and len(load_folds(split, load_database(root))) == 2
    stamp = split.stat().st_mtime_ns
    teacher_train.main(["--database", str(root), "--folds", "2", "--epochs", "1", "--seed", "7",
                        "--out", str(tmp_path / "b"), *FAST])
    assert split.stat().st_mtime_ns == stamp  # another training seed: the same split
    records = [json.loads((tmp_path / r / "args.json").read_text())["folds"] for r in ("a", "b")]
    assert records[0] == records[1]


@pytest.fixture(scope="module")
def teacher(db, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("teacher")
    teacher_train.main([*db["base"], "--epochs", "1", "--out", str(work / "teacher"), *FAST])
    feat_save.main(["--database", str(db["root"]), "--run", str(work / "teacher"), "--features-dir",
                    str(work / "features"), "--workers", "0", "--no-progress"])
    return {"run": work / "teacher", "features": work / "features"}


def test_mask_student_kill_and_resume_is_bit_identical(db, teacher, tmp_path):
    base = [*db["base"], "--features-dir", str(teacher["features"]), "--fold", "0", "--epochs", "5", "--kd-warmup", "1",
            "--kd-feature-epochs", "1", "--deterministic", *FAST]
    straight = tmp_path / "straight"
    mask_train.main([*base, "--out", str(straight)])
    resumed = tmp_path / "resumed"
    # Killed during epoch 4 (the mask phase), after the state of epoch 3 (policy and Adam included) was saved.
    state = resumed / "fold0" / "resume.pt"
    kill_after_first([sys.executable, "mask_train.py", *base, "--save-every", "3", "--out", str(resumed)], state)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 3 and set(saved["modules"]) == {"model", "policy"}
    mask_train.main(["--resume", "--out", str(resumed)])  # everything else from its args.json
    a = (straight / "fold0" / "checkpoint.pt").read_bytes()
    assert a == (resumed / "fold0" / "checkpoint.pt").read_bytes()
    strip = lambda run: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in log_of(run)]  # noqa: E731
    assert strip(straight) == strip(resumed) and "mask_teacher_share" in strip(resumed)[-1]


def test_predict_with_a_teacher_checkpoint_equals_the_evaluation(db, teacher):
    preds = pd.read_csv(teacher["run"] / "fold1" / "predictions.csv")
    files = [str(db["root"] / x) for x in preds["image"]]
    proc = subprocess.run([sys.executable, "predict.py", str(teacher["run"] / "fold1"), *files, "--no-progress",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# teacher trained on")
    scores = [float(line.split("\t")[1]) for line in proc.stdout.strip().splitlines()[1:]]
    np.testing.assert_allclose(scores, preds["prediction"], atol=1e-3)
