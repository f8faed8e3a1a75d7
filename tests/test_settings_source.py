"""One source of settings: each training setting declared once (kdoiqa/settings.py), the parsers generated
from it, the protocol a layer over it, one parse of a command line, and orchestrators building settings
from values (no argv strings parsed again)."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

import pytest

from kdoiqa import cli, settings
from kdoiqa.common import UserError
from kdoiqa.settings import (
    DataSettings,
    DistillSettings,
    EvalSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    RuntimeSettings,
)

GROUPS = (DataSettings, RuntimeSettings, ModelSettings, OptimSettings, EvalSettings, RunSettings, DistillSettings)


def test_every_field_is_a_declared_setting_with_its_flag_in_the_scripts():
    """A field without a declaration, or a declared setting no training script takes, is a setting that the
    command line, args.json and resume would silently miss."""
    takes = {name for script in cli.SCRIPTS for name in cli.script_defaults(script)}
    for group in GROUPS:
        for f in fields(group):
            assert isinstance(f.metadata.get("flag"), settings.Flag), f"{group.__name__}.{f.name} is not declared"
            assert f.name in takes, f"no training script takes {group.__name__}.{f.name}"


def test_defaults_of_an_empty_command_line_are_the_dataclasses():
    """The field defaults are the command line's: the ours protocol over no flags gives the dataclasses'
    own defaults (one value per setting, nowhere else)."""
    teacher = cli.settings_for("teacher_train", {})
    assert teacher.optim == OptimSettings() and teacher.model == ModelSettings() and teacher.eval == EvalSettings()
    assert teacher.data == DataSettings()
    student = cli.settings_for("mask_train", {})
    assert student.distill == DistillSettings()
    assert cli.settings_for("crossdb_train", {}).optim.epochs == 50  # the paper's cross-database scripts
    assert teacher.run.database == "OIQA" and teacher.run.database_train is None
    cross = cli.settings_for("teacher_crossdb_train", {})
    assert (cross.run.database, cross.run.database_train, cross.run.database_test) == (None, "CVIQ", "OIQA")


def test_the_paper_protocol_is_a_layer_and_an_explicit_flag_wins():
    paper = cli.settings_for("mask_train", {"protocol": "paper"})
    # The paper's code, setting by setting (hand-written, not read from the declarations).
    assert (paper.model.normalize, paper.model.head_init, paper.optim.lr_schedule, paper.optim.seeding) == \
        ("none", "default", "constant", "once")
    assert (paper.runtime.amp, paper.runtime.tf32, paper.eval.select, paper.eval.fit) == ("none", False, "test", "paper")
    assert paper.eval.select_metric == "srcc"  # mask_train.py's own criterion
    assert paper.data.face_jpeg_quality == 75
    assert cli.settings_for("teacher_crossdb_train", {"protocol": "paper"}).eval.select_metric == "abs-srcc+abs-plcc"
    mixed = cli.settings_for("mask_train", {"protocol": "paper", "lr_schedule": "cosine", "tf32": "on"})
    assert (mixed.optim.lr_schedule, mixed.runtime.tf32, mixed.model.normalize) == ("cosine", True, "none")
    assert mixed.args["tf32"] == "on" and mixed.args["normalize"] is None  # args.json: the command line's words


def test_a_command_line_is_parsed_once_and_knows_what_was_given(monkeypatch):
    calls = []
    parse_known = argparse.ArgumentParser.parse_known_args

    def counted(self, *a, **k):
        calls.append(1)
        return parse_known(self, *a, **k)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", counted)
    args, given = cli.parse(cli.teacher_parser(), ["--epochs", "100", "--no-pretrained", "--batch_size", "6"])
    assert len(calls) == 1
    # Given at their default values, they are still given (what --resume compares and hints repeat).
    assert given == {"epochs", "pretrained", "batch_size"}
    assert (args.epochs, args.pretrained, args.batch_size, args.lr, args.normalize) == (100, False, 6, 2e-4, None)
    assert "given" not in vars(args)  # vars(args) is the flags alone (benchmarks write it as JSON)
    json.dumps(vars(args))


def test_help_shows_the_declared_defaults_and_protocol_values(capsys):
    with pytest.raises(SystemExit):
        cli.teacher_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--tf32 {on,off} TF32 matmuls and convolutions on CUDA (default by --protocol: ours on, paper off)" in text
    assert "(default by --protocol: ours lossless, paper 75)" in text
    assert "--erp-size WxH student input: the ERP image resized to WxH, 2:1 (paper: 1024x512) (default: 1024x512)" in text
    assert "--epochs EPOCHS epochs per fold (default: 100)" in text
    with pytest.raises(SystemExit):
        cli.student_parser(cross=True).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS epochs per fold (default: 50)" in text
    assert "--face-size" not in text  # a teacher's flag: accepted, not listed


def test_a_bad_value_is_argparse_s_one_line_with_the_declared_message():
    with pytest.raises(UserError, match=r"argument --epochs: expected a positive integer, got '0'"):
        cli.parse(cli.teacher_parser(), ["--epochs", "0"])
    with pytest.raises(UserError, match="twice as wide as high"):
        cli.parse(cli.student_parser(), ["--erp-size", "100x100"])


def test_orchestrators_build_settings_without_parsing(monkeypatch, tmp_path):
    """run_training (reproduce.py, the matrix) takes values: no command line is made and parsed again, and the
    values of other scripts' settings it is given (an orchestrator's whole set) are left out."""
    def refuse(*a, **k):
        raise AssertionError("a command line was parsed")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", refuse)
    seen = {}
    from kdoiqa import stages

    monkeypatch.setattr(stages, "train_teacher", lambda s, explicit, hint: seen.update(settings=s, explicit=explicit))
    state = cli.run_training("teacher_train", {"database": "Synthetic", "epochs": 3, "kd": "none", "seed": 7},
                             tmp_path / "run", "label")
    assert state == "new"
    s = seen["settings"]
    assert (s.run.database, s.optim.epochs, s.optim.seed, s.run.out, s.distill) == ("Synthetic", 3, 7,
                                                                                    str(tmp_path / "run"), None)
    assert seen["explicit"] == {"database", "epochs", "seed", "out"}


def test_resume_rules_come_from_the_declarations(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = cli.settings_for("teacher_train", {"epochs": 3, "out": str(run), "workers": 1})
    (run / "args.json").write_text(json.dumps({"script": "teacher_train", "args": first.args}))
    resumed = cli.settings_for("teacher_train", {"resume": True, "out": str(run), "workers": 0, "device": "cpu",
                                                 "cache": "none"})
    assert (resumed.optim.epochs, resumed.data.workers, resumed.data.cache) == (3, 0, "none")
    with pytest.raises(UserError) as err:
        cli.settings_for("teacher_train", {"resume": True, "out": str(run), "lr": 1e-3, "pretrained": False})
    assert "--lr was 0.0002, now 0.001" in str(err.value)
    assert "--no-pretrained (pretrained) was True, now False" in str(err.value)


def test_a_checkpoint_keeps_what_defines_the_model_only():
    from kdoiqa.checkpoints import run_settings

    record = cli.settings_for("teacher_train", {"workers": 3, "device": "cpu", "sync_bn": True, "lr": 1e-3}).to_json()
    flat = run_settings(record)
    assert flat["optim.lr"] == 1e-3 and "runtime.amp" in flat and "runtime.tf32" in flat
    for free in ("data.workers", "data.cache", "runtime.device", "runtime.sync_bn", "runtime.progress", "run.out",
                 "run.resume", "run.data_root", "run.save_minutes"):
        assert free not in flat, free


def test_an_unknown_value_for_a_script_is_a_programming_error():
    with pytest.raises(ValueError, match="takes no kd"):
        cli.settings_for("teacher_train", {"kd": "mask"})
