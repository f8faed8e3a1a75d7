"""The pixel cache: every image of a run decoded once into uint8 memory, served as batches.

An `ImageStore` holds the pixels of one view ("erp" for the student, "faces" for the teacher) of a
database's images, decoded by DataLoader workers once per run (and, for faces not on disk,
projected on the training device) into CPU or GPU memory; every epoch and fold then draws its
batches from it. With `--cache none` (or when the cache would not fit) the batches are streamed
from disk by a DataLoader instead. Teacher features ride along in each batch when set.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kdoiqa.accelerator import ACCELERATOR
from kdoiqa.common import UserError
from kdoiqa.databases import Database
from kdoiqa.distributed import DIST
from kdoiqa.images import ImageDataset, project_faces
from kdoiqa.settings import DataSettings


def pixel_shape(view: str, data: DataSettings) -> tuple[int, ...]:
    if view == "faces":
        return (6, 3, data.face_size, data.face_size)
    width, height = data.erp_size
    return (3, height, width)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


CACHE_SHARE = 0.4  # the share of the free GPU memory (or available RAM) the pixel cache may take


def choose_cache(request: str, nbytes: int, device_type: str, *, gpu_free: int = 0, gpu_sharers: int = 1,
                 ram: int = 0, ram_sharers: int = 1) -> tuple[str, str]:
    """Where `--cache request` puts `nbytes` of pixels: (gpu | cpu | none, why, when not what was asked).

    `auto` takes the GPU when the cache fits in CACHE_SHARE of the free memory divided among the
    processes sharing that GPU (they measure the same free memory at the same moment), else the
    CPU when it fits in that share of the RAM divided among the machine's processes, else streams."""
    if request == "gpu" and device_type != "cuda":
        return "cpu", ""  # --cache gpu on a CPU run is the CPU cache
    if request != "auto":
        return request, ""
    reason = ""
    if device_type == "cuda":
        budget = CACHE_SHARE * gpu_free / max(gpu_sharers, 1)
        if nbytes < budget:
            return "gpu", ""
        shared = f" shared by {gpu_sharers} processes" if gpu_sharers > 1 else ""
        reason = (f"{nbytes / 2**30:.2f} GiB exceeds {CACHE_SHARE:.0%} of the GPU's free "
                  f"{gpu_free / 2**30:.1f} GiB{shared}")
    ram_budget = CACHE_SHARE * ram / max(ram_sharers, 1)
    if nbytes < ram_budget:
        return "cpu", (f"{reason}: kept in RAM instead" if reason else "")
    return "none", (f"{nbytes / 2**30:.2f} GiB exceeds {CACHE_SHARE:.0%} of the available RAM "
                    f"({ram / 2**30:.1f} GiB{f' for {ram_sharers} processes' if ram_sharers > 1 else ''}): "
                    f"streamed from disk each epoch")


def _collate(items: list[dict]) -> dict:
    return {"index": torch.tensor([it["index"] for it in items]),
            "pixels": torch.stack([it["pixels"] for it in items])}


class ImageStore:
    """The pixels of a database's images for one view, batched onto the training device."""

    def __init__(self, db: Database, images: Sequence[str], view: str, data: DataSettings, device: torch.device, *,
                 progress: bool = True) -> None:
        self.db, self.view, self.data, self.device = db, view, data, ACCELERATOR.canonical(device)
        self.images = list(dict.fromkeys(images))
        self.row = {name: i for i, name in enumerate(self.images)}
        self.mos = torch.from_numpy(db.scores(self.images).astype(np.float32))
        self.mos_on_device = self.mos.to(self.device)
        self.features: torch.Tensor | None = None
        self._loader = None
        self.dataset = ImageDataset(db, self.images, view, erp_size=data.erp_size, face_size=data.face_size,
                                    faces_source=data.faces, jpeg_quality=data.face_jpeg_quality)
        self.mode = self._choose_cache(data.cache, progress)
        self.pixels: torch.Tensor | None = None
        if self.mode != "none":
            self.pixels = self._decode_all(progress)
        else:
            self._check_readable()

    @classmethod
    def from_pixels(cls, db: Database, view: str, data: DataSettings, device: torch.device,
                    pixels: torch.Tensor) -> ImageStore:
        """A store over pixels already in memory ([N, ...] uint8 in `db.images` order): benchmarks, tests."""
        store = cls.__new__(cls)
        store.db, store.view, store.data, store.device = db, view, data, ACCELERATOR.canonical(device)
        store.images = list(db.images)
        store.row = {name: i for i, name in enumerate(store.images)}
        store.mos = torch.from_numpy(db.scores(store.images).astype(np.float32))
        store.mos_on_device = store.mos.to(store.device)
        store.features, store.dataset, store.mode, store.pixels, store._loader = None, None, "cpu", pixels, None
        return store

    def set_features(self, features: dict[str, torch.Tensor]) -> None:
        """Carry each image's cached teacher feature in its batches (kept on the training device)."""
        missing = [x for x in self.images if x not in features]
        if missing:
            raise UserError(f"teacher features lack {len(missing)} image(s), e.g. {missing[0]!r}")
        self.features = torch.stack([features[x].float() for x in self.images]).to(self.device)

    # -- filling the cache ---------------------------------------------------------------------
    def _choose_cache(self, request: str, progress: bool) -> str:
        nbytes = len(self.images) * int(np.prod(pixel_shape(self.view, self.data)))
        accelerated = ACCELERATOR.takes(self.device)
        gpu_free = ACCELERATOR.free_memory(self.device) if accelerated and request == "auto" else 0
        local = DIST.local_world if DIST.enabled else 1
        mode, reason = choose_cache(request, nbytes, "cuda" if accelerated else self.device.type, gpu_free=gpu_free,
                                    gpu_sharers=DIST.gpu_sharers(self.device), ram=available_ram(), ram_sharers=local)
        if progress:
            print(f"pixel cache: {mode} ({len(self.images)} images, {self.view}, {nbytes / 2**30:.2f} GiB uint8)"
                  + (f"; {reason}" if reason else ""), flush=True)
        return mode

    def _faces_online(self) -> bool:
        if self.data.faces != "auto":
            return self.data.faces == "online"
        return not all(image in self.dataset.derived for image in self.images)  # every face file there and fresh

    def _decode_all(self, progress: bool) -> torch.Tensor:
        from tqdm import tqdm

        target = self.device if self.mode == "gpu" else torch.device("cpu")
        pixels = torch.empty((len(self.images), *pixel_shape(self.view, self.data)), dtype=torch.uint8, device=target)
        online = self.view == "faces" and self._faces_online()
        # Faces not on disk: the workers decode the original ERPs and the faces are projected on the device.
        source = ImageDataset(self.db, self.images, "erp_native") if online else self.dataset
        loader = torch.utils.data.DataLoader(source, batch_size=1 if online else 8, num_workers=self.data.workers,
                                             collate_fn=_collate, worker_init_fn=_worker_init)
        desc = f"decode {self.view}" + (f" (cube faces on {self.device.type})" if online else "")
        with tqdm(total=len(self.images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for batch in loader:
                chunk = batch["pixels"]
                if online:
                    chunk = project_faces(chunk.to(self.device), self.data.face_size, self.data.face_jpeg_quality)
                pixels[batch["index"].to(target)] = ACCELERATOR.to_device(chunk, target)
                bar.update(len(batch["index"]))
        return pixels

    def _check_readable(self) -> None:
        """Streaming (--cache none): check every source file opens before training starts, so that a
        bad file is reported before the run folder exists rather than in the middle of an epoch."""
        from kdoiqa.derived_files import check_readable

        # The files the batches will read: a fresh derived file, else (missing or stale) the source.
        derived = self.dataset.derived
        if self.view == "faces":
            paths = [p for image in self.images
                     for p in (self.db.face_paths(image, self.data.face_size, self.data.face_jpeg_quality)
                               if image in derived else [self.db.path(image)])]
        elif self.view == "erp":
            paths = [self.db.erp_path(x, self.data.erp_size) if x in derived else self.db.path(x) for x in self.images]
        else:
            paths = [self.db.path(x) for x in self.images]
        check_readable(paths)

    # -- serving batches -----------------------------------------------------------------------
    def batches(self, images: Sequence[str], batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, shard: bool = False) -> Iterator[dict]:
        """Batches of `images` (shuffled by `generator`).

        With `shard` under `--parallel batch`, each global batch is split across the ranks (rank r
        takes rows r, r+N, ...). Every batch carries `weight` = this rank's share of the global batch,
        so that the sum over the ranks of weight x their mean loss is the global batch's mean loss (DDP
        sums the ranks' gradients: distributed.sum_gradients). A rank whose share of a short last batch
        is empty gets the batch's first row with weight 0: it takes part in the step, contributing nothing.
        """
        rows = torch.tensor([self.row[x] for x in images], dtype=torch.long)
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        rank, world = DIST.shard if shard else (0, 1)
        plan = []
        for start in range(0, len(rows), batch_size):
            whole = rows[start:start + batch_size]
            mine = whole[rank::world]
            plan.append((mine if len(mine) else whole[:1], len(mine) / len(whole)))
        if not plan:
            return
        # The epoch's order goes to the training device in one copy; each batch then indexes the scores,
        # the features and (GPU cache) the pixels with a slice of it: no host-to-device copy per step.
        on_device = self._to_device(torch.cat([idx for idx, _ in plan])).split([len(idx) for idx, _ in plan])
        if self.pixels is not None:
            for (idx, weight), dev_idx in zip(plan, on_device):
                # The branch is the cache's mode, never a comparison of devices (cuda != cuda:0).
                pixels = self.pixels[dev_idx] if self.mode == "gpu" else self._gather_to_device(idx)
                yield self._batch(idx, dev_idx, pixels, weight)
            return
        loader = self._streaming_loader([idx for idx, _ in plan])
        for (idx, weight), dev_idx, batch in zip(plan, on_device, loader):
            yield self._batch(idx, dev_idx, self._to_device(batch["pixels"]), weight)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return ACCELERATOR.to_device(tensor, self.device)

    def _gather_to_device(self, rows: torch.Tensor) -> torch.Tensor:
        """The CPU cache's rows on the training device: gathered straight into a pinned host buffer (one
        host copy), whose copy to the GPU then overlaps the GPU's work; on a CPU run, the gather alone."""
        if not ACCELERATOR.takes(self.device):
            return self.pixels[rows]
        buffer = ACCELERATOR.empty_pinned((len(rows), *self.pixels.shape[1:]), self.pixels.dtype, self.device)
        torch.index_select(self.pixels, 0, rows, out=buffer)
        return ACCELERATOR.to_device(buffer, self.device)

    def _streaming_loader(self, plan: list[torch.Tensor]) -> torch.utils.data.DataLoader:
        """--cache none: one DataLoader per store, its workers kept between epochs (persistent), serving
        the batches of the current plan."""
        if self._loader is None:
            self._sampler = _PlanSampler()
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._sampler, num_workers=self.data.workers, collate_fn=_collate,
                pin_memory=ACCELERATOR.loader_pins(self.device), persistent_workers=self.data.workers > 0,
                worker_init_fn=_worker_init)
        self._sampler.plan = [idx.tolist() for idx in plan]
        return self._loader

    def _batch(self, idx: torch.Tensor, dev_idx: torch.Tensor, pixels: torch.Tensor, weight: float = 1.0) -> dict:
        batch = {"pixels": pixels, "mos": self.mos_on_device[dev_idx], "images": [self.images[i] for i in idx.tolist()],
                 "rows": idx, "weight": weight}
        if self.features is not None:
            batch["teacher_feature"] = self.features[dev_idx]
        return batch


def _worker_init(worker_id: int) -> None:
    """A data-loading worker ignores Ctrl-C: the training process holds it back until its epoch's state is
    saved (common.deferred_interrupts) and then ends its workers itself. Forked workers inherit that
    handler; spawned and forkserver ones (Python 3.14's default on Linux) would otherwise die at the first
    Ctrl-C of the terminal's process group and end the epoch in a DataLoader error. SIGTERM keeps its
    default: it is how DataLoader and multiprocessing end a worker that does not stop by itself."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _PlanSampler:
    """The batch sampler of a persistent streaming DataLoader: the batches of the current epoch."""

    def __init__(self) -> None:
        self.plan: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.plan))

    def __len__(self) -> int:
        return len(self.plan)
