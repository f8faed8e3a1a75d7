"""Several processes without killing themselves: waits for other ranks' work are not bounded by the
collective time-out, a non-finite loss on one rank stops every rank at the same epoch, one GPU per
process under torchrun, and pixel caches sized for the processes that share a device."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from test_ddp import free_port

from kdoiqa.distributed import COLLECTIVE_TIMEOUT_ENV, collective_timeout, processes_per_gpu, rank_gpu
from kdoiqa.folds import make_folds, write_folds
from kdoiqa.image_store import choose_cache

GiB = 2**30
FAST = ["--no-pretrained", "--face-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress",
        "--deterministic", "--epochs", "2"]


def _join(rank: int, world: int, port: int, timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{COLLECTIVE_TIMEOUT_ENV: str(timeout_s)})
    torch.set_num_threads(1)  # the launch is read from this environment when a run's scope starts


# ----------------------------------------------------------------------------------------------
# Waiting for other ranks' work.

def _late_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port, timeout_s=2)
    from kdoiqa.distributed import DIST

    with DIST.scope():  # its end destroys the process group
        DIST.init("cpu", "folds")
        if rank == 1:
            time.sleep(5)  # two and a half collective time-outs of work before this rank arrives
        gathered = DIST.gather_objects({"rank": rank})
        DIST.barrier()
        started = time.monotonic()
        if rank == 0:
            time.sleep(4)
        DIST.barrier()
    assert not tdist.is_initialized()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"gathered": gathered, "waited": time.monotonic() - started}))


def test_a_rank_waits_longer_than_the_collective_timeout(tmp_path):
    torch.multiprocessing.spawn(_late_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["gathered"] == [{"rank": 0}, {"rank": 1}]
    assert json.loads((tmp_path / "rank1.json").read_text())["waited"] >= 4  # rank 1 waited 4 s at a barrier


def _slow_fold_worker(rank: int, world: int, port: int, db: str, folds: str, out: str) -> None:
    """Fold-parallel teacher training where rank 0's second fold starts 5 s late (2 s time-out)."""
    _join(rank, world, port, timeout_s=2)
    import teacher_train
    from kdoiqa import training

    real = training.train_fold

    def late(run, k, *args, **kwargs):
        if k == 2:
            time.sleep(5)
        return real(run, k, *args, **kwargs)

    training.train_fold = late
    teacher_train.main(["--database", db, "--folds-file", folds, *FAST, "--parallel", "folds", "--out", out])
    assert not tdist.is_initialized()  # the run's end destroyed its process group


def test_fold_parallel_with_a_slow_rank_equals_sequential(tiny_db, tmp_path):
    import teacher_train
    from kdoiqa.databases import load_database

    folds = write_folds(make_folds(load_database(tiny_db), k=3, seed=9), tmp_path / "k3.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same arithmetic
    try:
        teacher_train.main(["--database", str(tiny_db), "--folds-file", str(folds), *FAST, "--out", str(tmp_path / "seq")])
    finally:
        torch.set_num_threads(threads)
    torch.multiprocessing.spawn(_slow_fold_worker, args=(2, free_port(), str(tiny_db), str(folds), str(tmp_path / "par")),
                                nprocs=2, join=True)
    for k in range(3):
        assert (tmp_path / "par" / f"fold{k}" / "checkpoint.pt").read_bytes() == \
            (tmp_path / "seq" / f"fold{k}" / "checkpoint.pt").read_bytes(), k
    assert (tmp_path / "par" / "results.csv").read_bytes() == (tmp_path / "seq" / "results.csv").read_bytes()


def test_collective_timeout_from_the_environment(monkeypatch):
    from kdoiqa.common import UserError

    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 1800
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "45")
    assert collective_timeout().total_seconds() == 45
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match=COLLECTIVE_TIMEOUT_ENV):
        collective_timeout()


# ----------------------------------------------------------------------------------------------
# A non-finite loss on one rank under --parallel batch.

def _nan_worker(rank: int, world: int, port: int, db: str, folds: str, out: str) -> None:
    _join(rank, world, port, timeout_s=60)
    import teacher_train
    from kdoiqa import engine
    from kdoiqa.common import UserError

    real = engine.train_one_epoch

    def poisoned(*args, **kwargs):
        scalars = real(*args, **kwargs)
        epoch = args[9] if len(args) > 9 else kwargs["epoch"]
        if rank == 1 and epoch == 2:
            scalars["train_loss"] = float("nan")
        return scalars

    engine.train_one_epoch = poisoned
    message = ""
    started = time.monotonic()
    try:
        teacher_train.main(["--database", db, "--folds-file", folds, *FAST[:-1], "4", "--fold", "0",
                            "--parallel", "batch", "--out", out])
    except UserError as err:
        message = str(err)
    Path(out + f".rank{rank}").write_text(json.dumps({"message": message, "seconds": time.monotonic() - started}))
    tdist.destroy_process_group()  # a failed run leaves its group to the process's exit


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tiny_db, tmp_path):
    from kdoiqa.databases import load_database

    folds = write_folds(make_folds(load_database(tiny_db), k=2, seed=3), tmp_path / "k2.json")
    out = str(tmp_path / "run")
    torch.multiprocessing.spawn(_nan_worker, args=(2, free_port(), str(tiny_db), str(folds), out), nprocs=2, join=True)
    for rank in (0, 1):
        record = json.loads(Path(out + f".rank{rank}").read_text())
        assert record["message"].startswith("fold 0 epoch 2: the training loss is not finite on some process"), record
        assert record["seconds"] < 50  # not held until the collective time-out


# ----------------------------------------------------------------------------------------------
# Devices and caches (pure functions: no GPU needed).

def test_ranks_get_distinct_gpus_or_a_clear_refusal():
    from kdoiqa.common import UserError

    assert [rank_gpu(None, r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [rank_gpu("cuda", r, 4, 2) for r in range(4)] == [0, 1, 0, 1]  # two processes per GPU
    assert rank_gpu("cuda:1", 0, 1, 2) == 1  # one process per machine may name its GPU
    with pytest.raises(UserError, match=r"--device cuda:1 under torchrun would put all 2 processes .* on GPU 1"):
        rank_gpu("cuda:1", 0, 2, 2)
    with pytest.raises(UserError, match="has 2 GPU"):
        rank_gpu("cuda:3", 0, 1, 2)
    assert processes_per_gpu(8, 8) == 1 and processes_per_gpu(4, 1) == 4 and processes_per_gpu(3, 2) == 2


def test_pixel_cache_budget_is_shared_by_the_processes_on_a_gpu():
    # 10 GiB of pixels, 40 GiB free: one process caches on the GPU (10 < 16); four sharing it must not (10 > 4 each).
    assert choose_cache("auto", 10 * GiB, "cuda", gpu_free=40 * GiB, gpu_sharers=1, ram=100 * GiB) == ("gpu", "")
    mode, why = choose_cache("auto", 10 * GiB, "cuda", gpu_free=40 * GiB, gpu_sharers=4, ram=100 * GiB)
    assert mode == "cpu" and "shared by 4 processes" in why and "kept in RAM instead" in why
    mode, why = choose_cache("auto", 10 * GiB, "cuda", gpu_free=40 * GiB, gpu_sharers=4, ram=100 * GiB, ram_sharers=4)
    assert mode == "none" and "streamed from disk" in why and "for 4 processes" in why
    assert choose_cache("gpu", GiB, "cpu") == ("cpu", "")
    assert choose_cache("none", GiB, "cuda", gpu_free=80 * GiB) == ("none", "")
    assert choose_cache("auto", GiB, "cpu", ram=10 * GiB) == ("cpu", "")
