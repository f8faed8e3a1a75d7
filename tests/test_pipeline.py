"""Teacher -> features -> student -> predict on a tiny database, through the scripts' own main()."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

import feat_save
import mask_train
import teacher_train
from kdoiqa.common import UserError
from kdoiqa.databases import load_database
from kdoiqa.folds import make_folds, write_folds
from kdoiqa.teacher_features import fold_feature_path, load_features

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "32", "--erp-size", "64x32",
        "--batch-size", "4"]


@pytest.fixture(scope="module")
def pipeline(tiny_db: Path, tmp_path_factory) -> dict:
    """Runs every stage once; the tests below inspect what it wrote."""
    work = tmp_path_factory.mktemp("pipeline")
    db = load_database(tiny_db)
    folds_path = write_folds(make_folds(db, k=2, seed=1), tiny_db / "folds" / "k2_seed1.json")
    teacher = work / "teacher"
    teacher_train.main(["--database", str(tiny_db), "--folds-file", str(folds_path), "--epochs", "2",
                        "--out", str(teacher), *FAST])
    feats = work / "features"
    feat_save.main(["--database", str(tiny_db), "--run", str(teacher), "--features-dir", str(feats),
                    "--workers", "0", "--no-progress"])
    student = work / "student_mask"
    mask_train.main(["--database", str(tiny_db), "--features", str(feats), "--epochs", "3", "--kd-warmup", "1",
                     "--kd-feature-epochs", "1", "--out", str(student), *FAST])
    return {"db": tiny_db, "teacher": teacher, "features": feats, "student": student, "folds": folds_path,
            "work": work}


def test_teacher_run_outputs(pipeline):
    run = pipeline["teacher"]
    table = pd.read_csv(run / "results.csv")
    assert table["fold"].astype(str).tolist() == ["0", "1", "mean", "std", "median"]
    folds = table.iloc[:2]
    assert np.allclose(table.loc[2, ["srcc", "plcc"]].astype(float), folds[["srcc", "plcc"]].astype(float).mean())
    args = json.loads((run / "args.json").read_text())
    assert args["script"] == "teacher_train" and args["args"]["epochs"] == 2 and "git_commit" in args
    assert args["settings"]["optim"]["epochs"] == 2 and args["folds"]["path"] == str(pipeline["folds"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["fold"], r["epoch"]) for r in log] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for k in (0, 1):
        fold = run / f"fold{k}"
        assert (fold / "scatter.png").stat().st_size > 1000
        assert Image.open(fold / "scatter.png").format == "PNG"
        preds = pd.read_csv(fold / "predictions.csv")
        expected = json.loads(pipeline["folds"].read_text())["folds"][k]["test"]
        assert sorted(preds["image"]) == sorted(expected)
        # The recorded metrics are those of the written predictions (checked against scipy).
        res = json.loads((fold / "metrics.json").read_text())
        assert res["srcc"] == pytest.approx(stats.spearmanr(preds["prediction"], preds["mos"])[0], abs=1e-9)


def test_tensorboard_events_readable(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(pipeline["teacher"] / "fold0"))
    acc.Reload()
    assert {"train_loss", "test_srcc"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]
    acc = EventAccumulator(str(pipeline["student"] / "fold0"))
    acc.Reload()
    assert "mask_teacher_share" in acc.Tags()["scalars"]
    share = [e.value for e in acc.Scalars("mask_teacher_share")]
    assert len(share) == 1 and 0.0 <= share[0] <= 1.0  # only epoch 3 is in the mask phase


def test_checkpoints_load_weights_only(pipeline):
    for run in (pipeline["teacher"], pipeline["student"]):
        ckpt = torch.load(run / "fold0" / "checkpoint.pt", weights_only=True)
        assert ckpt["epoch"] == ckpt["epochs"]
        assert set(ckpt) >= {"model", "epoch", "settings", "model_config", "target_scale", "database"}
        # a finished fold keeps one copy of the weights and no optimiser state
        assert not {"optimizer", "modules"} & set(ckpt) and not (run / "fold0" / "resume.pt").exists()
    feats = torch.load(fold_feature_path(pipeline["features"], 0), weights_only=True)
    assert feats["feats"].dtype == torch.float32 and feats["feats"].shape == (12, 512)


def test_features_equal_teacher_forward(pipeline):
    """The cached feature of an image is the teacher's projector output for its faces."""
    from kdoiqa.images import load_faces
    from kdoiqa.models import model_from_config

    ckpt = torch.load(pipeline["teacher"] / "fold1" / "checkpoint.pt", weights_only=True)
    model = model_from_config(ckpt["model_config"]).eval()
    model.load_state_dict(ckpt["model"])
    db = load_database(pipeline["db"])
    cache = torch.load(fold_feature_path(pipeline["features"], 1), weights_only=True)
    i = 5
    faces = torch.from_numpy(load_faces(db, cache["names"][i], 32)).permute(0, 3, 1, 2)[None]
    with torch.no_grad():
        _, feature = model(faces)
    assert torch.allclose(feature[0], cache["feats"][i], atol=1e-4)


def test_stale_features_refused(pipeline, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(pipeline["teacher"], teacher)
    feats = tmp_path / "features"
    feat_save.main(["--database", str(pipeline["db"]), "--run", str(teacher), "--features-dir", str(feats),
                    "--fold", "0", "--workers", "0", "--no-progress"])
    db = load_database(pipeline["db"])
    test = json.loads(pipeline["folds"].read_text())["folds"][0]["test"]
    assert len(load_features(fold_feature_path(feats, 0), db, fold=0, test_images=test, rebuild_hint="x")) == 12
    # Retrain (here: perturb) the teacher: the cache must be refused with the rebuild command.
    ckpt_path = teacher / "fold0" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"]["head.bias"] += 1.0
    torch.save(ckpt, ckpt_path)
    with pytest.raises(UserError, match=r"stale.*feat_save.py --database"):
        load_features(fold_feature_path(feats, 0), db, fold=0, test_images=test, rebuild_hint="x")
    # Another fold's test set (a teacher of other folds) is refused too.
    with pytest.raises(UserError, match="fold"):
        load_features(fold_feature_path(feats, 0), db, fold=1, test_images=test, rebuild_hint="x")


def test_student_refuses_missing_features(pipeline, tmp_path, capsys):
    proc = subprocess.run([sys.executable, "mask_train.py", "--database", str(pipeline["db"]), "--features",
                           str(tmp_path / "nothing"), "--epochs", "1", "--kd-warmup", "0", "--kd-feature-epochs", "0", *FAST],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no teacher features" in lines[0] and "feat_save.py" in lines[0]


def test_select_test_is_labelled(pipeline, tmp_path, capsys):
    run = tmp_path / "sel"
    teacher_train.main(["--database", str(pipeline["db"]), "--folds-file", str(pipeline["folds"]), "--epochs", "2",
                        "--fold", "0", "--select", "test", "--out", str(run), *FAST])
    out = capsys.readouterr().out
    assert "epoch selected on the test fold (the paper's protocol; optimistic)" in out
    table = pd.read_csv(run / "results.csv")
    assert (table["selection"] == "epoch selected on the test fold (the paper's protocol; optimistic)").all()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda r: r["test_srcc"] + r["test_plcc"])  # the paper criterion: SRCC + PLCC
    assert int(table.loc[0, "epoch"]) == best["epoch"]
    assert float(table.loc[0, "srcc"]) == pytest.approx(best["test_srcc"])


def test_predict_any_image(pipeline, tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((40, 100)) * 255).astype(np.uint8)).save(tmp_path / "gray.png")  # not 2:1
    Image.fromarray((rng.random((30, 60, 4)) * 255).astype(np.uint8)).save(tmp_path / "rgba.png")
    out_csv = tmp_path / "scores.csv"
    for ckpt in (pipeline["student"] / "fold0" / "checkpoint.pt", pipeline["teacher"] / "fold0" / "checkpoint.pt"):
        proc = subprocess.run([sys.executable, "predict.py", str(ckpt), str(tmp_path / "gray.png"),
                               str(tmp_path / "rgba.png"), "--csv", str(out_csv), "--no-progress", "--device", "cpu"],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert lines[0].startswith("#") and "higher is better" in lines[0]
        assert [line.split("\t")[0] for line in lines[1:]] == [str(tmp_path / "gray.png"), str(tmp_path / "rgba.png")]
        assert "not a 2:1" in proc.stderr
        table = pd.read_csv(out_csv)
        assert np.allclose(table["score"], [float(line.split("\t")[1]) for line in lines[1:]], atol=1e-4)


def test_predict_matches_evaluation(pipeline):
    """predict.py's scores of the test images equal the run's recorded predictions."""
    run = pipeline["student"]
    preds = pd.read_csv(run / "fold0" / "predictions.csv")
    files = [str(pipeline["db"] / name) for name in preds["image"][:3]]
    proc = subprocess.run([sys.executable, "predict.py", str(run / "fold0" / "checkpoint.pt"), *files,
                           "--no-progress", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    scores = [float(line.split("\t")[1]) for line in proc.stdout.strip().splitlines()[1:]]
    assert np.allclose(scores, preds["prediction"][:3], atol=1e-3)


def test_fold_out_of_range(pipeline, tmp_path):
    proc = subprocess.run([sys.executable, "teacher_train.py", "--database", str(pipeline["db"]), "--folds-file",
                           str(pipeline["folds"]), "--fold", "7", "--out", str(tmp_path / "r"), *FAST],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--fold 7 is out of range" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_metrics_in_results_agree_with_scipy(pipeline):
    """Every fold's numbers in results.csv, recomputed from the written predictions with scipy and a
    logistic written here (not the project's)."""
    def logistic(x, b1, b2, b3, b4):
        return b2 + (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4)))

    for run in (pipeline["teacher"], pipeline["student"]):
        table = pd.read_csv(run / "results.csv", dtype={"fold": str}).set_index("fold")
        everything = pd.read_csv(run / "predictions.csv")
        for k in (0, 1):
            preds = pd.read_csv(run / f"fold{k}" / "predictions.csv")
            assert preds[["image", "mos", "prediction"]].equals(
                everything[everything["fold"] == k][["image", "mos", "prediction"]].reset_index(drop=True))
            row = table.loc[str(k)]
            x, y, fitted = preds["prediction"].to_numpy(), preds["mos"].to_numpy(), preds["fitted"].to_numpy()
            assert row["srcc"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)
            assert row["krcc"] == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-9)
            assert row["plcc"] == pytest.approx(stats.pearsonr(fitted, y)[0], abs=1e-9)
            assert row["rmse"] == pytest.approx(float(np.sqrt(np.mean((fitted - y) ** 2))), rel=1e-9)
            params = json.loads((run / f"fold{k}" / "metrics.json").read_text())["fit_params"]
            expected = logistic(x, *params) if row["fit"] == "logistic4" else np.polyval(params, x)
            np.testing.assert_allclose(fitted, expected, rtol=1e-9, atol=1e-9)
        means = table.loc[["0", "1"], ["srcc", "plcc"]].astype(float).mean()
        assert table.loc["mean", "srcc"] == pytest.approx(means["srcc"])
        assert table.loc["std", "plcc"] == pytest.approx(float(np.std(table.loc[["0", "1"], "plcc"].astype(float), ddof=1)))


def test_faces_online_equal_faces_on_disk(tiny_db, tmp_path):
    """The cache built by projecting on the device equals the one read from viewport.extract's PNGs."""
    from kdoiqa.derived_files import extract_database
    from kdoiqa.image_store import ImageStore
    from kdoiqa.settings import DataSettings

    shutil.copytree(tiny_db, tmp_path / "db")
    db = load_database(tmp_path / "db")
    extract_database(db, 32, device="cpu", threads=1)
    caches = {}
    for source in ("online", "disk"):
        data = DataSettings(face_size=32, erp_size=(64, 32), workers=0, cache="cpu", faces=source)
        store = ImageStore(db, db.images, "faces", data, torch.device("cpu"), progress=False)
        caches[source] = store.pixels
    assert caches["online"].shape == (12, 6, 3, 32, 32)
    assert torch.equal(caches["online"], caches["disk"])


def test_dmos_database_reported_positive(tiny_db, tmp_path, capsys):
    """A DMOS database (higher is worse): the model regresses the DMOS, correlations come out
    positive for a good model, and the printed heading says so."""
    dmos = tmp_path / "TinyDMOS"
    shutil.copytree(tiny_db, dmos)
    meta = pd.read_csv(dmos / "meta.csv")
    meta["mos"] = 100 - meta["mos"]
    meta.to_csv(dmos / "meta.csv", index=False)
    (dmos / "database.json").write_text('{"name": "TinyDMOS", "higher_is_better": false, "score_range": [0, 100]}')
    folds = write_folds(make_folds(load_database(dmos), k=2, seed=1), dmos / "folds" / "k2.json")
    teacher_train.main(["--database", str(dmos), "--folds-file", str(folds), "--fold", "0", "--epochs", "1",
                        "--out", str(tmp_path / "run"), *FAST])
    assert "scores are DMOS (higher is worse)" in capsys.readouterr().out
    preds = pd.read_csv(tmp_path / "run" / "fold0" / "predictions.csv")
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    # The reported SRCC is the plain correlation with the DMOS (no sign change within a database).
    assert float(table.loc[0, "srcc"]) == pytest.approx(stats.spearmanr(preds["prediction"], preds["mos"])[0])
