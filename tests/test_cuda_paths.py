"""The CUDA-only branches, executed on a machine without a GPU (kdoiqa/accelerator.py's simulation), and
the device and process-group rules behind the first GPU run: canonical devices, no device-object
comparisons, the GPU and CPU pixel caches, a whole training under every accelerator switch, a dead
process, Ctrl-C with spawned workers, SIGTERM to every torchrun worker during a slow save."""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdoiqa.accelerator import ACCELERATOR, process_group_backend
from kdoiqa.databases import load_database
from kdoiqa.image_store import ImageStore, choose_cache
from kdoiqa.settings import DataSettings

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ----------------------------------------------------------------------------------------------
# Devices.

def test_cuda_is_made_canonical_as_the_tensors_report_it():
    """torch.device("cuda") != torch.device("cuda:0"), yet a tensor made on the first reports the second:
    the library keeps only indexed devices (FakeTensorMode makes CUDA tensors without a GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert torch.device("cuda") != torch.device("cuda:0")
    with FakeTensorMode():
        made = torch.empty(2, device="cuda")
    assert made.device == torch.device("cuda:0") == ACCELERATOR.canonical("cuda")
    assert ACCELERATOR.canonical(torch.device("cuda")) == torch.device("cuda", 0)
    assert ACCELERATOR.canonical("cuda:1") == torch.device("cuda", 1)
    assert ACCELERATOR.canonical("cpu") == torch.device("cpu")


def _device_comparisons(path: Path) -> list[str]:
    """`a.device == b` / `!=` / `is` and comparisons with `torch.device(...)` in one file."""
    def is_device(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "device":
            return True
        if isinstance(node, ast.Name) and node.id in ("device", "target"):
            return True
        return isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "device"

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)) for op in node.ops):
            sides = [node.left, *node.comparators]
            if sum(is_device(side) for side in sides) >= 1 and not any(
                    isinstance(side, ast.Constant) for side in sides):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_branch_compares_device_objects(tmp_path):
    """Branches use `device.type`, a tensor's `is_cuda` or a decided mode, never `device == device`."""
    files = [p for folder in ("kdoiqa", "models", "viewport") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    assert sum((_device_comparisons(p) for p in files), []) == []
    # The check finds the comparison the first GPU run died of:
    planted = tmp_path / "planted.py"
    planted.write_text("def f(self):\n    return self.pixels.device == self.device\n")
    assert _device_comparisons(planted) == ["planted.py:2"]


def test_process_group_backend():
    assert process_group_backend(torch.device("cuda", 0), 1) == "nccl"
    assert process_group_backend(torch.device("cuda", 0), 2) == "gloo"  # processes sharing a GPU
    assert process_group_backend(torch.device("cpu"), 1) == "gloo"


# ----------------------------------------------------------------------------------------------
# The pixel cache's accelerator paths.

def _batches(store: ImageStore, images: list[str]) -> list[torch.Tensor]:
    return [b["pixels"] for b in store.batches(images, 4, shuffle=True, generator=torch.Generator().manual_seed(3))]


def test_gpu_cache_and_pinned_cpu_cache_serve_the_same_pixels(tiny_db, capsys):
    """Simulated: `--cache auto` takes the GPU (free memory asked), the GPU cache indexes on the device,
    the CPU cache gathers into pinned buffers and copies without blocking, the streaming loader's
    batches go through the same copy; every path serves the pixels of a plain CPU run."""
    db = load_database(tiny_db)
    data = DataSettings(erp_size=(32, 16), workers=0)
    plain = _batches(ImageStore(db, db.images, "erp", data, torch.device("cpu"), progress=False), db.images)
    with ACCELERATOR.simulated(free_memory=2**30) as sim:
        gpu = ImageStore(db, db.images, "erp", data, torch.device("cpu"), progress=True)
        assert gpu.mode == "gpu" and "free_memory" in sim.calls
        assert "pixel cache: gpu" in capsys.readouterr().out
        got_gpu = _batches(gpu, db.images)
        pinned_before = sim.pinned
        cpu = ImageStore(db, db.images, "erp", DataSettings(erp_size=(32, 16), workers=0, cache="cpu"),
                         torch.device("cpu"), progress=False)
        got_cpu = _batches(cpu, db.images)
        assert sim.pinned - pinned_before >= len(got_cpu)  # one pinned buffer per batch (and the order)
        copies = sim.non_blocking_copies
        streamed = _batches(ImageStore(db, db.images, "erp", DataSettings(erp_size=(32, 16), workers=0, cache="none"),
                                       torch.device("cpu"), progress=False), db.images)
        assert sim.non_blocking_copies - copies >= len(streamed)
    for a, b, c, d in zip(plain, got_gpu, got_cpu, streamed):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    # A cache too large for the GPU's share falls back to RAM, shared by the processes on the GPU.
    assert choose_cache("auto", 6 * 2**30, "cuda", gpu_free=20 * 2**30, gpu_sharers=1, ram=2**40)[0] == "gpu"
    assert choose_cache("auto", 6 * 2**30, "cuda", gpu_free=20 * 2**30, gpu_sharers=2, ram=2**40)[0] == "cpu"


def test_a_whole_training_on_every_accelerator_path(tiny_db, tmp_path, capsys, monkeypatch):
    """A teacher (bf16 autocast chosen by compute capability, the GPU cache, channels_last, cuDNN switches,
    --deterministic) and a mask-KD student under fp16 loss scaling with fused Adam, simulated on the CPU:
    both finish with finite results, and every switch is as before afterwards."""
    import feat_save
    import mask_train
    import teacher_train
    from kdoiqa import engine

    optimizers = []
    real_build = engine.build_optimizer
    monkeypatch.setattr(engine, "build_optimizer", lambda *a, **k: optimizers.append(real_build(*a, **k)) or optimizers[-1])
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
              torch.are_deterministic_algorithms_enabled())
    common = ["--database", str(tiny_db), "--folds", "2", "--fold", "0", "--no-pretrained", "--workers", "0",
              "--no-progress", "--batch-size", "4"]
    teacher, student, features = tmp_path / "teacher", tmp_path / "student", tmp_path / "features"
    with ACCELERATOR.simulated(capability=(9, 0)) as sim:
        teacher_train.main([*common, "--epochs", "1", "--face-size", "32", "--deterministic", "--out", str(teacher)])
        out = capsys.readouterr().out
        assert "precision bf16 autocast" in out and "deterministic algorithms" in out
        assert "capability" in sim.calls and "free_memory" in sim.calls  # --amp auto and --cache auto asked
        feat_save.main(["--database", str(tiny_db), "--run", str(teacher), "--features-dir", str(features), "--fold", "0",
                        "--workers", "0", "--no-progress"])
        mask_train.main([*common, "--epochs", "2", "--erp-size", "64x32", "--amp", "fp16", "--kd-warmup", "0",
                         "--kd-feature-epochs", "1", "--features-dir", str(features), "--out", str(student)])
        assert "precision fp16 autocast with loss scaling" in capsys.readouterr().out
    assert all(opt.defaults.get("fused") for opt in optimizers) and len(optimizers) == 2
    after = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled())
    assert after == before
    for run in (teacher, student):
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert log and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log)
    state = torch.load(student / "fold0" / "checkpoint.pt", weights_only=True)
    assert state["model"]["backbone.conv1.weight"].is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# Processes.

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dead_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), KDOIQA_HEARTBEAT_TIMEOUT="3")
    from kdoiqa.common import UserError
    from kdoiqa.distributed import DIST

    with DIST.scope():  # never left: each process ends with os._exit
        DIST.init("cpu", "folds")
        if rank == 1:
            os._exit(0)  # dies without a word (an OOM kill, a lost node)
        started = time.monotonic()
        try:
            DIST.wait_for_all()
            message = "returned"
        except UserError as err:
            message = str(err)
        Path(out).write_text(json.dumps({"message": message, "seconds": time.monotonic() - started}))
        os._exit(0)


def test_a_dead_process_ends_the_wait_of_the_others(tmp_path):
    """A launch without torchrun's agent (srun, mpirun, env:// by hand): a process that dies stops the
    others' wait with one line naming it, after KDOIQA_HEARTBEAT_TIMEOUT seconds without a heartbeat."""
    out = tmp_path / "rank0.json"
    torch.multiprocessing.spawn(_dead_rank_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["message"].startswith("process 1 of 2 has given no sign of life for 3 s"), result
    assert 3 <= result["seconds"] < 30


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ctrl_c_with_spawned_data_workers_ends_the_epoch_cleanly(tiny_db, tmp_path, method):
    """--cache none with workers started by forkserver or spawn (Python 3.14's default on Linux): a Ctrl-C
    of the terminal (SIGINT to the whole process group) ends the epoch, saves it, exits 130."""
    run = tmp_path / "run"
    argv = ["--database", str(tiny_db), "--folds", "2", "--fold", "0", "--epochs", "30", "--no-pretrained",
            "--face-size", "32", "--cache", "none", "--workers", "2", "--no-progress", "--out", str(run)]
    script = ("import sys, torch.multiprocessing as mp\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              f"mp.set_start_method({method!r}, force=True)\n"
              "import teacher_train\n"
              "from kdoiqa.common import run_cli\n"
              f"run_cli(lambda: teacher_train.main({argv!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = run / "fold0" / "log.jsonl"
    deadline = time.monotonic() + 180
    while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the workers too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "exited unexpectedly" not in err and "Traceback" not in err, err[-2000:]
    saved = torch.load(run / "fold0" / "resume.pt", weights_only=True)
    assert 1 <= saved["epoch"] < 30


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_sigterm_to_every_torchrun_worker_during_a_slow_save_keeps_the_state(tiny_db, tmp_path):
    """scancel / a kill of every worker of `torchrun --nproc_per_node 2 ... --parallel batch`, in the middle
    of a fold, with a state write that takes 3 s: rank 1 waits for rank 0's save, a second SIGTERM does not
    tear it, and `--resume` then ends equal to a straight run."""
    from kdoiqa.folds import make_folds, write_folds

    folds = write_folds(make_folds(load_database(tiny_db), k=2, seed=5), tmp_path / "k2.json")
    args = ["--database", str(tiny_db), "--folds-file", str(folds), "--fold", "0", "--epochs", "8", "--no-pretrained",
            "--face-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--deterministic",
            "--parallel", "batch"]
    runner = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]

    def torchrun(*extra: str, script: str = "teacher_train.py") -> subprocess.Popen:
        return subprocess.Popen([*runner, f"--master_port={_free_port()}", script, *args, *extra], cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = torchrun("--out", str(tmp_path / "straight"))
    stopped_dir = tmp_path / "stopped"
    stopped = torchrun("--out", str(stopped_dir), script="tests/_slow_save_train.py")
    log = stopped_dir / "fold0" / "log.jsonl"
    deadline = time.monotonic() + 240
    while (not log.exists() or not log.read_text().strip()) and stopped.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stopped.poll() is None, stopped.communicate()[1][-3000:]
    workers = _children(stopped.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    for pid in workers:  # and again, as torchrun does once a process has exited
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, err = stopped.communicate(timeout=240)
    assert stopped.returncode != 0
    saved = torch.load(stopped_dir / "fold0" / "resume.pt", weights_only=True)
    assert 1 <= saved["epoch"] < 8, err[-3000:]
    assert straight.wait(timeout=240) == 0, straight.communicate()[1][-3000:]
    resumed = torchrun("--out", str(stopped_dir), "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.communicate()[1][-3000:]
    for proc in (straight, resumed):
        proc.communicate()
    assert (stopped_dir / "fold0" / "checkpoint.pt").read_bytes() == \
        (tmp_path / "straight" / "fold0" / "checkpoint.pt").read_bytes()


def test_time_limits_from_the_environment_are_checked(monkeypatch):
    from kdoiqa.common import UserError
    from kdoiqa.distributed import collective_timeout, heartbeat_timeout

    monkeypatch.delenv("KDOIQA_HEARTBEAT_TIMEOUT", raising=False)
    monkeypatch.setenv("KDOIQA_COLLECTIVE_TIMEOUT", "90")
    assert heartbeat_timeout() == 300 and collective_timeout().total_seconds() == 90
    for name, read in (("KDOIQA_HEARTBEAT_TIMEOUT", heartbeat_timeout), ("KDOIQA_COLLECTIVE_TIMEOUT", collective_timeout)):
        for bad in ("0", "-3", "soon"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(UserError, match=f"^{name}='{bad}': expected a positive number of seconds$"):
                read()
        monkeypatch.delenv(name)
