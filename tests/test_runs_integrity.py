"""Runs, folds and caches in every half-finished state: a run still training is not scored as if whole,
folds of other runs are never averaged with a run's own, a student names its teacher, a flag that cannot
apply is refused, and every `next:` hint works when pasted (also from another working folder)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_db

import feat_save
import kdoiqa
import make_synthetic_db
import mask_train
import predict
import teacher_train
from kdoiqa.common import UserError
from kdoiqa.databases import database_key, load_database

FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--batch-size", "4"]
TEACHER = [*FAST, "--face-size", "16", "--folds", "2", "--epochs", "1"]          # no --erp-size: a teacher's flags
STUDENT = [*FAST, "--erp-size", "32x16", "--epochs", "1", "--kd-warmup", "0", "--kd-feature-epochs", "0"]
SCRIPTS = {"feat_save.py": feat_save.main, "mask_train.py": mask_train.main, "predict.py": predict.main,
           "teacher_train.py": teacher_train.main}


def captured(fn, argv: list[str]) -> tuple[object, str]:
    """`fn(argv)` with its stdout captured (a module fixture has no capsys)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        value = fn(argv)
    return value, out.getvalue()


def hint(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith("next: ")][-1][len("next: "):]


def paste(command: str) -> tuple[object, str]:
    """Run a printed command as a shell would split it (in this process: `python X.py ...` -> X.main)."""
    words = shlex.split(command)
    assert words[0] == "python" and words[1] in SCRIPTS, words
    return captured(SCRIPTS[words[1]], words[2:])


def one_line_error(fn, argv: list[str]) -> str:
    with pytest.raises(UserError) as info:
        captured(fn, argv)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A project folder as a user has it: data/<db with a space>/, runs/, features/ (default places)."""
    proj = tmp_path_factory.mktemp("integrity") / "my project"
    db = make_tiny_db(proj / "data" / "my panos", contents=3, levels=2, size=(64, 32), seed=41)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(proj)
        _, teacher_out = captured(teacher_train.main, ["--database", "data/my panos", *TEACHER,
                                                       "--out", "runs/teacher one"])
        _, feat_out = captured(feat_save.main, ["--database", "data/my panos", "--run", "runs/teacher one",
                                                "--no-progress", "--workers", "0"])
        _, student_out = captured(mask_train.main, ["--database", "data/my panos", *STUDENT, "--out", "runs/student"])
    key = database_key(load_database(db))
    return {"proj": proj, "db": db, "key": key, "teacher": proj / "runs" / "teacher one",
            "features": proj / "features" / key, "student": proj / "runs" / "student",
            "images": sorted((db / "images").glob("*.png"))[:3],
            "teacher_out": teacher_out, "feat_out": feat_out, "student_out": student_out}


def scores(target: Path, images: list[Path], **options) -> np.ndarray:
    return kdoiqa.load(target, "cpu", **options)(images).numpy()


# ----------------------------------------------------------------------------------------------
# A run folder still training.

def test_a_run_still_training_is_refused_unless_partial_is_allowed(project, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(project["student"], run)
    (run / "fold1" / "checkpoint.pt").unlink()
    torch.save({"model_config": {}, "modules": {}, "optimizer": {}, "epoch": 1, "history": []}, run / "fold1" / "resume.pt")
    images = project["images"]
    for attempt in (lambda: kdoiqa.load(run, "cpu"), lambda: predict.main([str(run), *map(str, images), "--no-progress"])):
        with pytest.raises(UserError) as info:
            attempt()
        message = str(info.value)
        assert "fold 1" in message and "--allow-partial" in message and "\n" not in message, message
    partial = kdoiqa.load(run, "cpu", allow_partial=True)
    assert partial.folds == [0] and partial.unfinished_folds == [1]
    np.testing.assert_allclose(partial(images).numpy(), scores(project["student"] / "fold0", images), atol=1e-5)
    whole = kdoiqa.load(project["student"], "cpu")
    assert whole.folds == [0, 1] and whole.unfinished_folds == []
    capsys.readouterr()
    assert predict.main([str(run), *map(str, images), "--no-progress", "--device", "cpu", "--allow-partial"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "fold 1" in header and "unfinished" in header and "one model" not in header, header

    # The same without args.json, with an empty fold folder, or with no fold folder at all.
    (run / "args.json").unlink()
    for state in ("resume.pt only", "empty folder", "no folder"):
        if state == "empty folder":
            shutil.rmtree(run / "fold1")
            (run / "fold1").mkdir()
        elif state == "no folder":
            (run / "fold1").rmdir()
        with pytest.raises(UserError, match="fold 1"):
            kdoiqa.load(run, "cpu")
        assert kdoiqa.load(run, "cpu", allow_partial=True).unfinished_folds == [1]


def test_a_run_of_one_chosen_fold_is_whole(project, tmp_path):
    run = tmp_path / "one"
    mask_train.main(["--database", str(project["db"]), "--kd", "none", "--fold", "1", "--folds", "2", *STUDENT, "--out", str(run)])
    metric = kdoiqa.load(run, "cpu")
    assert metric.folds == [1] and metric.unfinished_folds == []
    _, out = captured(predict.main, [str(run), str(project["images"][0]), "--no-progress"])
    assert "one model, fold 1" in out.splitlines()[0], out


# ----------------------------------------------------------------------------------------------
# Folds of different runs in one folder.

def _edited(source: Path, target: Path, edit) -> None:
    ckpt = torch.load(source, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, target)


def test_folds_of_other_runs_are_refused(project, tmp_path):
    dmos = make_tiny_db(tmp_path / "Dmos", contents=3, levels=2, size=(64, 32), seed=41)
    (dmos / "database.json").write_text(json.dumps({"higher_is_better": False}))
    other = tmp_path / "dmos-run"
    mask_train.main(["--database", str(dmos), "--kd", "none", "--fold", "0", "--folds", "2", *STUDENT, "--out", str(other)])
    run = tmp_path / "mixed"
    shutil.copytree(project["student"], run)
    fold1 = run / "fold1" / "checkpoint.pt"
    original = fold1.read_bytes()

    def refused(field: str) -> None:
        for attempt in (lambda: kdoiqa.load(run, "cpu"),
                        lambda: predict.main([str(run), str(project["images"][0]), "--no-progress", "--allow-partial"])):
            with pytest.raises(UserError) as info:
                attempt()
            message = str(info.value)
            assert "fold1" in message and field in message and "\n" not in message, (field, message)

    shutil.copy(other / "fold0" / "checkpoint.pt", fold1)                 # a DMOS student's fold
    refused("database")
    shutil.copy(project["teacher"] / "fold1" / "checkpoint.pt", fold1)    # a teacher's fold
    refused("kind")
    shutil.copy(run / "fold0" / "checkpoint.pt", fold1)                   # the run's own fold 0, twice
    refused("of fold 0")
    fold1.write_bytes(original)
    _edited(fold1, fold1, lambda c: c["database"].update(higher_is_better=False))   # same key, other direction
    refused("direction")
    fold1.write_bytes(original)
    _edited(fold1, fold1, lambda c: c["settings"]["optim"].update(lr=1e-3))         # other settings
    refused("settings")
    (run / "args.json").unlink()                                          # between the folds themselves
    refused("settings")
    fold1.write_bytes(original)
    assert kdoiqa.load(run, "cpu").folds == [0, 1]


# ----------------------------------------------------------------------------------------------
# The teacher of a student.

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_student_records_its_teacher(project, tmp_path):
    teacher, student = project["teacher"].resolve(), project["student"]
    expected = {k: _sha256(teacher / f"fold{k}" / "checkpoint.pt") for k in (0, 1)}
    record = json.loads((student / "args.json").read_text())["teacher_features"]
    for k in (0, 1):
        entry = record[str(k)]
        assert entry["teacher_checkpoint_sha256"] == expected[k]
        assert Path(entry["teacher_run"]) == teacher and Path(entry["teacher_checkpoint"]).is_file()
        assert Path(entry["features"]) == (project["features"] / f"fold{k}.pt").resolve()
        ckpt = torch.load(student / f"fold{k}" / "checkpoint.pt", weights_only=True)
        assert ckpt["teacher_features"]["teacher_checkpoint_sha256"] == expected[k]
    header = project["student_out"].split("\nfold 0:")[0]
    assert str(teacher) in header and all(expected[k][:12] in header for k in (0, 1)), header

    # A newer teacher run and no new features: the student still learns from (and names) the first one, and says so.
    newer = tmp_path / "teacher two"
    teacher_train.main(["--database", str(project["db"]), *TEACHER, "--fold", "0", "--out", str(newer)])
    _, out = captured(mask_train.main, ["--database", str(project["db"]), "--features-dir", str(project["features"]),
                                        "--fold", "0", *STUDENT, "--out", str(tmp_path / "s")])
    entry = json.loads((tmp_path / "s" / "args.json").read_text())["teacher_features"]["0"]
    assert entry["teacher_checkpoint_sha256"] == expected[0] and Path(entry["teacher_run"]) == teacher
    # The baseline has no teacher.
    mask_train.main(["--database", str(project["db"]), "--kd", "none", "--fold", "0", "--folds", "2", *STUDENT,
                    "--out", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "args.json").read_text())["teacher_features"] is None


def test_resuming_a_student_whose_features_changed_teacher_is_refused(project, tmp_path):
    features = tmp_path / "features"
    shutil.copytree(project["features"], features)
    run = tmp_path / "s"
    mask_train.main(["--database", str(project["db"]), "--features-dir", str(features), *STUDENT, "--out", str(run),
                     "--fold", "0"])
    (run / "fold0" / "checkpoint.pt").rename(run / "fold0" / "resume.pt")  # as if interrupted (content not read)
    other = tmp_path / "teacher two"
    teacher_train.main(["--database", str(project["db"]), *TEACHER, "--fold", "0", "--out", str(other)])
    feat_save.main(["--database", str(project["db"]), "--run", str(other), "--features-dir", str(features),
                    "--no-progress", "--workers", "0", "--fold", "0"])
    message = one_line_error(mask_train.main, ["--resume", "--out", str(run), "--no-progress"])
    assert "fold 0" in message and "teacher" in message and str(other.resolve()) in message, message


# ----------------------------------------------------------------------------------------------
# Explicit flags that cannot apply.

def test_explicit_flags_that_cannot_apply_are_refused(project, tmp_path):
    db = str(project["db"])
    message = one_line_error(feat_save.main, ["--database", db, "--run", str(project["teacher"]), "--face-size", "64",
                                              "--features-dir", str(tmp_path / "f"), "--no-progress"])
    assert "--face-size 64" in message and "16" in message, message
    assert not (tmp_path / "f").exists()
    message = one_line_error(feat_save.main, ["--database", db, "--from-authors", str(tmp_path), "--run",
                                              str(project["teacher"])])
    assert "--run" in message and "--from-authors" in message, message
    student = ["--database", db, "--features-dir", str(project["features"]), *STUDENT, "--out", str(tmp_path / "s")]
    message = one_line_error(mask_train.main, [*student, "--folds", "3"])
    assert "--folds 3" in message and "2 folds" in message, message
    message = one_line_error(mask_train.main, [*student, "--face-size", "32"])
    assert "--face-size 32" in message and "16" in message, message
    assert not (tmp_path / "s").exists()
    # The same flags that agree are taken; the baseline applies its own --folds.
    mask_train.main([*student, "--folds", "2", "--face-size", "16", "--fold", "0"])
    mask_train.main(["--database", db, "--kd", "none", "--features-dir", str(project["features"]), *STUDENT,
                     "--folds", "3", "--fold", "0", "--out", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "args.json").read_text())["folds"]["k"] == 3


def test_a_partial_teacher_run_gives_no_partial_features(project, tmp_path):
    run = tmp_path / "teacher"
    shutil.copytree(project["teacher"], run)
    (run / "fold1" / "checkpoint.pt").unlink()
    message = one_line_error(feat_save.main, ["--database", str(project["db"]), "--run", str(run),
                                              "--features-dir", str(tmp_path / "f"), "--no-progress"])
    assert "fold 1" in message and "--fold 0" in message, message
    assert not (tmp_path / "f").exists()
    # The finished fold's features, and a student of that fold only: the hint says so, and works when pasted.
    _, out = captured(feat_save.main, ["--database", str(project["db"]), "--run", str(run), "--fold", "0",
                                       "--features-dir", str(tmp_path / "f"), "--no-progress", "--workers", "0"])
    assert "--fold 0" in hint(out), hint(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        paste(hint(out) + " --no-progress --out s")
    assert kdoiqa.load(tmp_path / "s", "cpu").folds == [0]


# ----------------------------------------------------------------------------------------------
# next: hints, pasted.

def test_every_hint_works_when_pasted(project, monkeypatch):
    monkeypatch.chdir(project["proj"])  # where the user typed the commands
    teacher_hint, feat_hint, student_hint = (hint(project[k]) for k in ("teacher_out", "feat_out", "student_out"))
    assert shlex.split(teacher_hint)[1] == "feat_save.py"
    _, out = paste(teacher_hint)
    assert hint(out) == feat_hint
    # The student hint keeps the teacher's small settings: its epochs, an ERP size of the teacher's scale.
    words = shlex.split(feat_hint)
    assert words[1] == "mask_train.py" and "--no-pretrained" in words, feat_hint
    before = set((project["proj"] / "runs" / "mask_train").rglob("args.json"))
    _, out = paste(feat_hint)
    [made] = set((project["proj"] / "runs" / "mask_train").rglob("args.json")) - before
    settings = json.loads(made.read_text())["settings"]
    assert settings["optim"]["epochs"] == 1 and settings["data"]["erp_size"][0] <= 4 * 16, settings
    assert (made.parent / "results.csv").is_file()
    code, out = paste(hint(out))
    assert code == 0 and out.startswith("# student trained on my panos"), out
    code, _ = paste(student_hint)
    assert code == 0


def test_make_synthetic_db_prints_a_hint_that_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, out = captured(make_synthetic_db.main, ["--out", "my data/Synth DB", "--contents", "3", "--size", "128x64",
                                               "--workers", "1"])
    words = shlex.split(hint(out))
    assert words[:2] == ["python", "teacher_train.py"], words
    from kdoiqa import cli

    args, _ = cli.parse(cli.teacher_parser(), words[2:])
    db = load_database(args.database, args.data_root)
    assert db.root.resolve() == (tmp_path / "my data" / "Synth DB").resolve() and args.folds <= 3
    # Pasted with a single epoch it trains (the database and split it names exist).
    paste(" ".join([shlex.join(words), "--epochs", "1", "--no-pretrained", "--workers", "0", "--no-progress",
                    "--fold", "0", "--out", "run"]))
    assert (tmp_path / "run" / "fold0" / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------------------------
# From another working folder.

def test_from_another_folder_the_features_are_found(project, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    db = str(project["db"])
    message = one_line_error(mask_train.main, ["--database", db, *STUDENT, "--fold", "0", "--out", "s"])
    assert "relative to" in message and str(elsewhere) in message, message
    assert str(project["features"].resolve()) in message and "--features-dir" in message, message
    command = message.split("`")[1]
    assert str(project["features"].resolve()) in command
    # The features' split and teacher are found from here too: the student trains.
    mask_train.main(["--database", db, "--features-dir", str(project["features"].resolve()), *STUDENT, "--fold", "0",
                     "--out", "s"])
    assert (elsewhere / "s" / "fold0" / "checkpoint.pt").is_file()


def test_a_missing_run_folder_says_what_it_is_relative_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        kdoiqa.load("runs/x")
    assert str(info.value).startswith(f"runs/x (relative to the working folder {tmp_path}): no such"), info.value


def test_from_another_folder_a_missing_database_is_found_not_made_twice(tmp_path, monkeypatch):
    make_tiny_db(tmp_path / "proj" / "data" / "Synthetic", contents=2, levels=2, size=(32, 16))
    (tmp_path / "proj" / "scripts").mkdir()
    monkeypatch.chdir(tmp_path / "proj" / "scripts")
    monkeypatch.delenv("KDOIQA_DATA", raising=False)
    message = one_line_error(teacher_train.main, ["--database", "Synthetic", *TEACHER])
    assert "relative to" in message and str(tmp_path / "proj" / "scripts") in message, message
    assert f"--data-root {tmp_path / 'proj' / 'data'}" in message and "make_synthetic_db" not in message, message


# ----------------------------------------------------------------------------------------------
# More half-finished states.

def test_features_of_a_deleted_teacher_run_say_how_to_rebuild(project, tmp_path):
    teacher, features = tmp_path / "teacher", tmp_path / "features"
    shutil.copytree(project["teacher"], teacher)
    feat_save.main(["--database", str(project["db"]), "--run", str(teacher), "--features-dir", str(features),
                    "--no-progress", "--workers", "0"])
    shutil.rmtree(teacher)
    message = one_line_error(mask_train.main, ["--database", str(project["db"]), "--features-dir", str(features),
                                               *STUDENT, "--out", str(tmp_path / "s")])
    assert "is gone" in message and "--run" in message and f"--run {teacher}" not in message, message
    assert not (tmp_path / "s").exists()


def test_a_resume_with_another_copy_of_the_database_is_refused(tmp_path):
    for root, seed in (("A", 1), ("B", 2)):
        make_tiny_db(tmp_path / root / "Synthetic", contents=2, levels=2, size=(32, 16), seed=seed)
    run = tmp_path / "run"
    teacher_train.main(["--database", "Synthetic", "--data-root", str(tmp_path / "A"), *TEACHER, "--fold", "0",
                        "--out", str(run)])
    (run / "fold0" / "checkpoint.pt").rename(run / "fold0" / "resume.pt")  # as if interrupted (not read: refused first)
    (run / "results.csv").unlink()
    message = one_line_error(teacher_train.main, ["--resume", "--out", str(run), "--data-root", str(tmp_path / "B")])
    assert "started on the database" in message and str(tmp_path / "B") in message, message


def test_a_run_whose_args_json_is_gone(project, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(project["student"], run)
    (run / "args.json").unlink()
    message = one_line_error(mask_train.main, ["--resume", "--out", str(run)])
    assert "args.json is gone" in message and "new --out" in message, message
    message = one_line_error(mask_train.main, ["--database", str(project["db"]), "--kd", "none", "--folds", "2",
                                               *STUDENT, "--out", str(run)])
    assert "args.json is gone" in message and "another --out" in message, message
    assert kdoiqa.load(run, "cpu").folds == [0, 1]  # its finished folds still score


def test_split_flags_that_a_fold_file_overrides_are_refused(project, tmp_path):
    folds_file = project["db"] / "folds" / "k2_seed2023.json"
    message = one_line_error(teacher_train.main, ["--database", str(project["db"]), *TEACHER, "--folds-file",
                                                  str(folds_file), "--folds", "3", "--out", str(tmp_path / "t")])
    assert "--folds 3" in message and "2 folds" in message, message
    message = one_line_error(teacher_train.main, ["--database", str(project["db"]), *TEACHER, "--split-seed", "7",
                                                  "--folds-file", str(folds_file), "--out", str(tmp_path / "t")])
    assert "--split-seed 7" in message, message
    assert not (tmp_path / "t").exists()
