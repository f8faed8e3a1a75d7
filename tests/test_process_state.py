"""A run leaves the process as it found it: no Ctrl-C hint, no process-group state, no run folder written by
a path getter, no precision switch left flipped. Two runs in one process do not see each other's state."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from kdoiqa.accelerator import ACCELERATOR
from kdoiqa.common import UserError, interrupt_hint, interrupt_hints, run_cli
from kdoiqa.distributed import DIST, Launch

REPO = Path(__file__).resolve().parents[1]
FAST = ["--folds", "2", "--fold", "0", "--epochs", "1", "--no-pretrained", "--face-size", "32", "--workers", "0",
        "--no-progress", "--batch-size", "4"]
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _switches() -> tuple:
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    return (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def _interrupted(main, capsys) -> str:
    """The last line run_cli prints when `main` is interrupted (and its exit code 130)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == 130
    return capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# The Ctrl-C hint.

def test_interrupt_hints_hold_within_their_block_only(capsys):
    assert interrupt_hints() == ()
    with interrupt_hint("python reproduce.py --out R"):
        with interrupt_hint("python teacher_train.py --resume --out R/t"):
            assert interrupt_hints() == ("python reproduce.py --out R", "python teacher_train.py --resume --out R/t")
        assert interrupt_hints() == ("python reproduce.py --out R",)
    assert interrupt_hints() == ()
    with pytest.raises(ValueError), interrupt_hint("python teacher_train.py --resume --out X"):
        raise ValueError("a failed run")
    assert interrupt_hints() == ()  # an error leaves none behind either

    def nested() -> None:
        with interrupt_hint("python reproduce.py --out R"), interrupt_hint("python mask_train.py --resume --out S"):
            raise KeyboardInterrupt

    # The outermost command continues everything inside it (reproduce.py over one of its runs).
    assert _interrupted(nested, capsys) == "interrupted; continue it with: python reproduce.py --out R"

    def not_yet() -> None:  # a run whose folder does not exist yet has no command to continue it
        with interrupt_hint(lambda: None):
            raise KeyboardInterrupt

    assert _interrupted(not_yet, capsys) == "interrupted"
    assert interrupt_hints() == ()


def test_two_runs_in_one_process_keep_their_own_hints(tiny_db, tmp_path, capsys, monkeypatch):
    """A finished run leaves no hint; the next run's Ctrl-C names its own folder, and a run stopped before its folder
    exists names none (not an earlier run's)."""
    import teacher_train
    from kdoiqa import engine, training

    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    teacher_train.main(["--database", str(tiny_db), *FAST, "--out", str(first)])
    assert (first / "results.csv").is_file()
    assert interrupt_hints() == ()
    assert not DIST.active

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train_one_epoch", ctrl_c)  # during the first epoch: the folder exists
    line = _interrupted(lambda: teacher_train.main(["--database", str(tiny_db), *FAST, "--out", str(second)]), capsys)
    assert line == "interrupted; continue it with: " + shlex.join(["python", "teacher_train.py", "--resume", "--out",
                                                                    str(second)])
    assert interrupt_hints() == () and not DIST.active
    monkeypatch.setattr(training, "_store", ctrl_c)  # while the images are decoded: no folder yet
    line = _interrupted(lambda: teacher_train.main(["--database", str(tiny_db), *FAST, "--out", str(third)]), capsys)
    assert line == "interrupted"
    assert not third.exists()


def test_a_failed_run_leaves_no_hint_and_no_distributed_scope(tiny_db, tmp_path, monkeypatch):
    import teacher_train
    from kdoiqa import engine

    def fail(*args, **kwargs):
        raise UserError("a bad batch")

    monkeypatch.setattr(engine, "train_one_epoch", fail)
    with pytest.raises(UserError, match="a bad batch"):
        teacher_train.main(["--database", str(tiny_db), *FAST, "--out", str(tmp_path / "run")])
    assert interrupt_hints() == ()
    assert not DIST.active and DIST.mode == "none"


# ----------------------------------------------------------------------------------------------
# The launch and the process group.

def test_importing_the_library_reads_no_launch_environment():
    """torchrun's variables at import time are not kept: the launch is what the environment says when asked."""
    code = ("import os\n"
            "from kdoiqa.distributed import DIST\n"
            "for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'):\n"
            "    del os.environ[name]\n"
            "print(DIST.world, DIST.rank, DIST.local_rank, DIST.local_world, DIST.mode)\n")
    env = {**os.environ, "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "0", "0", "1", "none"]


def test_the_launch_is_read_when_a_scope_starts_and_fixed_within_it(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert (DIST.world, DIST.rank, DIST.local_world, DIST.is_main) == (3, 2, 3, False)  # outside a scope: as it is now
    with DIST.scope() as scope:
        assert scope.launch == Launch(world=3, rank=2, local_rank=0, local_world=3)
        monkeypatch.setenv("RANK", "0")
        assert DIST.rank == 2 and DIST.active  # a run's launch does not change under it
        assert DIST.mode == "none"
        scope.mode = "batch"
        assert DIST.data_parallel and DIST.shard == (2, 3)
        with DIST.scope() as inner:  # a run inside an orchestrator: the orchestrator's launch, a mode of its own
            assert inner.launch == scope.launch and DIST.mode == "none"
            inner.mode = "folds"
            assert DIST.my_folds([0, 1, 2, 3, 4, 5]) == [2, 5]
        assert DIST.mode == "batch"
    assert not DIST.active and DIST.mode == "none" and DIST.rank == 0
    with DIST.scope(Launch(world=2, rank=1, local_rank=1, local_world=2)):
        assert (DIST.world, DIST.rank) == (2, 1)
    assert DIST.world == 3


def test_init_belongs_to_a_scope():
    with pytest.raises(RuntimeError, match="scope"):
        DIST.init("cpu", "folds")
    with DIST.scope():
        assert DIST.init("cpu", "folds") == torch.device("cpu")
        assert DIST.mode == "none"  # one process: nothing is split
    assert not DIST.active


def _two_runs_worker(rank: int, world: int, port: int, db: str, out: str) -> None:
    """An orchestrator's scope (as reproduce.py's) over two runs of another --parallel each, then its end."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as tdist

    import teacher_train

    seen = {}
    common = ["--database", db, *FAST, "--deterministic"]
    with DIST.scope():
        DIST.init("cpu", "folds")
        teacher_train.main([*common, "--parallel", "batch", "--out", f"{out}/batch"])
        seen["after_batch"] = [DIST.mode, tdist.is_initialized()]
        teacher_train.main([*common, "--parallel", "folds", "--out", f"{out}/folds"])
        seen["after_folds"] = [DIST.mode, tdist.is_initialized()]
    seen["after_scope"] = [DIST.active, DIST.mode, tdist.is_initialized(),
                           any(t.name == "kdoiqa-heartbeat" and t.is_alive() for t in threading.enumerate())]
    seen["hints"] = list(interrupt_hints())
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_runs_in_an_orchestrators_scope_share_its_group_and_leave_nothing(tiny_db, tmp_path):
    from test_ddp import free_port

    torch.multiprocessing.spawn(_two_runs_worker, args=(2, free_port(), str(tiny_db), str(tmp_path)), nprocs=2,
                                join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["after_batch"] == ["folds", True]   # the orchestrator's mode back, its group kept
        assert seen["after_folds"] == ["folds", True]
        assert seen["after_scope"] == [False, "none", False, False]  # group destroyed, heartbeat stopped
        assert seen["hints"] == []
    for run in ("batch", "folds"):
        assert json.loads((tmp_path / run / "args.json").read_text())["parallel"] == run
        assert (tmp_path / run / "results.csv").is_file()


# ----------------------------------------------------------------------------------------------
# Run folders.

def test_fold_dir_is_a_path_and_writes_nothing(tiny_db, tmp_path):
    from kdoiqa.databases import load_database
    from kdoiqa.folds import make_folds
    from kdoiqa.runs import Run
    from kdoiqa.settings import RunSettings, RuntimeSettings, TrainingSettings

    db = load_database(tiny_db)
    settings = TrainingSettings("teacher_train", "ours", None, RuntimeSettings(), None, None, None, RunSettings())
    run_dir = tmp_path / "runs" / "r"
    run = Run(settings, db, make_folds(db, 2, 0), [0, 1], run_dir, torch.device("cpu"),
              record={"script": "teacher_train"})
    assert run.fold_dir(1) == run_dir / "fold1"
    assert not (tmp_path / "runs").exists()
    assert not run.opened and interrupt_hints() == ()
    assert run.open() == run_dir  # the explicit step: the folder and args.json
    assert json.loads((run_dir / "args.json").read_text()) == {"script": "teacher_train"}
    assert sorted(p.name for p in run_dir.iterdir()) == ["args.json"]


# ----------------------------------------------------------------------------------------------
# Precision switches.

def test_feature_extraction_sets_tf32_inside_only(tiny_db, tmp_path, monkeypatch):
    """The teacher's features under the simulated accelerator: TF32 and cuDNN autotuning as the protocol gives them
    while the teacher runs, and every switch (set here to values no run uses) as it was afterwards."""
    import feat_save
    import teacher_train
    from kdoiqa import engine

    teacher, features = tmp_path / "teacher", tmp_path / "features"
    teacher_train.main(["--database", str(tiny_db), *FAST, "--out", str(teacher)])
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    inside = []
    real = engine.infer

    def recording(*args, **kwargs):
        inside.append(_switches())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "infer", recording)
    default = _switches()
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = False, True, False, True
    try:
        before = _switches()
        with ACCELERATOR.simulated(capability=(9, 0)):
            for tf32 in ("off", "on"):
                feat_save.main(["--database", str(tiny_db), "--run", str(teacher), "--features-dir", str(features),
                                "--fold", "0", "--workers", "0", "--no-progress", "--tf32", tf32])
                assert _switches() == before
    finally:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = default[:4]
    # TF32 as asked, cuDNN autotuning (no determinism asked), the environment untouched
    assert [s[:4] for s in inside] == [(True, False, False, False), (True, False, True, True)]
    assert [s[6] for s in inside] == [":16:8", ":16:8"]


def test_a_fold_stopped_by_an_error_closes_its_tensorboard_writer(tiny_db, tmp_path, monkeypatch):
    """The writer's thread ends with the fold, also when the fold stops with an error (else it writes on into a
    folder the failed run may remove)."""
    import teacher_train
    from kdoiqa import engine, training

    closed = []

    class Writer:
        def add_scalar(self, *a, **k):
            pass

        def flush(self):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(training, "_summary_writer", lambda run, k: Writer())
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: {"train_loss": float("nan")})
    with pytest.raises(UserError, match="not finite"):
        teacher_train.main(["--database", str(tiny_db), *FAST, "--out", str(tmp_path / "run")])
    assert closed == [True]
