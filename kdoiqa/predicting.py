"""Score 360-degree (ERP) images with a trained KD-OIQA model.

Give a checkpoint, a fold folder, or a whole run folder: with a run folder every fold's model
scores every image and the output gives their mean and spread (and each fold's score in the CSV).
A student needs only the ERP image (resized to its training size); a teacher gets its six cube
faces projected on the fly, on the same device. Any image mode is decoded by one rule (16-bit
values by their high byte, float ones as 0-1, transparency over white, EXIF orientation applied:
kdoiqa.images.read_rgb); an image that is not 2:1 is scored stretched to 2:1 after a warning. A
folder means the images under it; a database folder (one holding meta.csv) the images its meta.csv
lists; a database's derived folders (erp_<W>x<H>/, faces_<size>/) are never inputs. An unreadable
file is reported and skipped, the rest scored, and the exit code is 1 at the end (`--strict`: stop
at the first). Prints `image<TAB>score` after a header line stating the scale and direction of the
training database's scores.

    python predict.py runs/mask_train/<key>/<run> my_360_photos/ --csv scores.csv
    python predict.py runs/mask_train/<key>/<run>/fold0/checkpoint.pt my_panorama.jpg
    kdoiqa-predict runs/mask_train/<key>/<run> my_360_photos/     # the same, installed (pip install)
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kdoiqa.api import Scorer, load
from kdoiqa.common import UserError, atomic_write_csv, first_line
from kdoiqa.databases import IMAGE_SUFFIXES, load_database
from kdoiqa.images import is_derived_folder


def collect_images(inputs: list[Path]) -> list[Path]:
    """The files to score: each file given, and each folder's images (`folder_images`)."""
    images: list[Path] = []
    for item in inputs:
        if item.is_dir() and is_derived_folder(item.name) and (item.parent / "meta.csv").is_file():
            raise UserError(f"{item}: a derived folder of the database {item.parent} (resized copies or cube faces), "
                            f"not inputs; give {item.parent} to score its meta.csv images")
        if item.is_dir():
            found = folder_images(item)
            if not found:
                raise UserError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    return images


def folder_images(root: Path) -> list[Path]:
    """A database folder (one holding meta.csv) stands for the images its meta.csv lists, in its order. Any
    other folder stands for the image files under it, searched recursively and sorted, following links
    (each folder once), where a database folder met on the way counts as its meta.csv images. The derived
    folders of a database (`erp_<W>x<H>/`, `faces_<size>/...`: resized copies and cube faces) are never
    inputs, nor hidden files and folders (`.name.*.tmp.png` are temporaries of an interrupted atomic write).
    A broken link named like an image is kept, to be reported as missing. What was skipped is said on stderr."""
    found: list[Path] = []
    derived: list[str] = []
    seen: set[Path] = set()

    def visit(folder: Path) -> None:
        real = folder.resolve()
        if real in seen:
            return
        seen.add(real)
        if (folder / "meta.csv").is_file():
            try:
                db = load_database(folder, check_files=False)
            except UserError as err:
                raise UserError(f"{folder} holds a meta.csv, so it is read as a database folder, but: {err}") from None
            found.extend(folder / image for image in db.images)
            print(f"{folder}: a database folder: scoring the {len(db)} images listed in its meta.csv "
                  f"(not its derived folders)", file=sys.stderr)
            return
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if is_derived_folder(entry.name):
                    derived.append(str(entry.relative_to(root)))
                else:
                    visit(entry)
            elif entry.suffix.lower() in IMAGE_SUFFIXES and (entry.is_file() or entry.is_symlink()):
                found.append(entry)

    if (root / "meta.csv").is_file():
        visit(root)
        return found
    visit(root)
    if derived:
        shown = ", ".join(derived[:4]) + (f", ... ({len(derived)} in all)" if len(derived) > 4 else "")
        print(f"{root}: skipped derived folders (a database's resized copies and cube faces, never inputs): {shown}",
              file=sys.stderr)
    return sorted(found)


def check_csv(csv: Path | None) -> None:
    """Checked before any work: a bad --csv leaves nothing half-done."""
    if csv is None:
        return
    if csv.is_dir():
        raise UserError(f"{csv}: is a folder; --csv takes a file path")
    blocking = next((p for p in csv.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{blocking}: is a file, so --csv {csv} cannot be written")


def decoded(paths: list[Path], load, threads: int, strict: bool,
            skipped: list[str]) -> Iterator[tuple[Path, torch.Tensor]]:
    """(path, pixels) of every readable image in order, decoded `threads` at a time; unreadable ones
    are listed in `skipped` (or, with `strict`, stop everything)."""
    def attempt(path: Path):
        try:
            return load(path)
        except UserError as err:
            if strict:
                raise
            return err

    with ThreadPoolExecutor(threads) as pool:
        for path, value in zip(paths, pool.map(attempt, paths)):
            if isinstance(value, UserError):
                skipped.append(first_line(value, 300))
                print(f"skipped: {first_line(value, 300)}", file=sys.stderr)
            else:
                yield path, value


def batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(model: Path, inputs: Sequence[Path], *, csv: Path | None = None, device: str | None = None,
            batch_size: int = 16, threads: int = 4, amp: str = "auto", strict: bool = False,
            allow_partial: bool = False, progress: bool = True) -> int:
    """predict.py's work: score `inputs` (files and folders) with `model` (a checkpoint, a fold folder or a run
    folder), print `image<TAB>score` under a header line, optionally write `csv`. Returns the exit code: 1
    when some image was unreadable and skipped, else 0."""
    check_csv(csv)
    # Any image: one that is not 2:1 is scored after a warning.
    scorer = load(model, device, amp=amp, batch_size=batch_size, require_two_to_one=False,
                  allow_partial=allow_partial)
    images = collect_images(list(inputs))
    names, scores, skipped = score_files(scorer, images, threads, strict, progress)
    values = np.concatenate(scores).astype(np.float64) if scores else np.zeros((0, len(scorer.models)))
    direction = "higher is better" if scorer.higher_is_better else "higher is worse (DMOS)"
    lo, hi = scorer.score_range
    folds = models_note(scorer)
    print(f"# {scorer.kind} trained on {scorer.database} ({folds}): scores on its scale {lo:g}-{hi:g}, {direction}")
    frame = pd.DataFrame({"image": names, "score": values.mean(axis=1)})
    if len(scorer.models) > 1:
        frame["std"] = values.std(axis=1, ddof=1)
        for i, path in enumerate(scorer.paths):
            frame[path.parent.name] = values[:, i]
    for row in frame.itertuples(index=False):
        print(f"{row.image}\t{row.score:.4f}" + (f"\t{row.std:.4f}" if len(scorer.models) > 1 else ""))
    if csv is not None:
        atomic_write_csv(csv, frame)
    if skipped:
        print(f"error: {len(skipped)} of {len(images)} image(s) unreadable and skipped: {'; '.join(skipped)}",
              file=sys.stderr)
        return 1
    return 0


def models_note(scorer: Scorer) -> str:
    """What the header says of the models: one, or the mean of several folds; and a partial run's unfinished folds."""
    used = ", ".join(map(str, scorer.folds))
    if scorer.unfinished_folds:
        missing = ("fold " if len(scorer.unfinished_folds) == 1 else "folds ") + ", ".join(map(str, scorer.unfinished_folds))
        what = f"mean and std of folds {used}" if len(scorer.models) > 1 else f"fold {used} alone"
        return f"{what}: a partial run, {missing} unfinished and left out (--allow-partial)"
    return f"mean and std of {len(scorer.models)} folds' models" if len(scorer.models) > 1 else f"one model, fold {used}"


def score_files(scorer: Scorer, images: list[Path], threads: int, strict: bool,
                progress: bool) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Every readable file scored by every model of `scorer` (decoded `threads` at a time, through the scorer's
    own input path): names, [batch, models] score arrays, and the unreadable files' messages."""
    from tqdm import tqdm

    names, scores, skipped = [], [], []
    with torch.no_grad(), tqdm(total=len(images), unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in batched(decoded(images, scorer.prepare, threads, strict, skipped), scorer.batch_size):
            scores.append(scorer.score_prepared([pixels for _, pixels in batch]).cpu().numpy())
            names += [str(path) for path, _ in batch]
            bar.update(len(batch))
    return names, scores, skipped
