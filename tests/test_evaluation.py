"""One stage for a database's folds and for a cross-database pair: the pair is a one-split fold set
(train = all of A, test = all of B), its differences (the feature file's name, its fold, the labels)
carried by `pairs.Evaluation`; the default feature folder is one rule."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_db

import crossdb_train
import teacher_crossdb_train
import teacher_train
from kdoiqa import stages
from kdoiqa.databases import load_database
from kdoiqa.settings import DataSettings, RuntimeSettings
from kdoiqa.teacher_features import features_folder

FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--batch-size", "4", "--epochs", "1"]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("evaluation")
    return {"A": make_tiny_db(work / "EvalA", contents=4, levels=3, seed=5),
            "B": make_tiny_db(work / "EvalB", contents=2, levels=3, seed=6)}


def test_the_default_feature_folder_is_one_rule(dbs):
    assert features_folder("OIQA-0123abcd", None) == Path("features") / "OIQA-0123abcd"
    assert features_folder("OIQA-0123abcd", "elsewhere/feats") == Path("elsewhere/feats")
    within = stages.database_evaluation(str(dbs["A"]), None)
    pair = stages.pair_evaluation(str(dbs["A"]), str(dbs["B"]), None)
    a, b = load_database(dbs["A"]), load_database(dbs["B"])
    assert within.features_dir(None) == Path("features") / within.key
    assert pair.features_dir(None) == Path("features") / f"{within.key}-to-{pair.key.split('-to-')[1]}"
    assert pair.key.startswith(f"{a.name}-") and pair.key.split("-to-")[1].startswith(f"{b.name}-")
    assert pair.features_dir("given") == within.features_dir("given") == Path("given")


def test_a_pair_is_a_one_split_fold_set(dbs):
    a, b = load_database(dbs["A"]), load_database(dbs["B"])
    pair = stages.pair_evaluation(str(dbs["A"]), str(dbs["B"]), None)
    folds = pair.fixed_folds()
    assert folds is not None and len(folds) == 1
    assert sorted(folds.folds[0].train) == sorted(a.images) and folds.folds[0].test == b.images
    assert pair.train.root == a.root and pair.test is not None and pair.test.root == b.root
    assert pair.feature_path(Path("d"), 0) == Path("d") / "all.pt" and pair.feature_fold(0) is None
    assert pair.teacher_script == "teacher_crossdb_train" and pair.name == f"{a.name} -> {b.name}"
    within = stages.database_evaluation(str(dbs["A"]), None)
    assert within.fixed_folds() is None and within.test is None
    assert within.feature_path(Path("d"), 2) == Path("d") / "fold2.pt" and within.feature_fold(2) == 2
    assert within.teacher_script == "teacher_train" and within.name == a.name


def _record(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def teachers(dbs, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("teachers")
    within_run, pair_run = work / "teacher", work / "cross_teacher"
    teacher_train.main(["--database", str(dbs["A"]), "--folds", "2", "--out", str(within_run), *FAST])
    teacher_crossdb_train.main(["--database-train", str(dbs["A"]), "--database-test", str(dbs["B"]),
                                "--out", str(pair_run), *FAST])
    return {"within": within_run, "pair": pair_run}


def test_one_feature_stage_writes_folds_and_pairs(dbs, teachers, tmp_path, capsys):
    a, b = load_database(dbs["A"]), load_database(dbs["B"])
    within_run, pair_run = teachers["within"], teachers["pair"]
    capsys.readouterr()
    data, runtime = DataSettings(workers=0), RuntimeSettings(progress=False)
    pair = stages.pair_evaluation(str(dbs["A"]), str(dbs["B"]), None)
    written = stages.write_teacher_features(pair, str(pair_run), str(tmp_path / "pf"), data=data, runtime=runtime)
    assert written == [tmp_path / "pf" / "all.pt"]
    assert capsys.readouterr().out == f"wrote {tmp_path / 'pf' / 'all.pt'} (12 images of EvalA x 512)\n"
    record = _record(written[0])
    assert record["fold"] is None and record["names"] == a.images and record["feats"].shape == (12, 512)
    assert record["test_images_sha256"] == hashlib.sha256("\n".join(sorted(b.images)).encode()).hexdigest()
    assert "folds_path" not in record["provenance"] and record["face_size"] == 16
    assert record["rebuild"].startswith("python crossdb_feat.py --database-train ")

    within = stages.database_evaluation(str(dbs["A"]), None)
    written = stages.write_teacher_features(within, str(within_run), str(tmp_path / "wf"), data=data, runtime=runtime)
    assert written == [tmp_path / "wf" / "fold0.pt", tmp_path / "wf" / "fold1.pt"]
    assert capsys.readouterr().out == "".join(f"wrote {p} (12 x 512)\n" for p in written)
    for k, path in enumerate(written):
        record = _record(path)
        assert record["fold"] == k and record["names"] == a.images
        assert Path(record["provenance"]["folds_path"]).name == "k2_seed2023.json"
        assert record["rebuild"].startswith("python feat_save.py --database ")

    # The pipeline runner's features stage (reproduce.py, the matrix) is the same stage, skipped once done.
    from kdoiqa import pipeline

    experiment = pipeline.Experiment("[pair]", {"database_train": str(dbs["A"]), "database_test": str(dbs["B"])},
                                     pair_run, tmp_path / "pf2")
    stage = pipeline.features_stage(experiment, "features", None, data, runtime)
    assert stage.run() == "made" and stage.run() == "done"
    assert torch.equal(_record(tmp_path / "pf2" / "all.pt")["feats"], _record(tmp_path / "pf" / "all.pt")["feats"])
    assert stages.write_teacher_features(within, str(within_run), str(tmp_path / "wf2"), data=data, runtime=runtime,
                                         fold=1) == [tmp_path / "wf2" / "fold1.pt"]
    pair = stages.pair_evaluation(str(dbs["A"]), str(dbs["B"]), None)
    assert stages.features_up_to_date(pair, pair_run, tmp_path / "pf")
    assert stages.features_up_to_date(within, within_run, tmp_path / "wf")
    assert not stages.features_up_to_date(within, within_run, tmp_path / "wf2")  # fold 0's file is missing


def test_a_pair_student_finds_its_features_in_the_default_folder(dbs, teachers, tmp_path, monkeypatch, capsys):
    """The pair's features, written and read through the one stage pair with no --features-dir given: both take
    features/<A>-to-<B>/all.pt of the working folder."""
    monkeypatch.chdir(tmp_path)
    pair = stages.pair_evaluation(str(dbs["A"]), str(dbs["B"]), None)
    written = stages.write_teacher_features(pair, str(teachers["pair"]), None, data=DataSettings(workers=0),
                                            runtime=RuntimeSettings(progress=False))
    assert written == [Path("features") / pair.key / "all.pt"]
    run = tmp_path / "student"
    crossdb_train.main(["--database-train", str(dbs["A"]), "--database-test", str(dbs["B"]), "--out", str(run),
                        "--epochs", "1", "--kd-warmup", "0", "--kd-feature-epochs", "0", *FAST[:-2],
                        "--erp-size", "32x16"])
    out = capsys.readouterr().out
    args = json.loads((run / "args.json").read_text())
    assert list(args["teacher_features"]) == ["0"]
    assert args["teacher_features"]["0"]["features"] == str((tmp_path / written[0]).resolve())
    assert args["teacher_features"]["0"]["teacher_run"] == str(teachers["pair"].resolve())
    assert "scores of" not in out and "score directions agree" in out
