"""`--protocol paper`: every behaviour of the paper's code, exactly. Per-face BatchNorm against six
literal backbone calls; one optimiser step of the teacher and of the student in each phase against
a literal step written here the way the paper's scripts do it; each script's selection rule; the
preset recorded everywhere, and explicit flags winning over it."""
from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from conftest import make_tiny_db
from torch import nn

import crossdb_train
import mask_train
import teacher_crossdb_train
import teacher_train
from kdoiqa import cli, engine
from kdoiqa.databases import load_database
from kdoiqa.folds import make_folds, write_folds
from kdoiqa.methods import student_method, teacher_method

FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--erp-size", "32x16",
        "--batch-size", "4"]


def paper_settings(script: str, *argv: str):
    parser = cli.teacher_parser(cross="crossdb" in script) if "teacher" in script else cli.student_parser(
        cross="crossdb" in script)
    args, explicit = cli.parse(parser, ["--protocol", "paper", "--no-pretrained", *argv])
    return cli.training_settings(script, args, explicit)


def test_the_paper_preset_and_explicit_flags():
    s = paper_settings("teacher_train")
    assert (s.model.normalize, s.model.head_init, s.model.face_batchnorm) == ("none", "default", "per-face")
    assert (s.optim.lr_schedule, s.optim.seeding, s.runtime.amp, s.runtime.tf32) == ("constant", "once", "none", False)
    assert (s.eval.select, s.eval.select_metric, s.data.face_jpeg_quality) == ("test", "srcc+plcc", 75)
    assert s.eval.fit == "paper" and paper_settings("teacher_train", "--fit", "logistic4").eval.fit == "logistic4"
    assert paper_settings("mask_train").eval.select_metric == "srcc"
    assert paper_settings("teacher_crossdb_train").eval.select_metric == "abs-srcc+abs-plcc"
    assert paper_settings("crossdb_train").eval.select_metric == "abs-srcc"
    assert paper_settings("crossdb_train").optim.epochs == 50
    override = paper_settings("teacher_train", "--normalize", "imagenet", "--select", "last", "--face-jpeg-quality", "90")
    assert (override.model.normalize, override.eval.select, override.data.face_jpeg_quality) == ("imagenet", "last", 90)
    assert override.model.face_batchnorm == "per-face"  # the rest stays the paper's
    ours = cli.training_settings("teacher_train", *cli.parse(cli.teacher_parser(), []))
    assert (ours.model.normalize, ours.optim.lr_schedule, ours.eval.select, ours.data.face_jpeg_quality) == \
        ("imagenet", "cosine", "last", None)
    assert ours.eval.fit == "logistic4"


# ----------------------------------------------------------------------------------------------
# Per-face BatchNorm.

def test_per_face_batchnorm_equals_six_backbone_calls():
    torch.manual_seed(0)
    ours = teacher_method(paper_settings("teacher_train").model).model.train()
    literal = copy.deepcopy(ours)
    faces = torch.randint(0, 256, (3, 6, 3, 32, 32), dtype=torch.uint8)
    score, feature = ours(faces)
    x = faces.float() / 255  # ToTensor()
    parts = [literal.backbone(x[:, i]) for i in range(6)]  # F, R, BA, L, T, BO: six calls, six sets of statistics
    lit_feature = literal.projector(torch.cat(parts, dim=1))
    lit_score = literal.head(lit_feature).squeeze(-1)
    torch.testing.assert_close(score, lit_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feature, lit_feature, rtol=1e-5, atol=1e-5)
    (score ** 2).mean().backward()
    (lit_score ** 2).mean().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), literal.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(ours.named_buffers(), literal.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)  # running statistics updated six times
    assert int(ours.backbone.bn1.num_batches_tracked) == 6
    joint = copy.deepcopy(literal)
    joint.face_batchnorm = "joint"
    assert not torch.allclose(joint(faces)[0], lit_score, atol=1e-4)  # the two modes differ: the test can fail


# ----------------------------------------------------------------------------------------------
# One optimiser step, ours against the paper's scripts.

class Bisign(torch.autograd.Function):
    """The paper's policy.py: 1 where the input > 0.5; the gradient clamped to [-1, 1]."""

    @staticmethod
    def forward(ctx, x):
        return torch.ones(x[0].size()) * (x > 0.5)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_(-1, 1)


def paper_student_loss(student: nn.Module, p_fc1: nn.Linear, p_fc2: nn.Linear, img, feat_t, mos, epoch: int):
    """mask_train.py's loop body (epoch 0-based there), with its modules: fc1 is the student's head."""
    feat = student.backbone(img)                     # resnet_erp: the pooled 512-d feature
    score = student.head(feat)
    criterion = nn.MSELoss()
    loss_sup = criterion(score, mos)
    if epoch < 5:
        return loss_sup
    if epoch < 10:
        return loss_sup + 0.2 * criterion(feat, feat_t)
    detached = feat.clone().detach()
    mask = Bisign.apply(torch.sigmoid(p_fc2(p_fc1(torch.cat((detached, feat_t), dim=1)))))
    f_e_m = (1 - mask) * detached + mask * feat_t
    loss_p = criterion(student.head(f_e_m), mos)
    loss_kd = criterion(feat, f_e_m.clone().detach())
    return loss_sup + loss_p + 0.2 * loss_kd


def assert_same_step(ours: dict, theirs: dict, ours_after: dict, theirs_after: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6, msg=f"grad {name}")
        torch.testing.assert_close(ours_after[name], theirs_after[name], rtol=1e-6, atol=1e-6, msg=f"weight {name}")


@pytest.mark.parametrize("epoch", [1, 6, 11])  # 1-based: supervised, feature imitation, mask
def test_student_step_equals_the_papers(epoch):
    settings = paper_settings("mask_train")
    torch.manual_seed(0)
    method = student_method(settings.model, settings.distill)
    student, policy = copy.deepcopy(method.model), copy.deepcopy(method.policy)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (6, 3, 32, 64), dtype=torch.uint8, generator=g)
    mos, feat_t = torch.rand(6, generator=g) * 60 + 20, torch.randn(6, 512, generator=g)
    batch = {"pixels": pixels, "teacher_feature": feat_t, "weight": 1.0}

    optimizer = engine.build_optimizer(method, settings.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    method.train()
    scalars = engine.train_step(method, optimizer, scaler, engine.autocast_for(settings.runtime.amp, torch.device("cpu")),
                                batch, mos, epoch)

    paper_opt = torch.optim.Adam([{"params": student.parameters()}, {"params": policy.parameters(), "lr": 2e-4 / 2}],
                                 lr=2e-4, weight_decay=5e-4)
    student.train()
    paper_opt.zero_grad()
    loss = paper_student_loss(student, policy.fc1, policy.fc2, pixels.float() / 255, feat_t, mos[:, None], epoch - 1)
    loss.backward()
    paper_opt.step()

    torch.testing.assert_close(scalars["train_loss"], loss.detach(), rtol=1e-6, atol=1e-5)
    named = lambda m, prefix: {f"{prefix}.{n}": p for n, p in m.named_parameters()}  # noqa: E731
    ours_params = {**named(method.model, "model"), **named(method.policy, "policy")}
    theirs_params = {**named(student, "model"), **named(policy, "policy")}
    ours_grads = {n: p.grad for n, p in ours_params.items() if p.grad is not None}
    theirs_grads = {n: p.grad for n, p in theirs_params.items() if p.grad is not None}
    assert_same_step(ours_grads, theirs_grads, {n: ours_params[n] for n in ours_grads},
                     {n: theirs_params[n] for n in theirs_grads})
    if epoch < 11:
        assert not any(n.startswith("policy") for n in ours_grads)  # the policy idles before its phase
    for (name, a), (_, b) in zip(method.model.named_buffers(), student.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_teacher_step_equals_the_papers():
    settings = paper_settings("teacher_train")
    torch.manual_seed(0)
    method = teacher_method(settings.model)
    model = copy.deepcopy(method.model)
    g = torch.Generator().manual_seed(5)
    faces = torch.randint(0, 256, (6, 6, 3, 32, 32), dtype=torch.uint8, generator=g)
    mos = torch.rand(6, generator=g) * 60 + 20

    optimizer = engine.build_optimizer(method, settings.optim)
    method.train()
    scalars = engine.train_step(method, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                engine.autocast_for(settings.runtime.amp, torch.device("cpu")),
                                {"pixels": faces, "weight": 1.0}, mos, 1)

    # teacher_train.py: six face tensors from ToTensor(), resnet_cmp's forward, MSELoss, Adam(2e-4, 5e-4).
    paper_opt = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=2e-4, weight_decay=5e-4)
    model.train()
    img = [faces[:, i].float() / 255 for i in range(6)]
    feats = torch.cat([model.backbone(x) for x in img], dim=1)
    score = model.head(model.projector(feats))
    paper_opt.zero_grad()
    loss = nn.MSELoss()(score, mos[:, None])
    loss.backward()
    paper_opt.step()

    torch.testing.assert_close(scalars["train_loss"], loss.detach(), rtol=1e-6, atol=1e-5)
    ours = dict(method.model.named_parameters())
    theirs = dict(model.named_parameters())
    assert_same_step({n: p.grad for n, p in ours.items()}, {n: p.grad for n, p in theirs.items()}, ours, theirs)
    for (name, a), (_, b) in zip(method.model.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


# ----------------------------------------------------------------------------------------------
# Each script's selection rule, and the protocol on record.

@pytest.fixture(scope="module")
def dbs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("protocol")
    a = make_tiny_db(work / "A", contents=4, levels=3, seed=51)
    b = make_tiny_db(work / "B", contents=3, levels=2, seed=52)
    write_folds(make_folds(load_database(a), k=2, seed=3), a / "folds" / "authors.json")  # used by the paper's preset
    return {"A": a, "B": b}


def rule(record: dict, metric: str) -> float:
    s, p = record["test_srcc"], record["test_plcc"]
    return {"srcc+plcc": s + p, "srcc": s, "abs-srcc": abs(s), "abs-srcc+abs-plcc": abs(s) + abs(p)}[metric]


@pytest.mark.parametrize("script,metric", [("teacher_train", "srcc+plcc"), ("mask_train", "srcc"),
                                           ("teacher_crossdb_train", "abs-srcc+abs-plcc"),
                                           ("crossdb_train", "abs-srcc")])
def test_each_scripts_selection_rule(dbs, tmp_path, capsys, script, metric):
    out = tmp_path / "run"
    mains = {"teacher_train": teacher_train.main, "mask_train": mask_train.main,
             "teacher_crossdb_train": teacher_crossdb_train.main, "crossdb_train": crossdb_train.main}
    where = (["--database", str(dbs["A"]), "--fold", "1"] if "crossdb" not in script
             else ["--database-train", str(dbs["A"]), "--database-test", str(dbs["B"])])
    kd = ["--kd", "none"] if "train" in script and "teacher" not in script else []
    mains[script](["--protocol", "paper", *where, *kd, "--epochs", "4", "--lr", "3e-3", "--out", str(out), *FAST])
    printed = capsys.readouterr().out
    assert "protocol paper: no input normalisation" in printed and f"best epoch on the test fold ({metric})" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda r: (rule(r, metric), -r["epoch"]))
    table = pd.read_csv(out / "results.csv")
    assert int(table.loc[0, "epoch"]) == best["epoch"]
    assert (table["protocol"] == "paper").all() and "paper" in table.loc[0, "selection"]
    record = json.loads((out / "args.json").read_text())
    assert record["protocol"] == "paper" and record["settings"]["eval"]["select_metric"] == metric
    if "crossdb" not in script:
        assert record["folds"]["path"].endswith("authors.json")  # the authors' folds when the database has them
    assert [r["lr"] for r in log] == [3e-3] * 4  # the paper's constant rate


def test_teacher_records_every_paper_behaviour(dbs, tmp_path):
    out = tmp_path / "teacher"
    teacher_train.main(["--protocol", "paper", "--database", str(dbs["A"]), "--fold", "0", "--epochs", "1",
                        "--out", str(out), *FAST])
    settings = json.loads((out / "args.json").read_text())["settings"]
    assert settings["protocol"] == "paper"
    assert settings["model"] == {**settings["model"], "normalize": "none", "head_init": "default",
                                 "face_batchnorm": "per-face"}
    assert settings["optim"]["lr_schedule"] == "constant" and settings["optim"]["seeding"] == "once"
    assert settings["runtime"]["amp"] == "none" and settings["runtime"]["tf32"] is False
    assert settings["eval"]["select"] == "test" and settings["data"]["face_jpeg_quality"] == 75
    assert settings["eval"]["fit"] == "paper"
    table = pd.read_csv(out / "results.csv", dtype={"fold": str})
    assert (table["fit_requested"] == "paper").all()
    row = table.set_index("fold").loc["0"]
    assert row["fit"] == "paper" or row["fit_fallback"].startswith("paper fit_function raised")
    assert json.loads((out / "fold0" / "metrics.json").read_text())["fit_requested"] == "paper"
    ckpt = torch.load(out / "fold0" / "checkpoint.pt", weights_only=True)
    assert ckpt["model_config"]["face_batchnorm"] == "per-face" and ckpt["model_config"]["normalize"] == "none"


def test_jpeg_faces_are_the_papers_pipeline(dbs, tmp_path):
    """The paper's chain: equi2cubic.m's faces at their native size, through JPEG 75, resized with PIL's
    bicubic; on the fly and on disk alike. Faces written by the earlier geometry are never read."""
    import numpy as np
    from PIL import Image

    from kdoiqa.derived_files import extract_database
    from kdoiqa.images import jpeg_roundtrip, load_faces, read_rgb, resize_rgb, to_chw
    from kdoiqa.viewport.equi2cubic import equi2cubic

    db = load_database(dbs["B"])
    image = db.images[0]
    erp = to_chw(read_rgb(db.path(image)))
    native = equi2cubic(erp[None])[0]
    expected = []
    for face in native.permute(0, 2, 3, 1).numpy():
        from io import BytesIO

        buffer = BytesIO()
        Image.fromarray(face).save(buffer, format="JPEG", quality=75)
        decoded = np.array(Image.open(BytesIO(buffer.getvalue())).convert("RGB"))
        expected.append(np.array(Image.fromarray(decoded).resize((16, 16), Image.Resampling.BICUBIC)))
    online = load_faces(db, image, 16, "online", jpeg_quality=75)
    np.testing.assert_array_equal(online, np.stack(expected))
    assert jpeg_roundtrip(np.asarray(expected[0]), 75).shape == (16, 16, 3)
    assert resize_rgb(expected[0], (16, 16)) is expected[0]
    lossless = load_faces(db, image, 16, "online")
    assert not np.array_equal(online, lossless)
    copy_root = tmp_path / "B"
    import shutil

    shutil.copytree(dbs["B"], copy_root)
    copied = load_database(copy_root)
    stale = copy_root / "faces_16_jpeg75"  # where the py360convert-geometry JPEG faces used to go
    stale.mkdir()
    for path in copied.face_paths(image, 16, 75):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(stale / path.name)
    np.testing.assert_array_equal(load_faces(copied, image, 16, "auto", jpeg_quality=75), online)
    extract_database(copied, 16, "cpu", 1, jpeg_quality=75, progress=False)
    assert (copy_root / "faces_16_equi2cubic_jpeg75").is_dir() and not (copy_root / "faces_16").exists()
    np.testing.assert_array_equal(load_faces(copied, image, 16, "disk", jpeg_quality=75), online)
