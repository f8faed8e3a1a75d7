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

from common import UserError
from databases import Database
from distributed import DIST
from images import ImageDataset, project_faces
from settings import DataSettings


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


def _collate(items: list[dict]) -> dict:
    return {"index": torch.tensor([it["index"] for it in items]),
            "pixels": torch.stack([it["pixels"] for it in items])}


class ImageStore:
    """The pixels of a database's images for one view, batched onto the training device."""

    def __init__(self, db: Database, images: Sequence[str], view: str, data: DataSettings, device: torch.device, *,
                 progress: bool = True) -> None:
        self.db, self.view, self.data, self.device = db, view, data, device
        self.images = list(dict.fromkeys(images))
        self.row = {name: i for i, name in enumerate(self.images)}
        self.mos = torch.from_numpy(db.scores(self.images).astype(np.float32))
        self.features: torch.Tensor | None = None
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
        store.db, store.view, store.data, store.device = db, view, data, device
        store.images = list(db.images)
        store.row = {name: i for i, name in enumerate(store.images)}
        store.mos = torch.from_numpy(db.scores(store.images).astype(np.float32))
        store.features, store.dataset, store.mode, store.pixels = None, None, "cpu", pixels
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
        if request == "auto":
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                request = "gpu" if nbytes < 0.4 * free else "cpu"
            if request != "gpu":
                request = "cpu" if nbytes < 0.4 * available_ram() else "none"
        if request == "gpu" and self.device.type != "cuda":
            request = "cpu"  # --cache gpu on a CPU run is the CPU cache
        if progress:
            print(f"pixel cache: {request} ({len(self.images)} images, {self.view}, {nbytes / 2**30:.2f} GiB uint8)",
                  flush=True)
        return request

    def _faces_online(self) -> bool:
        if self.data.faces != "auto":
            return self.data.faces == "online"
        return not all(p.is_file() for image in self.images
                       for p in self.db.face_paths(image, self.data.face_size, self.data.face_jpeg_quality))

    def _decode_all(self, progress: bool) -> torch.Tensor:
        from tqdm import tqdm

        target = self.device if self.mode == "gpu" else torch.device("cpu")
        pixels = torch.empty((len(self.images), *pixel_shape(self.view, self.data)), dtype=torch.uint8, device=target)
        online = self.view == "faces" and self._faces_online()
        # Faces not on disk: the workers decode the original ERPs and the faces are projected on the device.
        source = ImageDataset(self.db, self.images, "erp_native") if online else self.dataset
        loader = torch.utils.data.DataLoader(source, batch_size=1 if online else 8, num_workers=self.data.workers,
                                             collate_fn=_collate)
        desc = f"decode {self.view}" + (f" (cube faces on {self.device.type})" if online else "")
        with tqdm(total=len(self.images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for batch in loader:
                chunk = batch["pixels"]
                if online:
                    chunk = project_faces(chunk.to(self.device), self.data.face_size, self.data.face_jpeg_quality)
                pixels[batch["index"].to(target)] = chunk.to(target)
                bar.update(len(batch["index"]))
        return pixels

    def _check_readable(self) -> None:
        """Streaming (--cache none): check every source file opens before training starts, so that a
        bad file is reported before the run folder exists rather than in the middle of an epoch."""
        from derived_files import check_readable

        if self.view == "faces" and not self._faces_online():
            paths = [p for image in self.images
                     for p in self.db.face_paths(image, self.data.face_size, self.data.face_jpeg_quality)]
        elif self.view == "erp":
            paths = [self.db.erp_path(x, self.data.erp_size) if self.db.erp_path(x, self.data.erp_size).is_file()
                     else self.db.path(x) for x in self.images]
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
        if self.pixels is not None:
            for idx, weight in plan:
                yield self._batch(idx, self.pixels[idx.to(self.pixels.device)], weight)
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=[idx.tolist() for idx, _ in plan],
                                             num_workers=self.data.workers, collate_fn=_collate,
                                             pin_memory=self.device.type == "cuda")
        for (_, weight), batch in zip(plan, loader):
            yield self._batch(batch["index"], batch["pixels"], weight)

    def _batch(self, idx: torch.Tensor, pixels: torch.Tensor, weight: float = 1.0) -> dict:
        nb = self.device.type == "cuda"
        batch = {"pixels": pixels.to(self.device, non_blocking=nb), "mos": self.mos[idx].to(self.device),
                 "images": [self.images[i] for i in idx.tolist()], "rows": idx, "weight": weight}
        if self.features is not None:
            batch["teacher_feature"] = self.features[idx.to(self.features.device)]
        return batch
