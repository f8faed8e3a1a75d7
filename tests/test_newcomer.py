"""A newcomer's first day on their own panoramas: no silent wrong results (runs written into a database
folder, two copies of a database sharing runs and caches, a baseline on another split), records that
survive a resume, tables that compile, hints that keep the user's flags, per-distortion results."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_db
from PIL import Image

import feat_save
import mask_train
import teacher_train
from kdoiqa import paper_tables
from kdoiqa.common import UserError
from kdoiqa.databases import database_key, load_database

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--erp-size", "32x16",
        "--batch-size", "4"]


def error_line(capsys, fn, argv) -> str:
    with pytest.raises(UserError) as info:
        fn(argv)
    return str(info.value)


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# ----------------------------------------------------------------------------------------------
# 1. reproduce.py with a database given as a folder.

def test_reproduce_with_a_database_folder_writes_under_out_only(tmp_path):
    db = make_tiny_db(tmp_path / "panos" / "MyPanos", contents=3, levels=2, seed=21)
    before = tree(db)
    out = tmp_path / "elsewhere" / "reproduction"
    proc = subprocess.run([sys.executable, "reproduce.py", "--databases", str(db), "--protocols", "ours", "--out", str(out),
                           "--epochs", "1", "--kd-warmup", "0", "--kd-feature-epochs", "0", "--batch-size", "4",
                           "--folds", "2", "--no-cross", *FAST], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only the derived files the design puts beside a database (faces, resized ERPs, its split) are new there.
    added = {p.split("/")[0] for p in tree(db) - before}
    assert added <= {"faces_16", "erp_32x16", "folds"}, added
    runs = out / "ours" / "seed2023" / "MyPanos"
    assert {p.name for p in runs.iterdir()} == {"teacher", "features", "student_mask", "student_none"}
    assert (runs / "student_mask" / "results.csv").is_file()
    tables = (out / "tables.md").read_text()
    assert "MyPanos SRCC" in tables and str(db) not in tables
    assert "the authors'" not in tables  # no empty row of the authors' teacher for a database of one's own
    assert "### SRCC per distortion type — protocol ours" in tables and "| MyPanos | KD-OIQA (ERP, mask KD) |" in tables


# ----------------------------------------------------------------------------------------------
# 2. A copy of a database with the same meta.csv and other images.

def test_a_copy_with_other_images_shares_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = make_tiny_db(tmp_path / "Orig" / "Pano", contents=3, levels=2, seed=5)
    copy = tmp_path / "Copy" / "Pano"
    shutil.copytree(original, copy)  # times kept: the same key until an image changes
    assert database_key(load_database(copy)) == database_key(load_database(original))
    for image in sorted((copy / "images").glob("*.png")):  # re-encoded: other pixels, other sizes
        Image.open(image).convert("L").convert("RGB").save(image)
    assert database_key(load_database(copy)) != database_key(load_database(original))

    base = ["--folds", "2", "--epochs", "1", *FAST]
    teacher_train.main(["--database", str(original), *base, "--out", str(tmp_path / "teacher")])
    feat_save.main(["--database", str(original), "--run", str(tmp_path / "teacher"), "--no-progress", "--workers", "0"])
    # The copy finds neither the original's teacher run nor its features; naming them is refused in one line.
    err = error_line(capsys, feat_save.main, ["--database", str(copy), "--no-progress"])
    assert "teacher" in err and "\n" not in err
    err = error_line(capsys, feat_save.main, ["--database", str(copy), "--run", str(tmp_path / "teacher")])
    assert "a teacher of Pano-" in err and str(copy) in err
    cache = tmp_path / "features" / database_key(load_database(original))
    err = error_line(capsys, mask_train.main, ["--database", str(copy), "--features-dir", str(cache), *base,
                                              "--kd-warmup", "0", "--kd-feature-epochs", "0"])
    assert "features of database" in err and "not of" in err
    assert not (tmp_path / "features" / database_key(load_database(copy))).exists()


# ----------------------------------------------------------------------------------------------
# 3. The baseline's split.

def test_the_baseline_takes_its_teachers_split(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = make_tiny_db(tmp_path / "Three", contents=3, levels=2, seed=8)
    teacher_train.main(["--database", str(db), "--folds", "3", "--epochs", "1", *FAST, "--out", str(tmp_path / "t")])
    feat_save.main(["--database", str(db), "--run", str(tmp_path / "t"), "--no-progress", "--workers", "0"])
    capsys.readouterr()
    mask_train.main(["--database", str(db), "--kd", "none", "--epochs", "1", *FAST, "--out", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert "baseline on the split of the teacher features" in out and "k3_seed2023.json" in out
    folds = pd.read_csv(tmp_path / "none" / "results.csv", dtype={"fold": str})["fold"]
    assert [f for f in folds if f.isdigit()] == ["0", "1", "2"]  # the teacher's 3 folds, not the default 5
    teacher = json.loads((tmp_path / "t" / "args.json").read_text())["folds"]["sha256"]
    assert json.loads((tmp_path / "none" / "args.json").read_text())["folds"]["sha256"] == teacher


# ----------------------------------------------------------------------------------------------
# 5. A resumed run keeps its first command and commit.

def test_resume_keeps_the_first_command_and_commit(tiny_db, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = ["teacher_train.py", "--database", str(tiny_db), "--folds", "2", "--fold", "0", "--epochs", "1", *FAST,
             "--out", str(run)]
    monkeypatch.setattr(sys, "argv", first)
    teacher_train.main(first[1:])
    record = json.loads((run / "args.json").read_text())
    record["git_commit"] = "0123abc"  # as if trained at another commit
    (run / "args.json").write_text(json.dumps(record))
    for _ in range(2):
        again = ["teacher_train.py", "--resume", "--out", str(run), "--no-progress"]
        monkeypatch.setattr(sys, "argv", again)
        teacher_train.main(again[1:])
    record = json.loads((run / "args.json").read_text())
    assert record["argv"] == first and record["git_commit"] == "0123abc"
    assert [r["argv"] for r in record["resumed"]] == [again, again]
    assert all("time" in r and "git_commit" in r for r in record["resumed"])


# ----------------------------------------------------------------------------------------------
# 6. tables.tex compiles.

def _runs(tmp_path: Path, name: str, n_folds: int) -> dict:
    rng = np.random.default_rng(0)
    runs = {}
    for model in ("teacher", "none", "mask"):
        folder = tmp_path / f"{name}-{model}"
        folder.mkdir()
        pd.DataFrame({"fold": list(range(n_folds)), "srcc": rng.random(n_folds), "plcc": rng.random(n_folds)}
                     ).to_csv(folder / "results.csv", index=False)
        runs[(name, model, 2023)] = folder
    return runs


def test_latex_tables_are_escaped_and_compile(tmp_path):
    name = "my_db 100%&#1"
    table1, effect, records = paper_tables.within_tables(_runs(tmp_path, name, 2), [name], "ours", tex=True)
    cross = paper_tables.cross_table({(name, "B_2", "mask", 1): tmp_path / f"{name}-mask"}, tex=True)
    for text in (table1, effect, cross):
        assert text.isascii(), text
        for raw in ("Δ", "→", "±", "–"):
            assert raw not in text
    assert r"my\_db 100\%\&\#1" in table1 and r"95\% CI" in effect and r"$\Delta$ SRCC" in effect
    assert r"$\rightarrow$ B\_2" in cross
    assert "no interval: 2 pair(s), 5 needed" in effect and np.isnan(records[0]["d_srcc_low"])
    engine = shutil.which("pdflatex")
    if engine is None:
        return  # the escaping above is what a LaTeX engine needs; none is installed here to compile it
    doc = tmp_path / "tables.tex"
    doc.write_text("\\documentclass{article}\n\\begin{document}\n" + "\n\n".join((table1, effect, cross))
                   + "\n\\end{document}\n")
    proc = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_the_paired_interval_from_enough_pairs(tmp_path):
    _, _, records = paper_tables.within_tables(_runs(tmp_path, "DB", 6), ["DB"], "ours")
    record = records[0]
    assert record["pairs"] == 6 and record["d_srcc_low"] <= record["d_srcc"] <= record["d_srcc_high"]


# ----------------------------------------------------------------------------------------------
# 10. Hints, help, protocol line, meta.csv delimiter.

def test_next_hints_keep_the_users_flags(tiny_db, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher_train.main(["--database", str(tiny_db), "--folds", "2", "--fold", "0", "--epochs", "1", *FAST,
                        "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert f"next: python feat_save.py --database {tiny_db} --run {tmp_path / 't'} --workers 0" in out
    assert "protocol ours:" in out and "one backbone call over all faces" in out
    feat_save.main(["--database", str(tiny_db), "--run", str(tmp_path / "t"), "--no-progress", "--workers", "0"])
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next: ")][-1]
    assert hint.startswith(f"next: python mask_train.py --database {tiny_db}")
    for flag in ("--no-pretrained", "--erp-size 32x16", "--workers 0"):
        assert flag in hint, (flag, hint)
    mask_train.main(["--database", str(tiny_db), "--fold", "0", "--epochs", "1", "--kd", "none", *FAST,
                     "--out", str(tmp_path / "s"), "--folds", "2"])
    out = capsys.readouterr().out
    protocol = next(line for line in out.splitlines() if line.startswith("protocol ours:"))
    assert "faces" not in protocol and "cosine rate" in protocol


def test_student_help_lists_no_teacher_only_flags():
    from kdoiqa import cli

    text = cli.student_parser("mask_train.py").format_help()
    for flag in ("--face-size", "--faces", "--face-jpeg-quality", "--face-batchnorm"):
        assert flag not in text, flag
    teacher = cli.teacher_parser("teacher_train.py").format_help()
    assert "--face-batchnorm" in teacher and "--face-size" in teacher
    # Still accepted: a command line shared with the teacher works for the student.
    assert cli.student_parser().parse_args(["--face-size", "64"]).face_size == 64


def test_a_semicolon_separated_meta_csv_gets_a_hint(tmp_path):
    db = make_tiny_db(tmp_path / "Semi", contents=2, levels=2)
    meta = db / "meta.csv"
    meta.write_text(meta.read_text().replace(",", ";"))
    with pytest.raises(UserError, match="separated by semicolons: meta.csv is comma-separated"):
        load_database(db)


# ----------------------------------------------------------------------------------------------
# 11. Per-distortion results.

def test_results_per_distortion_type(tiny_db, tmp_path):
    run = tmp_path / "run"
    teacher_train.main(["--database", str(tiny_db), "--folds", "2", "--epochs", "1", *FAST, "--out", str(run)])
    table = pd.read_csv(run / "results.csv", dtype={"fold": str})
    assert {"srcc_blur", "plcc_blur"} <= set(table.columns)
    preds = pd.read_csv(run / "predictions.csv")
    meta = pd.read_csv(tiny_db / "meta.csv")
    for k in (0, 1):
        rows = preds[preds["fold"] == k].merge(meta, on="image")
        blur = rows[rows["distortion"] == "blur"]
        from scipy.stats import spearmanr

        expected = spearmanr(blur["prediction"], blur["mos_x"]).statistic
        assert table.set_index("fold").loc[str(k), "srcc_blur"] == pytest.approx(expected, abs=1e-6)
    assert torch.load(run / "fold0" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_an_undefined_per_distortion_srcc_is_na_and_left_out_of_the_mean(tmp_path, capsys):
    """Every reference of fold 0's test contents scores the same (as a DMOS's references all score 0): its
    reference SRCC is undefined, written n/a, left out of the mean, and the mean says how many folds it has."""
    db = make_tiny_db(tmp_path / "Flat", contents=6, levels=2, seed=31)
    meta = pd.read_csv(db / "meta.csv")
    first = meta["ref"].isin(["c0", "c1", "c2"])
    meta.loc[first & (meta["distortion"] == "reference"), "mos"] = 90.0
    meta.to_csv(db / "meta.csv", index=False)
    test0 = meta.loc[first, "image"].tolist()
    test1 = meta.loc[~first, "image"].tolist()
    folds = tmp_path / "folds.json"
    folds.write_text(json.dumps({"folds": [{"train": test1, "test": test0}, {"train": test0, "test": test1}],
                                 "source": "by hand"}))
    run = tmp_path / "run"
    teacher_train.main(["--database", str(db), "--folds-file", str(folds), "--epochs", "1", *FAST, "--out", str(run)])
    printed = capsys.readouterr().out
    table = pd.read_csv(run / "results.csv", dtype={"fold": str}).set_index("fold")
    preds = pd.read_csv(run / "predictions.csv").merge(meta, on="image", suffixes=("", "_meta"))
    refs = preds[(preds["fold"] == 1) & (preds["distortion"] == "reference")]
    from scipy.stats import spearmanr

    expected = spearmanr(refs["prediction"], refs["mos"]).statistic
    assert np.isnan(table.loc["0", "srcc_reference"]) and np.isnan(table.loc["0", "plcc_reference"])
    assert table.loc["1", "srcc_reference"] == pytest.approx(expected, abs=1e-6)
    assert table.loc["mean", "srcc_reference"] == pytest.approx(expected, abs=1e-6)  # fold 1's alone, not (0 + x) / 2
    assert table.loc["mean", "folds_srcc_reference"] == 1 and table.loc["mean", "folds_srcc_blur"] == 2
    raw = (run / "results.csv").read_text().splitlines()
    header = raw[0].split(",")
    assert raw[1].split(",")[header.index("srcc_reference")] == "n/a"
    line = next(x for x in printed.splitlines() if x.startswith("SRCC by distortion type"))
    assert f"reference {expected:.3f} (1 of 2 folds)" in line and "blur " in line and "blur n/a" not in line
    assert "(2 of 2" not in line


def test_the_distortion_table_counts_the_folds_of_each_mean(tmp_path):
    nan = float("nan")
    runs = {}
    for model, values in (("teacher", [0.5, nan, 0.7]), ("mask", [nan, nan, nan])):
        folder = tmp_path / model
        folder.mkdir()
        pd.DataFrame({"fold": [0, 1, 2], "srcc": [0.9, 0.8, 0.7], "plcc": [0.9, 0.8, 0.7],
                      "srcc_blur": [0.4, 0.5, 0.6], "srcc_reference": values}).to_csv(folder / "results.csv", index=False,
                                                                                      na_rep="n/a")
        runs[("DB", model, 2023)] = folder
    text = paper_tables.distortion_table(runs, ["DB"])
    teacher = next(row for row in text.splitlines() if "teacher" in row)
    mask = next(row for row in text.splitlines() if "mask KD" in row)
    assert f"0.600 ± {np.std([0.5, 0.7], ddof=1):.3f} (2 of 3 folds)" in teacher
    assert f"0.500 ± {np.std([0.4, 0.5, 0.6], ddof=1):.3f} |" in teacher  # every fold: no count
    assert "n/a (0 of 3 folds)" in mask


def test_the_tables_say_which_fit_their_plcc_came_after(tmp_path):
    runs = _runs(tmp_path, "DB", 2)
    for i, folder in enumerate(runs.values()):
        table = pd.read_csv(folder / "results.csv")
        table["fit_requested"] = "paper"
        table["fit_fallback"] = ["paper fit_function raised TypeError (...)" if i == 0 else None, None]
        table.to_csv(folder / "results.csv", index=False)
    table1, _, _ = paper_tables.within_tables(runs, ["DB"], "paper")
    assert table1.splitlines()[-1] == "| PLCC after |  | paper fit_function, fallback in 1 of 6 folds |"
    cross = paper_tables.cross_table({("DB", "B", "mask", 1): tmp_path / "DB-none"})
    assert cross.splitlines()[-1].startswith("| PLCC after: paper fit_function |")
    (tmp_path / "old").mkdir()
    bare, _, _ = paper_tables.within_tables(_runs(tmp_path / "old", "DB", 2), ["DB"], "ours")
    assert "PLCC after" not in bare  # runs from before the fit was recorded: no row
