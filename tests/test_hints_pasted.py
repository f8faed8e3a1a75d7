"""The `next:` hints of the data scripts are commands that work when pasted, also for paths with spaces."""
from __future__ import annotations

import shlex
import shutil

import pytest
from conftest import make_tiny_db

import dataset_cross
import img_resize


def next_command(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.startswith("next: ")]
    assert len(lines) == 1, out
    return shlex.split(lines[0][len("next: "):])  # raises on an unbalanced quote


@pytest.fixture()
def spaced(tmp_path):
    return make_tiny_db(tmp_path / "my panos" / "A db", contents=2, levels=2, seed=3)


def test_img_resize_hints_quote_the_database(spaced, capsys):
    img_resize.main(["--database", str(spaced), "--erp-size", "32x16", "--no-progress"])
    argv = next_command(capsys.readouterr().out)
    assert argv[:4] == ["python", "mask_train.py", "--database", str(spaced)]
    img_resize.main(["--database", str(spaced), "--faces", "--face-size", "16", "--no-progress"])
    argv = next_command(capsys.readouterr().out)
    assert argv[:4] == ["python", "teacher_train.py", "--database", str(spaced)] and "--face-size" in argv


def test_dataset_cross_hint_quotes_both_databases(spaced, tmp_path, capsys):
    other = shutil.copytree(spaced, tmp_path / "other db")
    (other / "meta.csv").write_text((other / "meta.csv").read_text().replace(",c0,", ",d0,").replace(",c1,", ",d1,"))
    dataset_cross.main(["--database-train", str(spaced), "--database-test", str(other)])
    argv = next_command(capsys.readouterr().out)
    assert argv == ["python", "teacher_crossdb_train.py", "--database-train", str(spaced), "--database-test", str(other)]
