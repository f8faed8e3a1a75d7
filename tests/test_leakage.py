"""No leakage, proven on what is actually served: every image a training step sees is one of its
fold's training images (all of them, and none of its test images); every evaluation scores exactly
the fold's test images, or (--select val) a validation split held out of the training contents and
never trained on. For the teacher, the student (mask KD) and a cross-database run."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_tiny_db

import crossdb_train
import feat_save
import mask_train
import teacher_crossdb_train
import teacher_train
from kdoiqa.databases import load_database
from kdoiqa.folds import load_folds, make_folds, write_folds

FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--erp-size", "32x16",
        "--batch-size", "4"]


@pytest.fixture()
def served(monkeypatch):
    """Every batch the engine draws, as (fold, "train"/"eval", evaluation call, database root, images)."""
    from kdoiqa import engine, image_store, training

    log: list[tuple] = []
    state = {"fold": None, "call": 0}
    real_batches, real_predict, real_fold = image_store.ImageStore.batches, engine.predict_scores, training.train_fold

    def batches(self, images, batch_size, *, shuffle=False, generator=None, shard=False):
        for batch in real_batches(self, images, batch_size, shuffle=shuffle, generator=generator, shard=shard):
            log.append((state["fold"], "train" if shuffle else "eval", state["call"], self.db.root,
                        list(batch["images"])))
            yield batch

    def predict_scores(*args, **kwargs):
        state["call"] += 1
        return real_predict(*args, **kwargs)

    def train_fold(run, k, *args, **kwargs):
        state["fold"] = k
        return real_fold(run, k, *args, **kwargs)

    monkeypatch.setattr(image_store.ImageStore, "batches", batches)
    monkeypatch.setattr(engine, "predict_scores", predict_scores)
    monkeypatch.setattr(training, "train_fold", train_fold)
    return log


def trained_images(log, fold) -> list[str]:
    return [x for f, kind, _, _, images in log if f == fold and kind == "train" for x in images]


def evaluations(log, fold) -> list[set[str]]:
    """The image set of each evaluation call of a fold."""
    calls: dict[int, set[str]] = {}
    for f, kind, call, _, images in log:
        if f == fold and kind == "eval":
            calls.setdefault(call, set()).update(images)
    return list(calls.values())


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    db = make_tiny_db(tmp_path_factory.mktemp("leak") / "Tiny", contents=4, levels=3, seed=3)
    path = write_folds(make_folds(load_database(db), k=2, seed=4), db / "folds" / "k2.json")
    return db, path, load_folds(path, load_database(db))


def check_folds(log, folds, epochs: int, run: Path) -> None:
    for k, fold in enumerate(folds.folds):
        seen = trained_images(log, k)
        assert sorted(set(seen)) == sorted(fold.train), f"fold {k} trained on other images than its training set"
        assert len(seen) == epochs * len(fold.train), "each training image once per epoch"
        evals = evaluations(log, k)
        assert evals and all(e == set(fold.test) for e in evals), f"fold {k} evaluated on other images"
        assert sorted(pd.read_csv(run / f"fold{k}" / "predictions.csv")["image"]) == sorted(fold.test)


def test_teacher_and_student_see_their_folds_only(split, tmp_path, served):
    db, path, folds = split
    teacher = tmp_path / "teacher"
    teacher_train.main(["--database", str(db), "--folds-file", str(path), "--epochs", "2", "--out", str(teacher), *FAST])
    check_folds(served, folds, 2, teacher)
    served.clear()
    features = tmp_path / "features"
    feat_save.main(["--database", str(db), "--run", str(teacher), "--features-dir", str(features), "--workers", "0",
                    "--no-progress"])
    served.clear()
    student = tmp_path / "student"
    mask_train.main(["--database", str(db), "--features-dir", str(features), "--epochs", "2", "--kd-warmup", "0",
                     "--kd-feature-epochs", "1", "--out", str(student), *FAST])
    check_folds(served, folds, 2, student)
    assert json.loads((student / "args.json").read_text())["folds"]["sha256"] == folds.digest()  # the teacher's split


def test_select_val_holds_out_training_contents(split, tmp_path, served):
    db, path, folds = split
    run = tmp_path / "val"
    teacher_train.main(["--database", str(db), "--folds-file", str(path), "--fold", "1", "--epochs", "2",
                        "--select", "val", "--val-fraction", "0.5", "--out", str(run), *FAST])
    base = load_database(db)
    ref = dict(zip(base.images, base.refs()))
    fold = folds.folds[1]
    trained = set(trained_images(served, 1))
    evals = evaluations(served, 1)
    val = [e for e in evals if e != set(fold.test)]
    assert val and all(v == val[0] for v in val)  # one validation set, scored every epoch
    val_set = val[0]
    assert val_set <= set(fold.train) and not val_set & trained          # from training images, never trained on
    assert trained | val_set == set(fold.train)                           # the rest is trained on
    assert not {ref[x] for x in val_set} & {ref[x] for x in trained}      # whole contents held out
    assert set(fold.test) in evals and not {ref[x] for x in val_set} & {ref[x] for x in fold.test}


def test_cross_database_trains_on_a_tests_on_b(tmp_path, served):
    a = make_tiny_db(tmp_path / "A", contents=3, levels=2, seed=7)
    b = make_tiny_db(tmp_path / "B", contents=2, levels=2, seed=8)
    pair = ["--database-train", str(a), "--database-test", str(b)]
    teacher = tmp_path / "teacher"
    teacher_crossdb_train.main([*pair, "--epochs", "2", "--out", str(teacher), *FAST])
    all_a, all_b = load_database(a).images, load_database(b).images
    assert sorted(trained_images(served, 0)) == sorted(all_a * 2)
    assert all(e == set(all_b) for e in evaluations(served, 0))
    assert {root for _, kind, _, root, _ in served if kind == "train"} == {a}
    served.clear()
    student = tmp_path / "student"
    crossdb_train.main([*pair, "--kd", "none", "--epochs", "1", "--out", str(student), *FAST])
    assert sorted(trained_images(served, 0)) == sorted(all_a)
    assert all(e == set(all_b) for e in evaluations(served, 0))
