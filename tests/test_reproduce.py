"""Reproducing the paper: its own commands verbatim (small sizes added) on databases laid out as its
releases, reproduce.py end to end with its tables and a second call that redoes nothing, and the
student trained from the authors' released teacher features."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_release_layouts

from kdoiqa.databases import database_key, load_database

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
SMALL = ["--face-size", "16", "--erp-size", "32x16", "--no-pretrained", "--folds", "2", "--workers", "0",
         "--no-progress"]


def script(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, (argv, proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("releases")
    make_release_layouts(work / "data", contents=2, per_content=3)
    return work


def paper_command(cwd: Path, monkeypatch, capsys, command: str, *small: str) -> str:
    """Run one of the seed README's commands as typed (in this process, from `cwd`); its printed output."""
    import importlib

    words = command.split()
    assert words[0] == "python"
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    importlib.import_module(words[1].removesuffix(".py")).main([*words[2:], *small])
    return capsys.readouterr().out


def test_the_papers_commands_verbatim(releases, monkeypatch, capsys):
    """The seed README's commands, as typed, with small sizes added: --database defaults to OIQA, the
    paper's underscore flags work, feat_save.py and crossdb_feat.py find their teacher run."""
    cwd = releases
    paper_command(cwd, monkeypatch, capsys, "python img_resize.py --database=OIQA", "--erp-size", "32x16")
    assert len(list((cwd / "data" / "OIQA" / "erp_32x16" / "distorted_images").glob("img*.png"))) == 6
    paper_command(cwd, monkeypatch, capsys, "python teacher_train.py --database=OIQA", "--num_epochs", "1",
                  "--batch_size", "4", *SMALL)
    out = paper_command(cwd, monkeypatch, capsys, "python feat_save.py")
    assert re.search(r"teacher run: runs/teacher_train/OIQA-\w+/\S+ \(the latest finished teacher_train run of OIQA\)", out)
    key = database_key(load_database("OIQA", cwd / "data"))
    assert sorted(p.name for p in (cwd / "features" / key).iterdir()) == ["fold0.pt", "fold1.pt"]
    paper_command(cwd, monkeypatch, capsys, "python mask_train.py --database=OIQA", "--num_epochs", "2", "--kd-warmup",
                  "0", "--kd-feature-epochs", "1", "--batch_size", "4", *SMALL)
    paper_command(cwd, monkeypatch, capsys, "python teacher_crossdb_train.py --database_train=CVIQ --database_test=OIQA",
                  "--num_epochs", "1", *SMALL)
    out = paper_command(cwd, monkeypatch, capsys, "python crossdb_feat.py --database_train=CVIQ --database_test=OIQA")
    assert "the latest finished teacher_crossdb_train run of CVIQ -> OIQA" in out
    paper_command(cwd, monkeypatch, capsys, "python crossdb_train.py --database_train=CVIQ --database_test=OIQA",
                  "--num_epochs", "2", "--kd-warmup", "0", "--kd-feature-epochs", "1", *SMALL)
    runs = cwd / "runs"
    student = next((runs / "crossdb_train").glob("*/*-mask"))
    assert pd.read_csv(student / "fold0" / "predictions.csv")["image"].tolist() == load_database(
        "OIQA", cwd / "data").images  # tested on the database it was told, all of it
    assert json.loads((student / "args.json").read_text())["settings"]["optim"]["epochs"] == 2
    # and as a process, as typed (the one-line contract and the default database included)
    assert "OIQA" in script(cwd, "teacher_train.py", "--help").stdout


def test_reproduce_end_to_end_and_a_second_call_redoes_nothing(releases, tmp_path):
    out = tmp_path / "reproduction"
    argv = ["reproduce.py", "--data-root", str(releases / "data"), "--out", str(out), "--epochs", "1",
            "--kd-warmup", "0", "--kd-feature-epochs", "0", "--batch-size", "4", "--protocols", "paper", *SMALL]
    first = script(REPO, *argv).stdout
    assert "reproduction in" in first and "42 stages" in first and "left" in first
    tables = (out / "tables.md").read_text()
    assert "## Table 1 — protocol paper" in tables and "## Cross-database — protocol paper" in tables
    for row in ("teacher (cube faces)", "baseline (ERP, no KD)", "KD-OIQA (ERP, mask KD)",
                "teacher, the authors' (checkpoint names) | 0.942 | 0.956 | 0.935 | 0.942 | 0.908 | 0.884"):
        assert row in tables, row
    # Two paired folds: the mean difference, and no bootstrap interval (too few pairs to mean anything).
    assert re.search(r"\| OIQA \| 2 \| [+-]\d\.\d{3} \[no interval: 2 pair\(s\), 5 needed\]", tables)
    assert "| CVIQ → IQA-ODI |" in tables and "| IQA-ODI → OIQA |" in tables
    tex = (out / "tables.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 4 and r"$\pm$" in tex and tex.isascii()  # + per distortion type
    assert "### SRCC per distortion type — protocol paper" in tables
    effects = json.loads((out / "effects.json").read_text())
    assert len(effects) == 3 and all(e["pairs"] == 2 for e in effects)
    # The paired difference, recomputed from the two students' results.csv.
    mask = pd.read_csv(out / "paper" / "seed2023" / "OIQA" / "student_mask" / "results.csv", dtype={"fold": str})
    none = pd.read_csv(out / "paper" / "seed2023" / "OIQA" / "student_none" / "results.csv", dtype={"fold": str})
    diff = (mask.set_index("fold").loc[["0", "1"], "srcc"] - none.set_index("fold").loc[["0", "1"], "srcc"]).mean()
    oiqa = next(e for e in effects if e["protocol"] == "paper" and e["database"] == "OIQA")
    assert oiqa["d_srcc"] == pytest.approx(diff) and np.isnan(oiqa["d_srcc_low"]) and np.isnan(oiqa["d_srcc_high"])
    paper_teacher = json.loads((out / "paper" / "seed2023" / "CVIQ" / "teacher" / "args.json").read_text())
    assert paper_teacher["settings"]["model"]["face_batchnorm"] == "per-face"
    assert (releases / "data" / "CVIQ" / "faces_16_equi2cubic_jpeg75").is_dir()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    second = script(REPO, *argv).stdout
    assert second.count("done, skipped") == 42 and "training in" not in second and "resuming" not in second
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps
    assert (out / "tables.md").read_text() == tables


# ----------------------------------------------------------------------------------------------
# The authors' released features.

def write_authors_release(releases: Path, tmp_path: Path) -> Path:
    """Their fold CSVs (absolute paths of their machine) and features/OIQA/<fold>/<id>.npy files."""
    db = load_database("OIQA", releases / "data")
    number = re.compile(r"img(\d+)")
    ids = [str(int(number.search(x)[1])).rjust(3, "0") for x in db.images]
    refs = db.refs()
    folds_dir, features = tmp_path / "authors_folds", tmp_path / "features" / "OIQA"
    folds_dir.mkdir(parents=True)
    contents = sorted(set(refs))
    for k, test_ref in enumerate(contents, start=1):
        for kind, tested in (("train", False), ("test", True)):
            lines = [f"/home1/mpc/Dataset/OIQA/{i}.png,50" for i, r in zip(ids, refs) if (r == test_ref) == tested]
            (folds_dir / f"OIQA_{kind}c_{k}.csv").write_text("\n".join(lines) + "\n")
        (features / str(k)).mkdir(parents=True)
        for j, i in enumerate(ids):  # as their feat_save.py wrote them: torch.save of a [1, 512] tensor
            torch.save(torch.full((1, 512), float(100 * k + j), requires_grad=True), features / str(k) / f"{i}.npy")
    return folds_dir


def test_student_from_the_authors_features(releases, tmp_path, monkeypatch, capsys):
    import dataset
    from kdoiqa import common

    cwd = tmp_path
    (cwd / "data").symlink_to(releases / "data")
    folds_dir = write_authors_release(releases, tmp_path)
    authors = tmp_path / "features" / "OIQA"
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        common.run_cli(lambda: paper_command(cwd, monkeypatch, capsys, f"python feat_save.py --from-authors {authors}"))
    err = capsys.readouterr().err
    assert "folds/authors.json" in err and "--authors DIR" in err and err.count("\n") == 1
    dataset.main(["folds", "--database", "OIQA", "--authors", str(folds_dir)])
    out = paper_command(cwd, monkeypatch, capsys, f"python feat_save.py --from-authors {authors}")
    assert "the authors' fold 2" in out and "next: python mask_train.py --database OIQA" in out
    db = load_database("OIQA", cwd / "data")
    cache = cwd / "features" / database_key(db)
    record = torch.load(cache / "fold1.pt", weights_only=True)
    assert record["provenance"]["kind"] == "authors' release" and record["names"] == db.images
    np.testing.assert_array_equal(record["feats"][:, 0].numpy(), [200.0 + j for j in range(len(db))])
    paper_command(cwd, monkeypatch, capsys, "python mask_train.py --database=OIQA", "--num_epochs", "2", "--kd-warmup",
                  "0", "--kd-feature-epochs", "1", "--batch_size", "4", "--face-size", "16", "--erp-size", "32x16",
                  "--no-pretrained", "--workers", "0", "--no-progress")
    student = next((cwd / "runs" / "mask_train").glob("*/*-mask"))
    assert json.loads((student / "args.json").read_text())["folds"]["path"].endswith("authors.json")


@pytest.mark.parametrize("damage,needle", [("missing", "missing"), ("extra", "names no image"),
                                           ("shape", "expected a [1, 512] tensor"), ("torn", "not a readable")])
def test_a_bad_authors_file_is_one_line_naming_it(releases, tmp_path, damage, needle):
    from kdoiqa import stages
    from kdoiqa.common import UserError, user_message
    from kdoiqa.folds import write_folds
    from kdoiqa.prepare import import_author_folds

    folds_dir = write_authors_release(releases, tmp_path)
    db = load_database("OIQA", releases / "data")
    authors = write_folds(import_author_folds(db, folds_dir), tmp_path / "authors.json")
    fold = tmp_path / "features" / "OIQA" / "2"
    victim = fold / "001.npy"
    if damage == "missing":
        victim.unlink()
    elif damage == "extra":
        torch.save(torch.zeros(1, 512), fold / "999.npy")
        victim = fold / "999.npy"
    elif damage == "shape":
        torch.save(torch.zeros(1, 10), victim)
    else:
        victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(UserError) as err:
        stages.save_authors_features(str(releases / "data" / "OIQA"), None, str(tmp_path / "features"),
                                     str(tmp_path / "cache"), folds_file=str(authors))
    message = user_message(err.value)
    assert "\n" not in message and str(victim) in message and needle in message, message
    assert not (tmp_path / "cache" / "fold1.pt").exists()  # nothing of the damaged fold written
