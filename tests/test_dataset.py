"""Databases, folds and images: meta.csv validation, the registry, database.json, folds, ImageDataset,
and dataset.py's command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dataset
from kdoiqa import databases, images
from kdoiqa.common import UserError, run_cli
from kdoiqa.databases import REGISTRY, load_database, read_meta, registry_lookup, resolve_database_root
from kdoiqa.folds import default_folds_path, holdout_validation, load_folds, make_folds, write_folds
from kdoiqa.images import ImageDataset

HEADER = "image,mos,ref\n"


def write_meta(root: Path, text: str, *, encoding: str = "utf-8") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "meta.csv"
    path.write_text(text, encoding=encoding)
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """dataset.py's command line in-process, through run_cli as `python dataset.py` runs it."""
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: dataset.main(list(argv)) or 0)
    out, err = capsys.readouterr()
    return int(stop.value.code or 0), out, err


# ----------------------------------------------------------------------------------------------
# meta.csv validation: a UserError naming the file (and row), exit 2 with one line from the CLI.

BAD_METAS = [
    ("missing_columns", "image,mos\na.png,1\n", r"missing column\(s\) ref"),
    ("extra_columns", "image,mos,ref,score\na.png,1,c0,2\n", r"unexpected column\(s\) 'score'"),
    ("nan_mos", HEADER + "a.png,1,c0\nb.png,nan,c0\n", r"row 3: mos is 'nan'"),
    ("text_mos", HEADER + "a.png,1,c0\nb.png,good,c1\n", r"row 3: mos 'good' is not a number"),
    ("empty_mos", HEADER + "a.png,,c0\n", r"row 2: mos '' is not a number"),
    ("duplicate", HEADER + "a.png,1,c0\nb.png,2,c0\na.png,3,c1\n", r"row 4: duplicate image 'a.png'"),
    ("absolute", HEADER + "a.png,1,c0\n/data/b.png,2,c0\n", r"row 3: absolute image path"),
    ("windows_absolute", HEADER + "C:\\data\\b.png,2,c0\n", r"row 2: absolute image path"),
    ("parent", HEADER + "a.png,1,c0\nsub/../../b.png,2,c0\n", r"row 3: image path .* leaves the database folder"),
    ("not_image", HEADER + "a.txt,1,c0\n", r"row 2: 'a.txt' is not an image file name"),
    ("empty_ref", HEADER + "a.png,1,\n", r"row 2: empty ref"),
    ("bad_level", "image,mos,ref,level\na.png,1,c0,high\n", r"row 2: level 'high' is not a number"),
    ("empty_file", "", r"empty file"),
    ("header_only", HEADER, r"no rows"),
]


@pytest.mark.parametrize("name,text,message", BAD_METAS, ids=[b[0] for b in BAD_METAS])
def test_bad_meta(tmp_path, capsys, name, text, message):
    path = write_meta(tmp_path / name, text)
    with pytest.raises(UserError, match=message) as err:
        read_meta(path)
    assert str(path) in str(err.value)
    code, out, stderr = cli(capsys, "info", "--database", str(tmp_path / name))
    assert code == 2 and out == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and str(path) in stderr


def test_no_meta(tmp_path, capsys):
    (tmp_path / "db").mkdir()
    with pytest.raises(UserError, match=r"no meta.csv.*columns image,mos,ref"):
        load_database(tmp_path / "db")
    code, _, stderr = cli(capsys, "info", "--database", str(tmp_path / "db"))
    assert code == 2 and stderr.count("\n") == 1 and "meta.csv" in stderr
    code, _, stderr = cli(capsys, "info", "--database", str(tmp_path / "nowhere/db"))
    assert code == 2 and "no such database folder" in stderr


def test_cli_subprocess_one_line(tmp_path):
    write_meta(tmp_path / "db", HEADER + "a.png,x,c0\n")
    result = subprocess.run([sys.executable, str(REPO / "dataset.py"), "info", "--database", str(tmp_path / "db")],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "row 2" in result.stderr and "Traceback" not in result.stderr


def test_bom_spaces_and_backslashes_accepted(tmp_path, capsys):
    path = write_meta(tmp_path / "db", "image, mos ,ref,distortion,level\n"
                      "sub\\a.png, 1.5 ,c0,jpeg,1\nb.png,2,c0,,\nc.png,3,c1,blur,2\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    meta = read_meta(path)
    assert meta.columns.tolist() == ["image", "mos", "ref", "distortion", "level"]
    assert meta["image"].tolist() == ["sub/a.png", "b.png", "c.png"]
    assert meta["mos"].dtype == np.float64 and meta["mos"].tolist() == [1.5, 2.0, 3.0]
    assert np.isnan(meta["level"].iloc[1])
    code, _, _ = cli(capsys, "info", "--database", str(tmp_path / "db"))
    assert code == 2  # the images do not exist
    db = load_database(tmp_path / "db", check_files=False)
    assert len(db) == 3 and db.refs() == ["c0", "c0", "c1"]


def test_missing_image_files(tmp_path, capsys):
    write_meta(tmp_path / "db", HEADER + "a.png,1,c0\nb.png,2,c1\n")
    (tmp_path / "db" / "a.png").touch()
    with pytest.raises(UserError, match=r"1 image file\(s\) missing, e.g. b.png"):
        load_database(tmp_path / "db")
    (tmp_path / "db" / "b.png").touch()
    # info decodes every image: two empty files are named, in one line
    code, out, err = cli(capsys, "info", "--database", str(tmp_path / "db"))
    assert code == 2 and "2 images of 2 contents" in out
    assert err.count("\n") == 1 and "2 of 2 images unreadable" in err and "a.png" in err
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 4)).save(tmp_path / "db" / name)
    code, out, _ = cli(capsys, "info", "--database", str(tmp_path / "db"))
    assert code == 0 and "all 2 images decode" in out


# ----------------------------------------------------------------------------------------------
# Registry and database.json

def test_registry_names(tmp_path):
    for spelling, name in (("oiqa", "OIQA"), ("CVIQ", "CVIQ"), ("cviq", "CVIQ"), ("iqa-odi", "IQA-ODI"),
                           ("IQA_ODI", "IQA-ODI"), ("IqaOdi", "IQA-ODI"), ("SYNTHETIC", "Synthetic")):
        assert registry_lookup(spelling).name == name
    assert registry_lookup("LIVE") is None
    assert REGISTRY["IQA-ODI"].higher_is_better is False
    assert all(REGISTRY[n].higher_is_better for n in ("CVIQ", "OIQA", "Synthetic"))
    root, spec = resolve_database_root("oiqa", tmp_path)
    assert root == tmp_path / "OIQA" and spec.name == "OIQA"
    with pytest.raises(UserError) as err:
        resolve_database_root("LIVE", tmp_path)
    for name in REGISTRY:
        assert name in str(err.value)


def test_registered_database_from_data_root(tmp_path, monkeypatch):
    write_meta(tmp_path / "IQA-ODI", HEADER + "a.png,10,c0\nb.png,0,c0\n")
    db = load_database("iqa_odi", tmp_path, check_files=False)
    assert db.name == "IQA-ODI" and db.registered and db.higher_is_better is False
    assert db.score_range == (0.0, 100.0)
    monkeypatch.setenv("KDOIQA_DATA", str(tmp_path))
    assert load_database("IQA-ODI", check_files=False).root == tmp_path / "IQA-ODI"
    with pytest.raises(UserError, match="database folder not found.*prepare"):
        load_database("CVIQ", tmp_path)


def test_database_json(tmp_path):
    write_meta(tmp_path / "mine", HEADER + "a.png,10,c0\nb.png,30,c1\n")
    db = load_database(tmp_path / "mine", check_files=False)
    assert db.name == "mine" and db.higher_is_better and db.score_range == (10.0, 30.0) and not db.registered
    (tmp_path / "mine" / "database.json").write_text(json.dumps(
        {"name": "My DB", "higher_is_better": False, "score_range": [0, 5]}))
    db = load_database(tmp_path / "mine", check_files=False)
    assert (db.name, db.higher_is_better, db.score_range) == ("My DB", False, (0.0, 5.0))
    assert "higher is worse" in db.describe_scores()
    for bad, message in (("{not json", "not valid JSON"), ("[1, 2]", "not valid JSON"),
                         ('{"higher_is_better": "no"}', "higher_is_better must be true or false"),
                         ('{"score_range": [5, 1]}', "score_range must be")):
        (tmp_path / "mine" / "database.json").write_text(bad)
        with pytest.raises(UserError, match=message) as err:
            load_database(tmp_path / "mine", check_files=False)
        assert "database.json" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Folds

def fold_db(tmp_path: Path, contents: int = 13, per: tuple[int, ...] = (3, 4, 5)) -> databases.Database:
    rows = []
    for c in range(contents):
        for j in range(per[c % len(per)]):
            rows.append(f"c{c}/img{j}.png,{c + j / 10},content{c}")
    write_meta(tmp_path / "folds_db", HEADER + "\n".join(rows) + "\n")
    return load_database(tmp_path / "folds_db", check_files=False)


def test_make_folds(tmp_path):
    db = fold_db(tmp_path)
    folds = make_folds(db, 5, 2023)
    assert len(folds) == 5
    ref_of = dict(zip(db.images, db.refs()))
    tested = []
    for fold in folds.folds:
        assert not {ref_of[x] for x in fold.train} & {ref_of[x] for x in fold.test}
        assert sorted(fold.train + fold.test) == sorted(db.images)
        tested += fold.test
    assert sorted(tested) == sorted(db.images)  # every image tested exactly once
    sizes = [len({ref_of[x] for x in fold.test}) for fold in folds.folds]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 13  # balanced in contents
    assert make_folds(db, 5, 2023).to_json()["folds"] == folds.to_json()["folds"]
    assert make_folds(db, 5, 7).to_json()["folds"] != folds.to_json()["folds"]
    with pytest.raises(UserError, match="cannot make 20"):
        make_folds(db, 20)
    with pytest.raises(UserError, match="at least 2"):
        make_folds(db, 1)


def test_folds_round_trip_and_cli(tmp_path, capsys):
    db = fold_db(tmp_path)
    folds = make_folds(db, 3, 1)
    path = write_folds(folds, default_folds_path(db, 3, 1))
    assert path == tmp_path / "folds_db" / "folds" / "k3_seed1.json"
    again = load_folds(path, db)
    assert [f.test for f in again.folds] == [f.test for f in folds.folds] and again.source == folds.source
    code, out, _ = cli(capsys, "folds", "--database", str(db.root), "--folds", "4", "--split-seed", "9")
    assert code == 0 and out.strip().endswith("k4_seed9.json")
    assert len(load_folds(out.strip(), db)) == 4


def test_load_folds_errors(tmp_path):
    db = fold_db(tmp_path)
    good = make_folds(db, 3).to_json()
    path = tmp_path / "f.json"

    def check(obj_or_text, message):
        path.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))
        with pytest.raises(UserError, match=message) as err:
            load_folds(path, db)
        assert str(path) in str(err.value)

    check("{nope", "not valid JSON")
    check({"folds": []}, "expected")
    unknown = json.loads(json.dumps(good))
    unknown["folds"][1]["test"].append("other/x.png")
    check(unknown, r"fold 1 test names 1 image\(s\) not in")
    overlap = json.loads(json.dumps(good))
    overlap["folds"][0]["train"].append(overlap["folds"][0]["test"][0])
    check(overlap, r"fold 0: 1 image\(s\) both in train and test")
    twice = json.loads(json.dumps(good))
    twice["folds"][2]["test"].append(twice["folds"][2]["test"][0])
    check(twice, "lists an image twice")
    check({"folds": [{"train": ["c0/img0.png"]}]}, "needs lists 'train' and 'test'")
    with pytest.raises(UserError, match="no such fold file"):
        load_folds(tmp_path / "missing.json", db)
    mixed = json.loads(json.dumps(good))
    moved = mixed["folds"][0]["test"].pop()  # its content stays in test through its siblings
    mixed["folds"][0]["train"].append(moved)
    path.write_text(json.dumps(mixed))
    with pytest.warns(UserWarning, match="fold 0 is not content-disjoint"):
        load_folds(path, db)


def test_holdout_validation(tmp_path):
    db = fold_db(tmp_path)
    fold = make_folds(db, 5).folds[0]
    train, val = holdout_validation(db, fold.train, 0.25, seed=3)
    ref_of = dict(zip(db.images, db.refs()))
    assert sorted(train + val) == sorted(fold.train)
    assert val and not {ref_of[x] for x in train} & {ref_of[x] for x in val}  # whole contents
    assert not set(val) & set(fold.test)
    train_refs = {ref_of[x] for x in fold.train}
    assert len({ref_of[x] for x in val}) == round(0.25 * len(train_refs))
    assert holdout_validation(db, fold.train, 0.25, seed=3) == (train, val)
    one = [x for x in fold.train if ref_of[x] == ref_of[fold.train[0]]]
    with pytest.raises(UserError, match="at least two training contents"):
        holdout_validation(db, one)


# ----------------------------------------------------------------------------------------------
# Images and ImageDataset

@pytest.fixture()
def image_db(tmp_path) -> databases.Database:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgdb"
    (root / "sub").mkdir(parents=True)
    rows = []
    for i in range(3):
        name = f"sub/p{i}.png" if i else "p0.jpg"
        pixels = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        rows.append(f"{name},{10 * i},c{i}")
    Image.fromarray(rng.integers(0, 256, (32, 64), dtype=np.uint8)).save(root / "gray.png")
    rows.append("gray.png,5,c3")
    write_meta(root, HEADER + "\n".join(rows) + "\n")
    return load_database(root)


def test_read_rgb_and_resize(image_db, tmp_path):
    gray = images.read_rgb(image_db.path("gray.png"))
    assert gray.shape == (32, 64, 3) and gray.dtype == np.uint8
    resized = images.resize_rgb(gray, (16, 8))
    assert resized.shape == (8, 16, 3)
    assert images.resize_rgb(gray, (64, 32)) is gray
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="unreadable image"):
        images.read_rgb(tmp_path / "bad.png")
    with pytest.raises(UserError, match="not found"):
        images.read_rgb(tmp_path / "none.png")
    assert images.is_two_to_one(64, 32) and images.is_two_to_one(65, 32) and not images.is_two_to_one(60, 40)


def test_image_dataset_erp(image_db):
    import torch

    ds = ImageDataset(image_db, image_db.images, "erp", erp_size=(32, 16))
    assert len(ds) == 4
    item = ds[1]
    assert item["pixels"].shape == (3, 16, 32) and item["pixels"].dtype == torch.uint8
    assert item["image"] == "sub/p1.png" and item["index"] == 1
    expected = images.resize_rgb(images.read_rgb(image_db.path("sub/p1.png")), (32, 16))
    assert torch.equal(item["pixels"], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    with pytest.raises(ValueError):
        ImageDataset(image_db, image_db.images, "cube")


def test_image_dataset_faces_online_and_disk(image_db):
    import torch
    from PIL import Image

    from kdoiqa.viewport.project import cube_faces

    online = ImageDataset(image_db, image_db.images, "faces", face_size=8, faces_source="online")
    item = online[2]
    assert item["pixels"].shape == (6, 3, 8, 8) and item["pixels"].dtype == torch.uint8
    erp = images.to_chw(images.read_rgb(image_db.path("sub/p2.png")))
    assert torch.equal(item["pixels"], cube_faces(erp, 8, antialias=True))

    with pytest.raises(UserError, match="face file missing.*img_resize.py --faces"):
        ImageDataset(image_db, image_db.images, "faces", face_size=8, faces_source="disk")[0]
    # faces on disk (here: distinct constant images) are read back as they are
    for image in image_db.images:
        for k, path in enumerate(image_db.face_paths(image, 8)):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(path)
    assert image_db.face_paths("sub/p2.png", 8)[0] == image_db.root / "faces_8" / "sub" / "p2_F.png"
    for source in ("disk", "auto"):
        disk = ImageDataset(image_db, image_db.images, "faces", face_size=8, faces_source=source)[2]["pixels"]
        assert disk.shape == (6, 3, 8, 8) and disk.dtype == torch.uint8
        assert [int(disk[k].max()) for k in range(6)] == [0, 40, 80, 120, 160, 200]
