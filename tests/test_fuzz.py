"""Fuzz: randomly corrupted meta.csv and fold files either load or raise UserError (one line)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_db

from kdoiqa.common import UserError
from kdoiqa.databases import load_database, read_meta
from kdoiqa.folds import load_folds, make_folds

REPO = Path(__file__).resolve().parents[1]
TOKENS = ["", " ", "nan", "NaN", "inf", "-inf", "1e999", "abc", '"', '""', "'", ",", ",,", "\t", "\\", "../x.png",
          "/abs.png", "C:\\x.png", "images/../../e.png", "x.txt", "images/c0_blur0.png", "\ufeff", "\x00", "é",
          "0", "-1", "1e-300", "images\\c0_blur1.png", "level", "image", "mos", "ref", "\r", "\n", "a\nb"]


def corrupt_text(text: str, rng: np.random.Generator) -> str:
    """One to four random edits: characters, tokens, lines, columns, encodings."""
    for _ in range(int(rng.integers(1, 5))):
        op = int(rng.integers(0, 9))
        lines = text.split("\n")
        if op == 0 and text:  # delete a span
            i = int(rng.integers(0, len(text)))
            text = text[:i] + text[i + int(rng.integers(1, 20)):]
        elif op == 1:  # insert a token
            i = int(rng.integers(0, len(text) + 1))
            text = text[:i] + str(rng.choice(TOKENS)) + text[i:]
        elif op == 2 and len(lines) > 1:  # drop or duplicate a line
            i = int(rng.integers(0, len(lines)))
            lines = lines[:i] + lines[i + 1:] if rng.random() < 0.5 else lines[:i] + [lines[i]] + lines[i:]
            text = "\n".join(lines)
        elif op == 3:  # replace one CSV field by a token
            i = int(rng.integers(0, len(lines)))
            fields = lines[i].split(",")
            fields[int(rng.integers(0, len(fields)))] = str(rng.choice(TOKENS))
            lines[i] = ",".join(fields)
            text = "\n".join(lines)
        elif op == 4:  # truncate
            text = text[: int(rng.integers(0, len(text) + 1))]
        elif op == 5:  # BOM, CRLF or a stray quote
            text = rng.choice(["\ufeff" + text, text.replace("\n", "\r\n"), '"' + text])
        elif op == 6 and text:  # random bytes decoded as latin-1
            i = int(rng.integers(0, len(text)))
            text = text[:i] + bytes(rng.integers(0, 256, int(rng.integers(1, 6)), dtype=np.uint8)).decode("latin-1") + text[i:]
        elif op == 7:  # swap two columns in the header only
            fields = lines[0].split(",")
            if len(fields) > 1:
                a, b = rng.choice(len(fields), 2, replace=False)
                fields[a], fields[b] = fields[b], fields[a]
                lines[0] = ",".join(fields)
                text = "\n".join(lines)
        elif op == 8:  # add or remove a column everywhere
            if rng.random() < 0.5:
                text = "\n".join(line + "," + str(rng.choice(TOKENS)) for line in lines)
            else:
                text = "\n".join(line.rsplit(",", 1)[0] for line in lines)
    return text


def corrupt_json(data, rng: np.random.Generator):
    """Mutate a fold structure: wrong types, missing keys, foreign or repeated names."""
    data = json.loads(json.dumps(data))
    junk = [None, 1, 1.5, "x", [], {}, [1, 2], ["images/nope.png"], True, "images/c0_blur0.png"]
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 7))
        folds = data.get("folds") if isinstance(data, dict) else None
        if op == 0:
            data = junk[int(rng.integers(0, len(junk)))] if rng.random() < 0.2 else {"folds": junk[int(rng.integers(0, len(junk)))]}
        elif isinstance(folds, list) and folds:
            fold = folds[int(rng.integers(0, len(folds)))]
            if not isinstance(fold, dict):
                continue
            key = str(rng.choice(["train", "test"]))
            if op == 1:
                fold.pop(key, None)
            elif op == 2:
                fold[key] = junk[int(rng.integers(0, len(junk)))]
            elif op == 3 and isinstance(fold.get(key), list):
                fold[key].append(junk[int(rng.integers(0, len(junk)))])
            elif op == 4 and isinstance(fold.get(key), list) and fold[key]:
                fold[key].append(fold[key][0])  # a repeat
            elif op == 5 and isinstance(fold.get("train"), list) and isinstance(fold.get("test"), list) and fold["test"]:
                fold["train"].append(fold["test"][0])  # a leak
            elif op == 6:
                folds.append(junk[int(rng.integers(0, len(junk)))])
    return data


@pytest.fixture(scope="module")
def fuzz_db(tmp_path_factory) -> Path:
    return make_tiny_db(tmp_path_factory.mktemp("fuzz") / "Tiny", contents=3, levels=2)


def _loads_or_user_error(fn) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        return "ok"
    except UserError as err:
        assert "\n" not in str(err).strip(), str(err)
        return "error"


def test_fuzz_meta_csv(fuzz_db, tmp_path):
    rng = np.random.default_rng(2023)
    good = (fuzz_db / "meta.csv").read_text()
    root = tmp_path / "db"
    shutil.copytree(fuzz_db, root)
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):  # a fixed number of cases: the same ones on any machine
        text = corrupt_text(good, rng)
        (root / "meta.csv").write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            outcomes[_loads_or_user_error(lambda: read_meta(root / "meta.csv"))] += 1
            outcomes[_loads_or_user_error(lambda: load_database(root))] += 1
        except AssertionError:
            raise
        except Exception as err:  # pragma: no cover - the point of the test
            raise AssertionError(f"case {i}: {type(err).__name__}: {err}\n--- meta.csv ---\n{text!r}") from err
    assert sum(outcomes.values()) == 600 and outcomes["error"] > 50 and outcomes["ok"] > 0, outcomes


def test_fuzz_fold_files(fuzz_db, tmp_path):
    rng = np.random.default_rng(7)
    db = load_database(fuzz_db)
    good = make_folds(db, k=3, seed=1).to_json()
    path = tmp_path / "folds.json"
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        if rng.random() < 0.25:
            text = corrupt_text(json.dumps(good), rng)
        else:
            text = json.dumps(corrupt_json(good, rng))
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            outcomes[_loads_or_user_error(lambda: load_folds(path, db))] += 1
        except AssertionError:
            raise
        except Exception as err:  # pragma: no cover
            raise AssertionError(f"case {i}: {type(err).__name__}: {err}\n--- folds ---\n{text!r}") from err
    assert sum(outcomes.values()) == 300 and outcomes["error"] > 50 and outcomes["ok"] > 0, outcomes


def test_fuzz_cli_one_line(fuzz_db, tmp_path):
    """A handful through `python dataset.py info`: exit code 2 and one stderr line, or success."""
    rng = np.random.default_rng(11)
    good = (fuzz_db / "meta.csv").read_text()
    checked = 0
    for i in range(60):
        text = corrupt_text(good, rng)
        root = tmp_path / f"db{i}"
        shutil.copytree(fuzz_db, root)
        (root / "meta.csv").write_bytes(text.encode("utf-8", errors="surrogatepass"))
        if _loads_or_user_error(lambda root=root: load_database(root)) == "ok":
            continue
        proc = subprocess.run([sys.executable, "dataset.py", "info", "--database", str(root)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "meta.csv" in lines[0], (text, proc.stderr)
        checked += 1
        if checked == 5:
            break
    assert checked == 5
