"""What a newcomer hits in the first hour: no silent wrong results (a distillation that never starts,
folds that change, caches of another database, odd shapes), resume from args.json, one-line errors
whose suggested command fixes them, small checkpoints, scripts that say what comes next."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_db

import demo
import feat_save
import mask_train
import teacher_train
from kdoiqa import cli, common
from kdoiqa.databases import database_key, load_database
from kdoiqa.folds import make_folds, write_folds

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--erp-size", "32x16",
        "--batch-size", "4"]


def run(*argv: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout,
                          check=False)


def error_line(capsys, main, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        common.run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def suggested(message: str) -> list[str]:
    """The command in backticks of an error line, as argv."""
    commands = re.findall(r"`([^`]+)`", message)
    assert commands, message
    return shlex.split(commands[0])


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return make_tiny_db(tmp_path_factory.mktemp("hour") / "Tiny", contents=4, levels=3, seed=41)


# ----------------------------------------------------------------------------------------------
# Silent wrong results.

def test_a_distillation_that_never_starts_is_refused(db, tmp_path, capsys):
    out = tmp_path / "run"
    err = error_line(capsys, mask_train.main, ["--database", str(db), "--epochs", "3", "--out", str(out), *FAST])
    assert "--kd mask with --epochs 3" in err and "starts at epoch 11" in err and "--kd-warmup 5" in err
    err = error_line(capsys, mask_train.main, ["--database", str(db), "--kd", "feature", "--epochs", "2",
                                               "--kd-warmup", "2", "--out", str(out), *FAST])
    assert "--kd feature" in err and "starts at epoch 3" in err
    assert not out.exists()


def test_the_kd_mode_is_shown_everywhere(db, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/..., lands here and not in the repository
    mask_train.main(["--database", str(db), "--kd", "none", "--folds", "2", "--fold", "0", "--epochs", "1", *FAST])
    printed = capsys.readouterr().out
    run_dir = next((Path("runs") / "mask_train" / database_key(load_database(db))).glob("*-none"))
    try:
        assert "mask_train (kd none, protocol ours)" in printed
        table = (run_dir / "results.csv").read_text()
        assert "kd" in table.splitlines()[0] and ",none," in table
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "fold0"), size_guidance={"tensors": 0})
        events.Reload()
        texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("run/text_summary")]
        assert any("kd none" in t for t in texts)
    finally:
        shutil.rmtree(Path("runs") / "mask_train" / database_key(load_database(db)))


def test_the_split_belongs_to_the_database(db, tmp_path, capsys):
    """One default split per database, whatever the training seed; the baseline and the KD student on one
    split; a baseline on another split than its teacher's features says so."""
    teacher = tmp_path / "teacher"
    teacher_train.main(["--database", str(db), "--folds", "2", "--epochs", "1", "--seed", "7", "--out", str(teacher),
                        *FAST])
    feats = tmp_path / "features"
    feat_save.main(["--database", str(db), "--run", str(teacher), "--features-dir", str(feats), "--workers", "0",
                    "--no-progress"])
    baseline = tmp_path / "baseline"
    mask_train.main(["--database", str(db), "--kd", "none", "--folds", "2", "--fold", "0", "--epochs", "1",
                     "--seed", "9", "--features-dir", str(feats), "--out", str(baseline), *FAST])
    records = [json.loads((r / "args.json").read_text())["folds"] for r in (teacher, baseline)]
    assert records[0] == records[1] and records[0]["path"].endswith("k2_seed2023.json")
    other = write_folds(make_folds(load_database(db), 2, seed=99), db / "folds" / "other.json")
    capsys.readouterr()
    mask_train.main(["--database", str(db), "--kd", "none", "--folds-file", str(other), "--fold", "0", "--epochs", "1",
                     "--features-dir", str(feats), "--out", str(tmp_path / "other"), *FAST])
    assert "differs from the split of the teacher features" in capsys.readouterr().err


def test_two_databases_of_one_name_never_share_a_cache(tmp_path, capsys):
    """Two synthetic databases named alike (as every one was): their run and feature folders differ, and
    one's features are refused for the other."""
    a, b = (make_tiny_db(tmp_path / name, contents=4, levels=2, seed=s) for name, s in (("a", 1), ("b", 2)))
    for root in (a, b):
        (root / "database.json").write_text(json.dumps({"name": "Synthetic"}))
    da, dbb = load_database(a), load_database(b)
    assert da.name == dbb.name == "Synthetic" and database_key(da) != database_key(dbb)
    teacher = tmp_path / "teacher"
    teacher_train.main(["--database", str(a), "--folds", "2", "--epochs", "1", "--out", str(teacher), *FAST])
    feats = tmp_path / "features"
    feat_save.main(["--database", str(a), "--run", str(teacher), "--features-dir", str(feats), "--workers", "0",
                    "--no-progress"])
    err = error_line(capsys, mask_train.main, ["--database", str(b), "--features-dir", str(feats), "--folds-file",
                                               str(json.loads((teacher / "args.json").read_text())["folds"]["path"]),
                                               "--epochs", "1", "--kd-warmup", "0", "--kd-feature-epochs", "0",
                                               "--out", str(tmp_path / "x"), *FAST])
    assert database_key(da) in err and database_key(dbb) in err and not (tmp_path / "x").exists()
    err = error_line(capsys, feat_save.main, ["--database", str(b), "--run", str(teacher), "--workers", "0"])
    assert "a teacher of" in err and database_key(da) in err


def test_the_synthetic_maker_names_the_database_after_its_folder(tmp_path):
    proc = run("make_synthetic_db.py", "--out", str(tmp_path / "MyScenes"), "--contents", "1", "--size", "128x64",
               "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert load_database(tmp_path / "MyScenes").name == "MyScenes"


@pytest.mark.parametrize("size", ["128", "64x128", "100x60"])
def test_an_erp_size_is_two_to_one(size, capsys):
    err = error_line(capsys, mask_train.main, ["--erp-size", size])
    assert "--erp-size" in err and "twice as wide as high" in err


# ----------------------------------------------------------------------------------------------
# Resume.

def test_resume_compares_only_what_is_given_and_reports_every_mismatch(db, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--database", str(db), "--folds", "2", "--fold", "0", "--kd", "none", "--out", str(out), *FAST]
    mask_train.main([*base, "--epochs", "1"])
    err = error_line(capsys, mask_train.main, ["--resume", "--out", str(out), "--epochs", "4", "--lr", "1e-3",
                                               "--fold", "1", "--weights", str(db / "meta.csv")])
    for flag in ("--epochs was 1, now 4", "--lr was 0.0002, now 0.001", "--fold was 0, now 1", "--weights was None"):
        assert flag in err, (flag, err)
    err = error_line(capsys, mask_train.main, ["--resume", "--out", str(out), "--arch", "resnet34"])
    assert "--arch was 'resnet18'" in err
    pretrained = tmp_path / "pretrained"  # a run started with ImageNet weights, resumed with --no-pretrained
    shutil.copytree(out, pretrained)
    record = json.loads((pretrained / "args.json").read_text())
    record["args"]["pretrained"] = True
    (pretrained / "args.json").write_text(json.dumps(record))
    err = error_line(capsys, mask_train.main, ["--resume", "--out", str(pretrained), "--no-pretrained"])
    assert "--no-pretrained (pretrained) was True, now False" in err
    err = error_line(capsys, teacher_train.main, ["--resume", "--out", str(out)])
    assert "a mask_train run" in err
    # Flags that do not change what is trained may differ; the rest comes from args.json.
    mask_train.main(["--resume", "--out", str(out), "--workers", "0", "--no-progress", "--device", "cpu"])
    assert "re-reported" in capsys.readouterr().out


def test_ctrl_c_prints_the_command_that_continues_the_run(db, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "teacher_train.py", "--database", str(db), "--folds", "2", "--fold", "0",
                             "--epochs", "50", "--out", str(out), *FAST], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "fold0" / "log.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # held until the epoch in progress ends, whose state is then saved
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert lines[-1] == f"interrupted; continue it with: python teacher_train.py --resume --out {out}"
    assert "stopping after this epoch" in err
    assert torch.load(out / "fold0" / "resume.pt", weights_only=True)["epoch"] >= 1
    cont = run("teacher_train.py", "--resume", "--out", str(out), "--epochs", "2", "--no-progress")
    assert cont.returncode == 2 and "--epochs was 50, now 2" in cont.stderr  # only what is given is compared


# ----------------------------------------------------------------------------------------------
# Errors: one line, nothing half-made, and the advice works.

def test_a_data_loading_worker_error_is_one_line(db, tmp_path):
    root = tmp_path / "Broken"
    shutil.copytree(db, root)
    victim = root / "images" / "c2_blur1.png"
    victim.write_bytes(victim.read_bytes()[:200])
    out = tmp_path / "run"
    for cache in ("cpu", "none"):
        proc = run("teacher_train.py", "--database", str(root), "--folds", "2", "--epochs", "1", "--out", str(out),
                   "--no-pretrained", "--workers", "2", "--cache", cache, "--no-progress", "--face-size", "16")
        # (the split is written and said once, on the first call, when no earlier test has made it)
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("wrote ")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and "c2_blur1.png" in lines[0] and "Traceback" not in lines[0]
        assert not out.exists()


def test_each_suggested_command_fixes_its_error(db, tmp_path, capsys):
    root = tmp_path / "Db"
    shutil.copytree(db, root)
    (root / "folds").mkdir(exist_ok=True)

    # A fold file that does not exist: the command writes exactly that file.
    missing = root / "folds" / "k3_seed5.json"
    err = error_line(capsys, teacher_train.main, ["--database", str(root), "--folds-file", str(missing), *FAST])
    assert run(*suggested(err)[1:]).returncode == 0 and missing.is_file()

    # Features that do not exist: the command writes them where the student looks (the latest teacher run).
    feats = tmp_path / "feats"
    teacher = tmp_path / "teacher"
    teacher_train.main(["--database", str(root), "--folds", "2", "--epochs", "1", "--out", str(teacher), *FAST])
    student = ["--database", str(root), "--features-dir", str(feats), "--epochs", "1", "--kd-warmup", "0",
               "--kd-feature-epochs", "0", "--fold", "0", *FAST]
    err = error_line(capsys, mask_train.main, [*student, "--out", str(tmp_path / "s1")])
    command = suggested(err)
    assert command[:2] == ["python", "feat_save.py"]
    proc = run(*command[1:], "--run", str(teacher), "--workers", "0")  # (the run named: runs/ is not under the test)
    assert proc.returncode == 0, proc.stderr
    mask_train.main([*student, "--out", str(tmp_path / "s2")])

    # Stale features (the teacher retrained): the rebuild command.
    ckpt = teacher / "fold0" / "checkpoint.pt"
    record = torch.load(ckpt, weights_only=True)
    record["model"]["head.bias"] += 1
    torch.save(record, ckpt)
    err = error_line(capsys, mask_train.main, [*student, "--out", str(tmp_path / "s3")])
    assert "stale" in err
    assert run(*suggested(err)[1:], "--workers", "0").returncode == 0
    mask_train.main([*student, "--out", str(tmp_path / "s4")])

    # Faces required on disk but absent: the extraction command.
    err = error_line(capsys, teacher_train.main, ["--database", str(root), "--folds", "2", "--epochs", "1",
                                                  "--faces", "disk", "--out", str(tmp_path / "t"), *FAST])
    assert run(*suggested(err)[1:], "--device", "cpu").returncode == 0
    teacher_train.main(["--database", str(root), "--folds", "2", "--epochs", "1", "--faces", "disk",
                        "--out", str(tmp_path / "t"), *FAST])

    # An empty data root for Synthetic: the maker, not `prepare`.
    data_root = tmp_path / "data"
    err = error_line(capsys, teacher_train.main, ["--database", "Synthetic", "--data-root", str(data_root), *FAST])
    command = suggested(err)
    assert command[:2] == ["python", "make_synthetic_db.py"]
    assert run(*command[1:], "--contents", "2", "--size", "128x64", "--workers", "1").returncode == 0
    assert load_database("Synthetic", data_root).name == "Synthetic"


def test_an_unfinished_teacher_fold_names_the_resume(db, tmp_path, capsys):
    run_dir = tmp_path / "teacher"
    teacher_train.main(["--database", str(db), "--folds", "2", "--fold", "0", "--epochs", "1", "--out", str(run_dir),
                        *FAST])
    (run_dir / "fold0" / "checkpoint.pt").rename(run_dir / "fold0" / "resume.pt")
    err = error_line(capsys, feat_save.main, ["--database", str(db), "--run", str(run_dir), "--fold", "0",
                                              "--features-dir", str(tmp_path / "f"), "--workers", "0"])
    assert f"python teacher_train.py --resume --out {run_dir}" in err and not (tmp_path / "f").exists()


# ----------------------------------------------------------------------------------------------
# Friction.

def test_a_finished_fold_checkpoint_is_small(db, tmp_path):
    """ResNet-18: one copy of the weights (~45 MB), no optimiser state, once the fold is finished."""
    teacher = tmp_path / "teacher"
    teacher_train.main(["--database", str(db), "--folds", "2", "--fold", "0", "--epochs", "1", "--out", str(teacher),
                        *FAST])
    size = (teacher / "fold0" / "checkpoint.pt").stat().st_size
    assert size < 50 * 2**20, size
    params = sum(v.numel() * v.element_size() for v in torch.load(teacher / "fold0" / "checkpoint.pt",
                                                                   weights_only=True)["model"].values())
    assert size < 1.02 * params  # the weights once, and little else


def test_scripts_say_what_comes_next(db, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    teacher_train.main(["--database", str(db), "--folds", "2", "--fold", "0", "--epochs", "1", "--out", str(teacher),
                        *FAST])
    assert f"next: python feat_save.py --database {db} --run {teacher}" in capsys.readouterr().out
    feat_save.main(["--database", str(db), "--run", str(teacher), "--features-dir", str(tmp_path / "f"),
                    "--workers", "0", "--no-progress"])
    assert f"next: python mask_train.py --database {db} --features-dir {tmp_path / 'f'}" in capsys.readouterr().out


def test_demo_checks_its_arguments_before_any_work(tmp_path, capsys):
    for argv, needle in ((["--kd", "mask,bogus"], "--kd"), (["--size", "300x100"], "--size"),
                         (["--folds", "9"], "--folds"), (["--student-epochs", "3"], "--student-epochs")):
        err = error_line(capsys, demo.main, ["--out", str(tmp_path / "demo"), *argv])
        assert needle in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("script", ["teacher", "student", "cross-teacher", "cross-student", "features"])
def test_help_shows_every_default(script):
    parser = {"teacher": cli.teacher_parser(), "student": cli.student_parser(),
              "cross-teacher": cli.teacher_parser(cross=True), "cross-student": cli.student_parser(cross=True),
              "features": cli.features_parser()}[script]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help in (None, "==SUPPRESS==") or action.nargs == 0:
            continue  # on/off flags say what they do; their default is off
        shown = formatter._expand_help(action)
        assert "default" in shown, (action.option_strings[0], shown)


# ----------------------------------------------------------------------------------------------
# The README's first hour, as written, in a fresh copy of the repository.

def test_readme_first_hour_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## The first hour\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c]
    assert commands[0].startswith("make venv && source .venv/bin/activate")  # the stated set-up step
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    next_hint = ""
    for command in commands[1:]:  # the set-up step is this interpreter's environment
        argv = shlex.split(command)
        assert argv[0] == "python", command
        if argv[1] == "predict.py":
            # The placeholders: the run that mask_train.py named in its "next:" line (with an image of the
            # database), and a folder of photos.
            assert re.fullmatch(r"python predict\.py runs/mask_train/\S+/\S+ data/Synthetic/images/\S+\.png", next_hint), \
                next_hint
            assert argv[2] == "runs/mask_train/<key>/<run>" and argv[3] == "my_360_photos/"
            argv[2] = next_hint.split()[2]
            photos = clone / "my_360_photos"
            photos.mkdir()
            for image in sorted((clone / "data" / "Synthetic" / "images").glob("*.png"))[:2]:
                shutil.copy(image, photos / image.name)
        proc = run(*argv[1:], cwd=clone, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        hints = [line[len("next: "):] for line in proc.stdout.splitlines() if line.startswith("next: ")]
        next_hint = hints[-1] if hints else ""
    assert "± " in proc.stdout or "mean" in proc.stdout  # predict.py's per-image mean and spread
