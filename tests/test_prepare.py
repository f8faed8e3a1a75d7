"""Tests of kdoiqa/prepare.py (the three releases and the authors' folds) against the real metadata in ../shared/reference
(skipped when absent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdoiqa import prepare as dataset_prepare
from kdoiqa.common import UserError
from kdoiqa.databases import load_database
from kdoiqa.folds import load_folds, write_folds
from kdoiqa.prepare import import_author_folds, match_key, prepare

REFERENCE = REPO.parent / "shared" / "reference"
UPSTREAM = REFERENCE / "kd-oiqa-upstream"
OIQA_MAT = REFERENCE / "oiqa-official" / "360IQA_MOS.mat"

NO_REFERENCE = ("needs the databases' real score files and the paper's fold CSVs (CVIQ.csv, OIQA's 360IQA_MOS.mat, "
                "IQA-ODI_1080.csv, <DB>_trainc_k.csv), which this repository does not ship; they are looked for in "
                f"{REFERENCE}, absent on this machine")
needs_reference = pytest.mark.skipif(not (UPSTREAM.is_dir() and OIQA_MAT.is_file()), reason=NO_REFERENCE)


def run_dataset_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "dataset.py"), *args], check=False, capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def touch_all(root: Path, images: list[str]) -> None:
    for image in images:
        path = root / image
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def stem(path_text: str) -> str:
    return Path(path_text.replace("\\", "/")).stem


def authors_list(path: Path) -> list[str]:
    return pd.read_csv(path, header=None)[0].tolist()


def oiqa_images(ext_of=lambda i: ".png" if i % 3 else ".jpg") -> list[str]:
    return [f"distorted_images/img{i}{ext_of(i)}" for i in range(1, 321)]


def cviq_images() -> list[str]:
    return [f"{i:03d}.png" for i in range(1, 545)]


def iqa_odi_images() -> list[str]:
    names = pd.read_csv(UPSTREAM / "IQA-ODI" / "IQA-ODI_1080.csv", header=None)[0]
    return [f"all_ref_test_img/{name}.jpg" for name in names]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """The three databases prepared from the real score files over empty image files."""
    if not (UPSTREAM.is_dir() and OIQA_MAT.is_file()):
        pytest.skip(NO_REFERENCE)
    base = tmp_path_factory.mktemp("prepared")
    roots = {}
    for name, images, scores in (("OIQA", oiqa_images(), OIQA_MAT),
                                 ("CVIQ", cviq_images(), UPSTREAM / "CVIQ"),
                                 ("IQA-ODI", iqa_odi_images(), UPSTREAM / "IQA-ODI" / "IQA-ODI_1080.csv")):
        root = base / name
        touch_all(root, images)
        prepare(name, root, scores)
        roots[name] = root
    return roots


# ----------------------------------------------------------------------------------------------
# prepare

@needs_reference
@pytest.mark.parametrize("name,rows,contents", [("OIQA", 320, 16), ("CVIQ", 544, 16), ("IQA-ODI", 1080, 120)])
def test_counts(prepared, name, rows, contents):
    db = load_database(prepared[name])
    assert len(db) == rows
    assert db.meta["ref"].nunique() == contents
    assert db.meta["ref"].value_counts().nunique() == 1  # every content has as many images
    assert db.name == name
    assert list(pd.read_csv(prepared[name] / "meta.csv", nrows=0).columns) == ["image", "mos", "ref", "distortion", "level"]


@needs_reference
def test_oiqa_mosz_matches_authors(prepared):
    db = load_database(prepared["OIQA"])
    assert db.images[0] == "distorted_images/img1.png" and db.images[2] == "distorted_images/img3.jpg"
    authors = pd.read_csv(UPSTREAM / "OIQA" / "OIQA.csv", header=None)
    ids = [int(stem(p)) for p in authors[0]]
    mine = dict(zip((int(Path(x).stem[3:]) for x in db.images), db.meta["mos"]))
    diff = np.abs(np.array([mine[i] for i in ids]) - authors[1].to_numpy())
    assert diff.max() <= 5e-5
    assert db.higher_is_better and db.score_range == (0.0, 100.0)
    meta = db.meta
    assert meta["distortion"].iloc[:20].tolist() == (["JPEG"] * 5 + ["JPEG2000"] * 5 + ["Gaussian noise"] * 5
                                                     + ["Gaussian blur"] * 5)
    assert meta["level"].iloc[:20].tolist() == [1, 2, 3, 4, 5] * 4
    assert meta["ref"].iloc[[0, 19, 20, 319]].tolist() == ["oiqa_c00", "oiqa_c00", "oiqa_c01", "oiqa_c15"]
    # level 1 is the mildest: the mean score falls with the level
    by_level = meta.groupby("level")["mos"].mean().to_numpy()
    assert np.all(np.diff(by_level) < 0)


@needs_reference
def test_oiqa_raw_mos_and_references(tmp_path):
    root = tmp_path / "OIQA"
    touch_all(root, oiqa_images(lambda i: ".jpg"))
    with pytest.raises(UserError, match="reference"):
        prepare("oiqa", root, OIQA_MAT, score="mos", with_references=True)
    touch_all(root, [f"reference_images/img{j}.png" for j in range(1, 17)])
    (root / "MOS").mkdir()
    (root / "MOS" / "360IQA_MOS.mat").write_bytes(OIQA_MAT.read_bytes())
    prepare("oiqa", root, None, score="mos", with_references=True)  # found one folder below root
    db = load_database(root)
    assert len(db) == 336 and db.score_range == (1.0, 10.0)
    assert 1.0 <= db.meta["mos"].min() and db.meta["mos"].max() <= 10.0
    refs = db.meta[db.meta["distortion"] == "reference"]
    assert refs["image"].tolist() == [f"reference_images/img{j}.png" for j in range(1, 17)]
    assert refs["ref"].tolist() == [f"oiqa_c{j:02d}" for j in range(16)]
    assert refs["level"].isna().all()
    info = json.loads((root / "database.json").read_text())
    assert info["name"] == "OIQA" and info["higher_is_better"] is True and info["score_range"] == [1.0, 10.0]
    # the authors' 001.png is distorted_images/img1, not reference_images/img1
    folds = import_author_folds(db, UPSTREAM / "OIQA")
    authors = [f"distorted_images/img{int(stem(p))}.jpg" for p in authors_list(UPSTREAM / "OIQA" / "OIQA_testc_2.csv")]
    assert folds.folds[1].test == authors


@needs_reference
def test_cviq_labels(prepared):
    meta = load_database(prepared["CVIQ"]).meta
    block = meta.iloc[:34]
    assert block["image"].tolist() == [f"{i:03d}.png" for i in range(1, 35)]
    assert block["distortion"].tolist() == ["JPEG"] * 11 + ["H.264/AVC"] * 11 + ["H.265/HEVC"] * 11 + ["reference"]
    assert block["level"].iloc[:33].tolist() == list(range(1, 12)) * 3 and np.isnan(block["level"].iloc[33])
    assert meta["ref"].iloc[[0, 33, 34, 543]].tolist() == ["cviq_c00", "cviq_c00", "cviq_c01", "cviq_c15"]
    # level 1 is the mildest compression
    for codec in ("JPEG", "H.264/AVC", "H.265/HEVC"):
        means = meta[meta["distortion"] == codec].groupby("level")["mos"].mean()
        assert means.iloc[0] > means.iloc[-1] + 20


@needs_reference
def test_iqa_odi_labels(prepared):
    db = load_database(prepared["IQA-ODI"])
    assert db.higher_is_better is False and db.score_range == (0.0, 100.0)
    meta = db.meta.set_index("image")
    row = meta.loc["all_ref_test_img/QF5_ERP_human_P0.jpg"]
    assert (row["ref"], row["distortion"], row["level"]) == ("human_P0", "jpeg_erp", 5)
    row = meta.loc["all_ref_test_img/QF15_cmp_landscapes_P12.jpg"]
    assert (row["ref"], row["distortion"], row["level"]) == ("landscapes_P12", "cmp", 15)
    refs = meta[meta["distortion"] == "reference"]
    assert len(refs) == 120 and (refs["mos"] == 0).all() and refs["level"].isna().all()
    assert set(meta["distortion"]) == {"reference", "jpeg_erp", "cmp", "cpp", "isp", "ohp"}
    assert sorted(meta.loc[meta["distortion"] == "jpeg_erp", "level"].unique()) == [5, 15, 35, 60]


@needs_reference
def test_missing_images_cli_exit_2(tmp_path):
    root = tmp_path / "CVIQ"
    touch_all(root, cviq_images()[:500])
    result = run_dataset_cli("prepare", "--database", "CVIQ", "--root", str(root), "--score-file",
                             str(UPSTREAM / "CVIQ" / "CVIQ.csv"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "44 of 544" in result.stderr and "501.png" in result.stderr
    assert not (root / "meta.csv").exists()
    result = run_dataset_cli("prepare", "--database", "CVIQ", "--root", str(root), "--score-file",
                             str(UPSTREAM / "CVIQ" / "CVIQ.csv"), "--no-check-files")
    assert result.returncode == 0, result.stderr
    assert (root / "meta.csv").is_file()


def test_unknown_database(tmp_path):
    with pytest.raises(UserError, match="CVIQ.*OIQA.*IQA-ODI|OIQA.*CVIQ.*IQA-ODI"):
        prepare("LIVE", tmp_path, tmp_path / "x.csv")
    with pytest.raises(UserError, match="no preparation"):
        prepare("synthetic", tmp_path, None)
    assert set(dataset_prepare.PREPARERS) == {"OIQA", "CVIQ", "IQA-ODI"}


def test_score_file_not_found(tmp_path):
    with pytest.raises(UserError, match="CVIQ.csv.*--score-file"):
        prepare("CVIQ", tmp_path, None, check_files=False)
    with pytest.raises(UserError, match="not found"):
        prepare("CVIQ", tmp_path, tmp_path / "nope.csv", check_files=False)


# ----------------------------------------------------------------------------------------------
# Malformed score files

def write_mat(path: Path, **arrays) -> Path:
    import scipy.io

    scipy.io.savemat(str(path), arrays)
    return path


@pytest.mark.parametrize("arrays,message", [
    ({"MOS": np.ones((336, 1))}, r"no array 'MOSz' \(found MOS\)"),
    ({"MOSz": np.ones((320, 1)), "MOS": np.ones((320, 1))}, "320 values, expected 336"),
    ({"MOSz": np.r_[np.ones(4), np.nan, np.ones(331)][:, None], "MOS": np.ones((336, 1))}, "MOSz row 5"),
])
def test_malformed_mat(tmp_path, arrays, message):
    mat = write_mat(tmp_path / "360IQA_MOS.mat", **arrays)
    with pytest.raises(UserError, match=message) as err:
        prepare("OIQA", tmp_path, mat, check_files=False)
    assert str(mat) in str(err.value)


def test_not_a_mat_file(tmp_path):
    bad = tmp_path / "360IQA_MOS.mat"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not a readable MATLAB"):
        prepare("OIQA", tmp_path, bad, check_files=False)


def test_oiqa_synthetic_mat(tmp_path):
    mosz = np.linspace(20, 80, 336)[:, None]
    mat = write_mat(tmp_path / "360IQA_MOS.mat", MOS=mosz / 10, MOSz=mosz)
    path = prepare("OIQA", tmp_path, None, check_files=False)
    meta = pd.read_csv(path)
    assert len(meta) == 320 and np.allclose(meta["mos"], mosz[:320, 0])
    assert meta["image"].iloc[0] == "distorted_images/img1.jpg"  # default extension without files
    with pytest.raises(UserError, match="320 of 320 OIQA image file"):
        prepare("OIQA", tmp_path, mat)


def cviq_rows(n: int = 544) -> list[str]:
    return [f"/x/y/{i:03d}.png,{50 + i % 7}" for i in range(1, n + 1)]


@pytest.mark.parametrize("lines,message", [
    (cviq_rows()[:10] + ["/x/011.png,abc"] + cviq_rows()[11:], r"row 11: score 'abc' is not a number"),
    (["path,score"] + cviq_rows()[1:], "row 1: score 'score' is not a number.*no header"),
    (cviq_rows()[:3] + ["/x/004.png"] + cviq_rows()[4:], r"row 4: expected `name,score`"),
    (cviq_rows()[:-1] + ["/x/001.png,50"], r"row 544: image 001 already listed on row 1"),
    (cviq_rows()[:-1] + ["/x/999.png,50"], r"row 544: '/x/999.png' is not a CVIQ image"),
    (cviq_rows()[:-1] + ["/x/544.png,inf"], r"row 544: score is 'inf'"),
    (cviq_rows()[:100], r"100 rows, expected 544"),
])
def test_malformed_cviq_csv(tmp_path, lines, message):
    scores = tmp_path / "CVIQ.csv"
    scores.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message) as err:
        prepare("CVIQ", tmp_path, scores, check_files=False)
    assert str(scores) in str(err.value)
    assert not (tmp_path / "meta.csv").exists()


def test_oiqa_only_options(tmp_path):
    scores = tmp_path / "CVIQ.csv"
    scores.write_text("\n".join(cviq_rows()) + "\n")
    with pytest.raises(UserError, match="--with-references is for OIQA only"):
        prepare("CVIQ", tmp_path, scores, with_references=True, check_files=False)
    with pytest.raises(UserError, match="--score-kind mos is for OIQA only"):
        prepare("CVIQ", tmp_path, scores, score="mos", check_files=False)
    assert len(pd.read_csv(prepare("CVIQ", tmp_path, scores, check_files=False))) == 544


def test_malformed_iqa_odi_csv(tmp_path):
    scores = tmp_path / "IQA-ODI_1080.csv"
    scores.write_text("human_P0,0\nQF5_ERP_human_P0,70\nfoo bar,3\n")
    with pytest.raises(UserError, match=r"row 3: 'foo bar' is not an IQA-ODI name"):
        prepare("IQA-ODI", tmp_path, scores, check_files=False)


# ----------------------------------------------------------------------------------------------
# The authors' folds

def test_match_key():
    assert match_key("/home/a/OIQA/resized_imgs/001.png") == match_key("distorted_images/img1.jpg") == ("n", 1)
    assert match_key(r"C:\data\QF5_ERP_human_P0.jpg") == match_key("QF5_ERP_human_P0") == ("s", "qf5_erp_human_p0")
    assert match_key("img12") != match_key("img1")


@needs_reference
@pytest.mark.parametrize("name,tests,trains", [("OIQA", 60, 260), ("CVIQ", 102, 442), ("IQA-ODI", 216, 864)])
def test_import_author_folds_exact(prepared, name, tests, trains):
    db = load_database(prepared[name])
    folds = import_author_folds(db, UPSTREAM / name)
    assert len(folds) == 5 and folds.source.startswith("authors' folds from")
    ref_of = dict(zip(db.meta["image"], db.meta["ref"]))
    for k, fold in enumerate(folds.folds, start=1):
        key = (lambda s: int(s)) if name != "IQA-ODI" else (lambda s: s)
        norm = (lambda im: int(Path(im).stem.removeprefix("img"))) if name != "IQA-ODI" else (lambda im: Path(im).stem)
        for part, expected_len in (("test", tests), ("train", trains)):
            authors = [key(stem(p)) for p in authors_list(UPSTREAM / name / f"{name}_{part}c_{k}.csv")]
            mine = [norm(im) for im in getattr(fold, part)]
            assert mine == authors and len(mine) == expected_len
        assert not {ref_of[x] for x in fold.train} & {ref_of[x] for x in fold.test}  # content-disjoint
    tested = {x for fold in folds.folds for x in fold.test}
    if name == "IQA-ODI":
        assert len(tested) == 1080
    else:  # one content of CVIQ and OIQA is never tested
        assert {ref_of[x] for x in tested} == set(db.meta["ref"]) - {ref_of[x] for x in db.images if x not in tested}
        assert len({ref_of[x] for x in tested}) == 15
    # a round trip through the fold file keeps them
    again = load_folds(write_folds(folds, prepared[name] / "folds" / "check.json"), db)
    assert [f.test for f in again.folds] == [f.test for f in folds.folds]


@needs_reference
def test_folds_cli_writes_authors_json(prepared):
    root = prepared["OIQA"]
    result = run_dataset_cli("folds", "--database", str(root), "--authors", str(UPSTREAM / "OIQA"))
    assert result.returncode == 0, result.stderr
    data = json.loads((root / "folds" / "authors.json").read_text())
    assert len(data["folds"]) == 5 and data["source"].startswith("authors' folds from")
    first = [stem(p) for p in authors_list(UPSTREAM / "OIQA" / "OIQA_testc_1.csv")]
    assert [f"img{int(s)}" for s in first] == [Path(x).stem for x in data["folds"][0]["test"]]


def make_small_db(root: Path, images: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = [f"{im},{i},c{i // 2}" for i, im in enumerate(images)]
    (root / "meta.csv").write_text("image,mos,ref\n" + "\n".join(rows) + "\n")


def write_fold_files(folder: Path, prefix: str, folds: list[tuple[list[str], list[str]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (train, test) in enumerate(folds, start=1):
        (folder / f"{prefix}_trainc_{k}.csv").write_text("".join(f"/abs/{x},1.0\n" for x in train))
        (folder / f"{prefix}_testc_{k}.csv").write_text("".join(f"/abs/{x},1.0\n" for x in test))


def test_author_folds_errors(tmp_path):
    make_small_db(tmp_path / "db", ["a/img1.png", "a/img2.png", "b.png", "c.png"])
    db = load_database(tmp_path / "db", check_files=False)
    good = [(["001.png", "002.png"], ["b.jpg", "c.png"]), (["b.png", "c.png"], ["1.png", "2.png"])]
    write_fold_files(tmp_path / "ok", "X", good)
    folds = import_author_folds(db, tmp_path / "ok")
    assert folds.folds[0].test == ["b.png", "c.png"] and folds.folds[1].test == ["a/img1.png", "a/img2.png"]

    write_fold_files(tmp_path / "unknown", "X", [(["001.png", "zzz.png"], ["b.png"]), good[1]])
    with pytest.raises(UserError, match=r"X_trainc_1.csv row 2: '/abs/zzz.png' matches no image"):
        import_author_folds(db, tmp_path / "unknown")

    write_fold_files(tmp_path / "overlap", "X", [(["001.png", "b.png"], ["b.png"]), good[1]])
    with pytest.raises(UserError, match="also in X_trainc_1.csv"):
        import_author_folds(db, tmp_path / "overlap")

    write_fold_files(tmp_path / "twice", "X", [(["001.png", "img1.png"], ["b.png"]), good[1]])
    with pytest.raises(UserError, match=r"row 2: '/abs/img1.png' is 'a/img1.png' again"):
        import_author_folds(db, tmp_path / "twice")

    write_fold_files(tmp_path / "gap", "X", good)
    (tmp_path / "gap" / "X_testc_2.csv").rename(tmp_path / "gap" / "X_testc_3.csv")
    with pytest.raises(UserError, match="missing"):
        import_author_folds(db, tmp_path / "gap")

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no fold files"):
        import_author_folds(db, tmp_path / "empty")
    with pytest.raises(UserError, match="no such folder"):
        import_author_folds(db, tmp_path / "nowhere")

    make_small_db(tmp_path / "ambiguous", ["x/1.png", "y/1.png", "b.png", "c.png"])
    amb = load_database(tmp_path / "ambiguous", check_files=False)
    with pytest.raises(UserError, match="matches 2 images"):
        import_author_folds(amb, tmp_path / "ok")


def test_author_folds_several_prefixes(tmp_path):
    make_small_db(tmp_path / "MYDB", ["1.png", "2.png", "3.png", "4.png"])
    db = load_database(tmp_path / "MYDB", check_files=False)
    write_fold_files(tmp_path / "f", "MYDB", [(["1.png", "2.png"], ["3.png", "4.png"]),
                                              (["3.png", "4.png"], ["1.png", "2.png"])])
    write_fold_files(tmp_path / "f", "OTHER", [(["9.png"], ["8.png"]), (["8.png"], ["9.png"])])
    assert import_author_folds(db, tmp_path / "f").folds[0].test == ["3.png", "4.png"]
    os.rename(tmp_path / "MYDB", tmp_path / "renamed")
    db = load_database(tmp_path / "renamed", check_files=False)
    with pytest.raises(UserError, match="several databases"):
        import_author_folds(db, tmp_path / "f")
