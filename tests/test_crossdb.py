"""Cross-database trio (teacher -> features -> student) and the matrix, on two tiny databases.

Database B is rewritten as a DMOS (100 - score, database.json "higher_is_better": false), so
every pair crosses score directions: the reported correlations must be those against B's
negated score, and the output must say the scores were flipped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_db
from scipy import stats

import crossdb_feat
import crossdb_train
import teacher_crossdb_train
from kdoiqa import cli
from kdoiqa.common import UserError
from kdoiqa.databases import load_database
from kdoiqa.pairs import load_pair

FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "32", "--erp-size", "64x32",
        "--batch-size", "4"]
KD = ["--kd-warmup", "0", "--kd-feature-epochs", "1"]


def make_dmos_db(root: Path, seed: int) -> Path:
    make_tiny_db(root, contents=3, levels=3, seed=seed)
    meta = pd.read_csv(root / "meta.csv")
    meta["mos"] = 100.0 - meta["mos"]
    meta.to_csv(root / "meta.csv", index=False)
    (root / "database.json").write_text(json.dumps({"name": "TinyDMOS", "higher_is_better": False,
                                                    "score_range": [0, 100]}))
    return root


@pytest.fixture(scope="module")
def dbs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("crossdb")
    a = make_tiny_db(work / "TinyA", contents=4, levels=3, seed=11)     # 12 images, MOS
    b = make_dmos_db(work / "TinyB", seed=22)                           # 9 images, DMOS
    return {"A": a, "B": b, "work": work}


def trio(a: Path, b: Path, work: Path, capsys, student_flags: list[str]) -> dict:
    pair = ["--database-train", str(a), "--database_test", str(b)]
    teacher, feats, student = work / "teacher", work / "features", work / "student"
    teacher_crossdb_train.main([*pair, "--epochs", "1", "--out", str(teacher), *FAST])
    crossdb_feat.main([*pair, "--run", str(teacher), "--features-dir", str(feats), "--workers", "0",
                       "--no-progress"])
    crossdb_train.main([*pair, "--features", str(feats), "--out", str(student), *FAST, *student_flags])
    return {"teacher": teacher, "features": feats, "student": student, "output": capsys.readouterr().out}


def check_flipped_metrics(run: Path, test_db: Path) -> None:
    test = load_database(test_db)
    preds = pd.read_csv(run / "fold0" / "predictions.csv")
    # The test database is the one given (the paper's script always tested on OIQA).
    assert preds["image"].tolist() == test.images
    assert np.allclose(preds["mos"], test.scores())
    res = json.loads((run / "fold0" / "metrics.json").read_text())
    assert res["sign_flipped"] is True
    assert res["srcc"] == pytest.approx(stats.spearmanr(preds["prediction"], -preds["mos"])[0], abs=1e-9)
    table = pd.read_csv(run / "results.csv", dtype={"fold": str})
    assert table["fold"].tolist() == ["0", "mean", "std", "median"]
    assert table["sign_flipped"].all()
    assert table.loc[0, "srcc"] == pytest.approx(res["srcc"])
    assert (run / "fold0" / "scatter.png").is_file() and list((run / "fold0").glob("events.out.tfevents*"))
    ckpt = torch.load(run / "fold0" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == ckpt["epochs"]


def test_trio_mos_to_dmos(dbs, tmp_path, capsys):
    out = trio(dbs["A"], dbs["B"], tmp_path, capsys, ["--epochs", "2", *KD, "--kd", "mask"])
    assert "scores of TinyDMOS flipped (DMOS vs MOS)" in out["output"]
    for stage in ("teacher", "student"):
        check_flipped_metrics(out[stage], dbs["B"])
        args = json.loads((out[stage] / "args.json").read_text())
        assert args["database"]["name"] == "TinyA" and args["test_database"]["name"] == "TinyDMOS"
        assert args["scores_flipped"] is True
    # The features cover exactly all of A's images (12, not the paper's hard-coded 320).
    record = torch.load(out["features"] / "all.pt", weights_only=True)
    assert record["names"] == load_database(dbs["A"]).images
    assert record["feats"].shape == (12, 512) and record["fold"] is None
    log = [json.loads(line) for line in (out["student"] / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "loss_imitation" in log[0] and "loss_mixed" in log[-1]


def test_trio_dmos_to_mos(dbs, tmp_path, capsys):
    out = trio(dbs["B"], dbs["A"], tmp_path, capsys, ["--epochs", "1", *KD, "--kd", "feature"])
    assert "scores of TinyA flipped (DMOS vs MOS)" in out["output"]
    for stage in ("teacher", "student"):
        check_flipped_metrics(out[stage], dbs["A"])
    record = torch.load(out["features"] / "all.pt", weights_only=True)
    assert record["names"] == load_database(dbs["B"]).images and record["feats"].shape[0] == 9


def test_same_direction_and_select_val(dbs, tmp_path, monkeypatch, capsys):
    """Two MOS databases: nothing flipped; --select val holds out contents of A, never of B."""
    from kdoiqa import training

    seen = []
    real = training.holdout_validation

    def spy(db, train, fraction, seed):
        split = real(db, train, fraction, seed)
        seen.append((db.root, list(train), split))
        return split

    monkeypatch.setattr(training, "holdout_validation", spy)
    c = make_tiny_db(tmp_path / "TinyC", contents=3, levels=2, seed=33)
    run = tmp_path / "student"
    crossdb_train.main(["--database-train", str(dbs["A"]), "--database-test", str(c), "--kd", "none",
                        "--select", "val", "--epochs", "1", "--out", str(run), *FAST])
    assert "flipped (DMOS" not in capsys.readouterr().out
    a, test = load_database(dbs["A"]), load_database(c)
    preds = pd.read_csv(run / "fold0" / "predictions.csv")
    assert preds["image"].tolist() == test.images
    res = json.loads((run / "fold0" / "metrics.json").read_text())
    assert res["sign_flipped"] is False
    assert res["srcc"] == pytest.approx(stats.spearmanr(preds["prediction"], preds["mos"])[0], abs=1e-9)
    (root, train, (fit, val)), = seen
    # Held out of A (the run's database, all of whose images are trained on), never of B.
    assert root == a.root and sorted(train) == sorted(a.images)
    assert val and fit and sorted(val + fit) == sorted(a.images)
    assert {a.refs([x])[0] for x in val}.isdisjoint({a.refs([x])[0] for x in fit})
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "val_srcc" in log[0]


def test_missing_features_refused_with_command(dbs, tmp_path):
    run = tmp_path / "student"
    with pytest.raises(UserError, match=r"no teacher features; make them with `python crossdb_feat.py "
                                        r"--database-train .*TinyA --database-test .*TinyB"):
        crossdb_train.main(["--database-train", str(dbs["A"]), "--database-test", str(dbs["B"]),
                            "--features", str(tmp_path / "nowhere"), "--out", str(run), *FAST])
    assert not run.exists()


def test_flags_and_refusals(dbs):
    args = crossdb_train.build_parser().parse_args(["--database_train", "X", "--database_test", "Y"])
    assert (args.database_train, args.database_test, args.epochs) == ("X", "Y", 50)
    assert (args.database_train, args.database_test) == ("X", "Y")
    defaults = cli.teacher_parser(cross=True).parse_args([])
    assert (defaults.epochs, defaults.database_train, defaults.database_test) == (50, "CVIQ", "OIQA")  # the paper's
    with pytest.raises(UserError, match="same database"):
        load_pair(dbs["A"], dbs["A"])
    with pytest.raises(UserError, match="not --database"):
        crossdb_train.main(["--database", str(dbs["A"]), "--database-test", str(dbs["B"]), "--kd", "none"])
    with pytest.raises(UserError, match="OIQA: database folder not found"):  # the paper's default test database
        teacher_crossdb_train.main(["--database-train", str(dbs["A"]), "--data-root", str(dbs["work"])])


def test_matrix_writes_and_resumes(dbs, tmp_path, capsys):
    out = tmp_path / "matrix"
    argv = ["--matrix", f"{dbs['A']},{dbs['B']}", "--out", str(out), "--epochs", "1", "--kd-warmup", "0",
            "--kd-feature-epochs", "1", *FAST]
    with pytest.raises(UserError, match="would never distil"):  # refused before any stage runs
        crossdb_train.main(argv)
    assert not out.exists()
    argv[argv.index("--kd-feature-epochs") + 1] = "0"
    crossdb_train.main(argv)
    first = capsys.readouterr().out
    matrix = pd.read_csv(out / "matrix.csv")
    assert matrix.columns.tolist() == ["metric", "train", "TinyA", "TinyDMOS"]
    assert matrix["metric"].tolist() == ["srcc"] * 2 + ["plcc"] * 2 + ["teacher_srcc"] * 2 + ["teacher_plcc"] * 2
    assert matrix["train"].tolist() == ["TinyA", "TinyDMOS"] * 4
    srcc = matrix[matrix["metric"] == "srcc"].set_index("train")
    assert np.isnan(srcc.loc["TinyA", "TinyA"]) and np.isnan(srcc.loc["TinyDMOS", "TinyDMOS"])
    a_to_b, b_to_a = load_pair(dbs["A"], dbs["B"]).key, load_pair(dbs["B"], dbs["A"]).key
    res = json.loads((out / a_to_b / "student" / "fold0" / "metrics.json").read_text())
    assert srcc.loc["TinyA", "TinyDMOS"] == pytest.approx(res["srcc"])
    assert "SRCC" in first and "flipped (DMOS vs MOS)" in first
    for key in (a_to_b, b_to_a):
        assert (out / key / "features" / "all.pt").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}

    crossdb_train.main(argv)
    second = capsys.readouterr().out
    assert second.count("done, skipped") == 6 and "training" not in second
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps
    assert pd.read_csv(out / "matrix.csv").equals(matrix)

    # A student killed after its last checkpoint but before its results: only that stage resumes.
    victim = out / b_to_a / "student"
    os.remove(victim / "results.csv")
    crossdb_train.main(argv)
    third = capsys.readouterr().out
    assert third.count("done, skipped") == 5 and "student: resuming" in third
    assert (victim / "results.csv").is_file()
    assert pd.read_csv(out / "matrix.csv").equals(matrix)


def test_crossdb_feat_refuses_face_flags_that_are_not_the_teachers(dbs, tmp_path):
    """As feat_save.py: the features come from the faces the teacher trained on; a --face-size of other faces,
    or an --erp-size (the student's), is refused in one line instead of being ignored."""
    pair = ["--database-train", str(dbs["A"]), "--database-test", str(dbs["B"])]
    teacher = tmp_path / "teacher"
    teacher_crossdb_train.main([*pair, "--epochs", "1", "--out", str(teacher), *FAST])
    common = [*pair, "--run", str(teacher), "--features-dir", str(tmp_path / "f"), "--workers", "0", "--no-progress"]
    with pytest.raises(UserError, match=r"--face-size 16: the teacher run .* was trained on 32-px faces"):
        crossdb_feat.main([*common, "--face-size", "16"])
    with pytest.raises(UserError, match="--erp-size does not apply to teacher features"):
        crossdb_feat.main([*common, "--erp-size", "64x32"])
    assert not (tmp_path / "f").exists()
    crossdb_feat.main([*common, "--face-size", "32"])  # the teacher's own: accepted
    assert (tmp_path / "f" / "all.pt").is_file()
