"""Files derived from a database's images, written beside it: resized ERPs and cube faces.

`resize_database` writes `<db>/erp_<W>x<H>/<stem>.png` (the student's input) with `images.resize_rgb`,
the one resize the project uses, so training from the originals and from these files gives identical
pixels. `extract_database` writes `<db>/faces_<size>/` (ours) or `<db>/faces_<size>_equi2cubic_jpeg<q>/`
(the paper's chain) `<stem>_{F,R,BA,L,T,BO}.png` (the teacher's input) with `images.project_faces`, the
function that also projects faces on the fly. Both decode and write with a pool of threads, skip
up-to-date outputs, check every source before writing anything, and write each file atomically (lossless
PNG), so an interrupted run leaves no torn file. Each PNG records the size and modification time of the
source it was made from (`images.source_stamp`); one whose source has changed since is rewritten here
and never read by training (`images.derived_is_fresh`, the one check of both).
"""
from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdoiqa.common import UserError, atomic_path, completed
from kdoiqa.databases import Database, check_files_exist
from kdoiqa.images import STAMP_KEY, derived_is_fresh, read_rgb, resize_rgb, source_stamp
from kdoiqa.images import warn_not_two_to_one as warn_aspect


@dataclass
class Summary:
    """What a run did, per meta.csv image."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_two_to_one: list[str] = field(default_factory=list)

    def line(self, what: str, where: Path) -> str:
        return (f"{what}: wrote {len(self.written)}, skipped {len(self.skipped)} up to date "
                f"({len(self.written) + len(self.skipped)} images) in {where}")


def write_png(path: Path, pixels: np.ndarray, compress_level: int = 6, stamp: str | None = None) -> None:
    """Lossless PNG, written atomically (a killed run never leaves a torn file); `stamp`: its source's
    `images.source_stamp`, kept in a text chunk."""
    from PIL import Image, PngImagePlugin

    info = None
    if stamp is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(STAMP_KEY, stamp)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", compress_level=compress_level,
                                                           pnginfo=info)


def is_up_to_date(source: Path, outputs: Sequence[Path]) -> bool:
    """All outputs exist and were made from the source as it is now (`images.derived_is_fresh`)."""
    return derived_is_fresh(source, outputs)


def check_sources(db: Database, outputs_of: dict[str, Sequence[Path]]) -> None:
    """Every source exists and no two images share an output file (e.g. `a.jpg` and `a.png`)."""
    check_files_exist(db)
    owner: dict[Path, str] = {}
    for image, outputs in outputs_of.items():
        for out in outputs:
            if out in owner:
                raise UserError(f"{db.root / 'meta.csv'}: {owner[out]!r} and {image!r} would both write {out}; "
                                f"rename one of them")
            owner[out] = image


def check_readable(paths: Iterable[Path]) -> None:
    """A cheap pass before anything is written: every file opens as an image and its chunks are whole
    (PIL's verify: PNG CRCs and truncation), so a bad file is reported before a half-made output."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds on a bad file
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"{path}: unreadable image ({type(err).__name__}: {detail})") from None


def warn(message: str) -> None:
    """One line on stderr that does not break a running progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def warn_not_two_to_one(path: Path, width: int, height: int) -> bool:
    """The shared 2:1 rule's warning (`images.not_two_to_one`), below a running progress bar."""
    from tqdm import tqdm

    return warn_aspect(str(path), width, height, lambda line: tqdm.write(line, file=sys.stderr))


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or total == 0, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# ERP resizing.

def _resize_one(db: Database, image: str, erp_size: tuple[int, int]) -> bool:
    """Decode, resize, write; returns whether the source is 2:1."""
    source = db.path(image)
    stamp = source_stamp(source)  # before reading: a change while reading leaves the file stale
    pixels = read_rgb(source)
    height, width = pixels.shape[:2]
    odd = warn_not_two_to_one(source, width, height)
    write_png(db.erp_path(image, erp_size), resize_rgb(pixels, erp_size), stamp=stamp)
    return not odd


def plan_outputs(db: Database, outputs: dict[str, list[Path]], force: bool) -> tuple[Summary, list[str]]:
    """Check the sources, skip the images whose outputs are up to date, and return what is left to do."""
    check_sources(db, outputs)
    summary = Summary()
    todo = []
    for image, paths in outputs.items():
        if not force and is_up_to_date(db.path(image), paths):
            summary.skipped.append(image)
        else:
            todo.append(image)
    check_readable(db.path(image) for image in todo)
    return summary, todo


def resize_database(db: Database, erp_size: tuple[int, int] = (1024, 512), threads: int = 8, *,
                    force: bool = False, progress: bool = True, images: Iterable[str] | None = None) -> Summary:
    """Write `db.erp_path(image, erp_size)` for every image (or `images`) with `threads` threads;
    skip up-to-date files."""
    erp_size = (int(erp_size[0]), int(erp_size[1]))
    if erp_size[0] < 1 or erp_size[1] < 1:
        raise UserError(f"--erp-size must be positive, got {erp_size[0]}x{erp_size[1]}")
    workers = max(1, int(threads))
    chosen = list(db.images if images is None else images)
    summary, todo = plan_outputs(db, {image: [db.erp_path(image, erp_size)] for image in chosen}, force)
    bar = progress_bar(len(todo), f"erp_{erp_size[0]}x{erp_size[1]}", progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_resize_one, db, image, erp_size): image for image in todo}
        try:
            for image, two_to_one in completed(futures):
                if not two_to_one:
                    summary.not_two_to_one.append(image)
                summary.written.append(image)
                bar.update(1)
        finally:
            bar.close()
    order = {image: i for i, image in enumerate(chosen)}
    summary.written.sort(key=order.__getitem__)
    summary.not_two_to_one.sort(key=order.__getitem__)
    return summary


# ----------------------------------------------------------------------------------------------
# Cube faces.

# Largest batch (in ERP pixels) sent to the device at once; big panoramas go one at a time.
MAX_BATCH_PIXELS = 64 * 1024 * 1024


def _write_faces(paths: list[Path], faces: np.ndarray, stamp: str) -> None:
    for path, face in zip(paths, faces):
        write_png(path, face, stamp=stamp)


def _decode(source: Path) -> tuple[str, np.ndarray]:
    stamp = source_stamp(source)  # before reading: a change while reading leaves the faces stale
    return stamp, read_rgb(source)


def extract_database(db: Database, face_size: int = 256, device=None, threads: int = 8, *,
                     jpeg_quality: int | None = None, batch_size: int = 8, force: bool = False,
                     progress: bool = True, images: Iterable[str] | None = None) -> Summary:
    """Write `db.face_paths(image, face_size, jpeg_quality)` for every image (or `images`) with `threads`
    decoding/writing threads and the projection batched on `device`; skip up-to-date ones."""
    import torch

    from kdoiqa.distributed import resolve_device
    from kdoiqa.images import project_faces

    if face_size < 1:
        raise UserError(f"--face-size must be at least 1, got {face_size}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    workers = max(1, int(threads))
    dev = device if isinstance(device, torch.device) else resolve_device(None if device in (None, "auto") else str(device))
    chosen = list(db.images if images is None else images)
    outputs = {image: db.face_paths(image, face_size, jpeg_quality) for image in chosen}
    summary, todo = plan_outputs(db, outputs, force)

    bar = progress_bar(len(todo), db.faces_dir(face_size, jpeg_quality).name, progress)
    pool = ThreadPoolExecutor(max_workers=workers)
    decoding: deque[tuple[str, Future]] = deque()
    stamps: dict[str, str] = {}
    writing: deque[Future] = deque()
    pending = iter(todo)
    window = max(2 * workers, batch_size + workers)

    def fill() -> None:
        while len(decoding) < window:
            image = next(pending, None)
            if image is None:
                return
            decoding.append((image, pool.submit(_decode, db.path(image))))

    def drain(limit: int) -> None:
        while len(writing) > limit:
            writing.popleft().result()

    def flush(batch: list[tuple[str, np.ndarray]]) -> None:
        if not batch:
            return
        erp = torch.from_numpy(np.stack([pixels for _, pixels in batch])).permute(0, 3, 1, 2)
        # no_grad, not inference_mode: the projection caches its sampling grids, and a grid made in
        # inference mode could not take part in a later differentiable projection (the scorer as a loss).
        with torch.no_grad():
            faces = project_faces(erp.to(dev, non_blocking=True), face_size, jpeg_quality)  # [B,6,3,s,s] uint8
        faces = faces.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B,6,s,s,3]
        for (image, _), image_faces in zip(batch, faces):
            writing.append(pool.submit(_write_faces, outputs[image], image_faces, stamps.pop(image)))
            summary.written.append(image)
        drain(4 * workers)
        bar.update(len(batch))
        batch.clear()

    try:
        batch: list[tuple[str, np.ndarray]] = []
        fill()
        while decoding:
            image, future = decoding.popleft()
            stamps[image], pixels = future.result()
            fill()
            height, width = pixels.shape[:2]
            if min(width, height) < 2:
                raise UserError(f"{db.path(image)}: {width}x{height} is too small to project cube faces from")
            if warn_not_two_to_one(db.path(image), width, height):
                summary.not_two_to_one.append(image)
            if batch and batch[0][1].shape != pixels.shape:
                flush(batch)
            batch.append((image, pixels))
            limit = max(1, min(batch_size, MAX_BATCH_PIXELS // max(1, height * width)))
            if len(batch) >= limit:
                flush(batch)
        flush(batch)
        drain(0)
    except BaseException:
        for _, future in decoding:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return summary


