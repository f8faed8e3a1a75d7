"""Several processes (torchrun, gloo on CPU): DDP's gradients are the batch mean's, exact sharding,
idle parameters untouched, fold-parallel runs equal to sequential ones, rank 0 alone writes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as tdist

from kdoiqa.databases import load_database
from kdoiqa.folds import make_folds, write_folds

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _student(epoch_phase_kd: str = "mask"):
    from kdoiqa.methods import StudentMethod
    from kdoiqa.models import build_model
    from kdoiqa.settings import DistillSettings

    torch.manual_seed(0)
    return StudentMethod(build_model("student", pretrained=False, normalize="none"),
                         DistillSettings(kd=epoch_phase_kd, kd_warmup=1, kd_feature_epochs=1))


def _batch(n: int):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 3, 16, 32, generator=g), torch.rand(n, generator=g) * 50, torch.randn(n, 512, generator=g))


def _grad_worker(rank: int, world: int, port: int, out: str, sizes: list[int], epoch: int) -> None:
    """One DDP step per global batch size: this rank's share, weighted as the engine weights it, through
    the wrapper the training uses at `epoch` (3: the mask phase, all networks; 2: the feature phase,
    the policy idle and outside the wrapper)."""
    _join(rank, world, port)
    from kdoiqa.distributed import DIST

    with DIST.scope():  # its end destroys the process group
        DIST.init("cpu", "batch")
        _grad_steps(rank, world, out, sizes, epoch)
    assert not tdist.is_initialized()


def _grad_steps(rank: int, world: int, out: str, sizes: list[int], epoch: int) -> None:
    from kdoiqa.settings import RuntimeSettings, TrainingSettings
    from kdoiqa.training import _wrap

    method = _student()
    method.eval()  # BatchNorm on running statistics: the ranks' shares then give the batch's exact gradient
    settings = TrainingSettings("mask_train", "ours", None, RuntimeSettings(), None, None, None, None)
    steps = _wrap(method, settings, torch.device("cpu"))  # what the training runs call
    ddp = steps[method.nets_in_use(epoch)]
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    # No search for unused parameters in any phase (a graph walk and a flag copied to the host per step).
    assert not any(step.find_unused_parameters for step in steps.values())
    grads = []
    for n in sizes:
        pixels, target, feats = _batch(n)
        rows = torch.arange(n)[rank::world]
        weight = len(rows) / n
        if not len(rows):
            rows = torch.arange(1)  # the engine's stand-in row, weight 0
        method.zero_grad(set_to_none=True)
        loss, _ = ddp(pixels[rows], target[rows], feats[rows], epoch=epoch)
        (loss * weight).backward()
        grads.append({name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None})
    torch.save(grads, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("epoch", [3, 2], ids=["mask-phase", "feature-phase"])
def test_ddp_gradient_is_the_batch_mean(tmp_path, epoch):
    sizes = [5, 1]  # uneven shares (3 + 2), and a batch smaller than the processes (a stand-in row)
    torch.multiprocessing.spawn(_grad_worker, args=(2, free_port(), str(tmp_path), sizes, epoch), nprocs=2, join=True)
    method = _student()
    method.eval()
    for i, n in enumerate(sizes):
        method.zero_grad(set_to_none=True)
        pixels, target, feats = _batch(n)
        loss, _ = method(pixels, target, feats, epoch=epoch)
        loss.backward()
        expected = {name: p.grad for name, p in method.named_parameters() if p.grad is not None}
        # the mask phase trains the policy; before it the policy gets no gradient at all
        assert bool({n for n in expected if n.startswith("policy")}) == (epoch == 3)
        for rank in (0, 1):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[i]
            assert set(got) == set(expected)
            for name, grad in expected.items():
                # float32 sums in another order (the ranks' shares, each machine's thread count): the
                # tolerance is relative to the tensor's largest element, so that near-zero elements
                # do not fail on rounding; a wrong share or an average of the ranks is off by 50%.
                scale = float(grad.abs().max())
                torch.testing.assert_close(got[name], grad, atol=2e-5 * scale, rtol=1e-4, msg=f"{name}, batch of {n}")


def test_shards_are_disjoint_and_cover_the_batch(tiny_db, monkeypatch):
    """Under --parallel batch each rank takes rows r, r+N, ... of every global batch, weighted by its share."""
    from kdoiqa.distributed import DIST, Launch
    from kdoiqa.image_store import ImageStore
    from kdoiqa.settings import DataSettings

    db = load_database(tiny_db)
    store = ImageStore(db, db.images, "erp", DataSettings(erp_size=(32, 16), workers=0, cache="cpu"),
                       torch.device("cpu"), progress=False)
    shares = []
    for rank in range(3):
        with DIST.scope(Launch(world=3, rank=rank, local_rank=rank, local_world=3)) as scope:
            scope.mode = "batch"
            shares.append(list(store.batches(db.images[:10], 4, shuffle=True,
                                             generator=torch.Generator().manual_seed(7), shard=True)))
    order = db.images[:10]
    order = [order[i] for i in torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()]
    for step, start in enumerate(range(0, 10, 4)):
        whole = order[start:start + 4]
        got = [shares[r][step] for r in range(3)]
        real = [b["images"] if b["weight"] > 0 else [] for b in got]
        assert sorted(sum(real, [])) == sorted(whole)              # together: the global batch
        assert all(not set(a) & set(b) for i, a in enumerate(real) for b in real[i + 1:])  # disjoint
        assert [b["weight"] for b in got] == [len(r) / len(whole) for r in real]
    assert shares[2][-1]["weight"] == 0  # the last batch (2 rows) leaves rank 2 a stand-in row


def _idle_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    """Two epochs (supervised, then feature imitation) through the engine under DDP."""
    _join(rank, world, port)
    from kdoiqa.distributed import DIST

    with DIST.scope():  # its end destroys the process group
        _idle_epochs(rank, DIST.init("cpu", "batch"), root, out)
    assert not tdist.is_initialized()


def _idle_epochs(rank: int, device: torch.device, root: str, out: str) -> None:
    from kdoiqa import engine
    from kdoiqa.image_store import ImageStore
    from kdoiqa.methods import TargetScale
    from kdoiqa.settings import DataSettings, OptimSettings, RuntimeSettings, TrainingSettings
    from kdoiqa.training import _wrap

    db = load_database(root)
    store = ImageStore(db, db.images, "erp", DataSettings(erp_size=(32, 16), workers=0, cache="cpu"), device,
                       progress=False)
    store.set_features({name: torch.randn(512, generator=torch.Generator().manual_seed(i))
                        for i, name in enumerate(db.images)})
    method = _student()
    before = {k: v.clone() for k, v in method.policy.state_dict().items()}
    optimizer = engine.build_optimizer(method, OptimSettings(lr=1e-3))
    settings = TrainingSettings("mask_train", "ours", DataSettings(), RuntimeSettings(), None, OptimSettings(), None, None)
    steps = _wrap(method, settings, device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in (1, 2):
        engine.train_one_epoch(method, steps[method.nets_in_use(epoch)], store, db.images, optimizer, scaler,
                               engine.autocast_for("none", device),
                               TargetScale(), 4, epoch, engine.epoch_generator(0, 0, epoch))
    torch.save({"before": before, "after": method.policy.state_dict(),
                "trunk_moved": not torch.equal(method.model.head.weight, _student().model.head.weight)},
               f"{out}/idle{rank}.pt")


def test_idle_policy_untouched_under_ddp(tiny_db, tmp_path):
    """The policy gets no gradient before the mask phase: Adam (weight decay included) must not move it."""
    torch.multiprocessing.spawn(_idle_worker, args=(2, free_port(), str(tiny_db), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"idle{rank}.pt", weights_only=True)
        assert saved["trunk_moved"]
        for name, value in saved["before"].items():
            assert torch.equal(saved["after"][name], value), name


# ----------------------------------------------------------------------------------------------
# Real torchrun launches of teacher_train.py.

FAST = ["--no-pretrained", "--face-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress",
        "--deterministic", "--epochs", "2"]


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           f"--master_port={free_port()}", *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tiny_db: Path, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ddp")
    folds = write_folds(make_folds(load_database(tiny_db), k=2, seed=5), tiny_db / "folds" / "k2_seed5.json")
    common = ["teacher_train.py", "--database", str(tiny_db), "--folds-file", str(folds), *FAST]
    single = subprocess.run([sys.executable, *common, "--out", str(work / "single")], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr
    by_folds = torchrun(*common, "--parallel", "folds", "--out", str(work / "folds"))
    by_batch = torchrun(*common, "--fold", "0", "--parallel", "batch", "--out", str(work / "batch"))
    return {"single": work / "single", "folds": work / "folds", "batch": work / "batch", "split": folds,
            "stdout": {"folds": by_folds.stdout, "batch": by_batch.stdout}}


def test_fold_parallel_equals_sequential(runs):
    """Each rank trains whole folds: every fold's predictions and checkpoint are those of a sequential run."""
    for k in (0, 1):
        for name in ("predictions.csv", "checkpoint.pt", "metrics.json"):
            assert (runs["folds"] / f"fold{k}" / name).read_bytes() == (runs["single"] / f"fold{k}" / name).read_bytes(), \
                (k, name)
    assert (runs["folds"] / "results.csv").read_bytes() == (runs["single"] / "results.csv").read_bytes()
    assert runs["stdout"]["folds"].count("results:") == 1  # rank 0 alone wrote the run's tables
    log = [json.loads(line) for line in (runs["folds"] / "log.jsonl").read_text().splitlines()]
    assert [(r["fold"], r["epoch"]) for r in log] == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_batch_parallel_rank0_alone_writes(runs):
    run = runs["batch"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["fold"], r["epoch"]) for r in log] == [(0, 1), (0, 2)]  # not once per rank
    assert runs["stdout"]["batch"].count("results:") == 1
    assert len(list((run / "fold0").glob("events.out.tfevents.*"))) == 1
    record = json.loads((run / "args.json").read_text())
    assert record["script"] == "teacher_train" and record["parallel"] == "batch" and record["processes"] == 2


def test_batch_parallel_metrics_on_the_whole_test_set(runs):
    test = json.loads(runs["split"].read_text())["folds"][0]["test"]
    preds = pd.read_csv(runs["batch"] / "fold0" / "predictions.csv")
    assert sorted(preds["image"]) == sorted(test)
    table = pd.read_csv(runs["batch"] / "results.csv")
    assert int(table.loc[0, "n"]) == len(test)


def test_fold_parallel_with_fewer_folds_than_processes(tmp_path):
    """A single split (cross-database) under --parallel folds: rank 0 trains it, rank 1 idles, nothing hangs."""
    from conftest import make_tiny_db

    a = make_tiny_db(tmp_path / "A", contents=3, levels=2, seed=61)
    b = make_tiny_db(tmp_path / "B", contents=2, levels=2, seed=62)
    proc = torchrun("crossdb_train.py", "--database-train", str(a), "--database-test", str(b), "--kd", "none",
                    "--out", str(tmp_path / "run"), *FAST[:-2], "--epochs", "1")
    assert "process 1 has none to train" in proc.stdout and proc.stdout.count("results:") == 1
    assert (tmp_path / "run" / "results.csv").is_file() and (tmp_path / "run" / "fold0" / "checkpoint.pt").is_file()
