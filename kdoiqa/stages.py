"""The pipeline's stages as functions: what each script does, callable by reproduce.py and the
cross-database matrix as well (scripts never import scripts).

    train_teacher(settings)              teacher_train.py / teacher_crossdb_train.py
    write_teacher_features(evaluation)   feat_save.py / crossdb_feat.py (save_authors_features: --from-authors)
    train_student(settings)              mask_train.py / crossdb_train.py

A cross-database pair runs through the same functions as a database's folds: it is a fold set of one
split (pairs.Evaluation), and what differs (its feature file, the fold a file records, the split it
fixes, the scripts named in messages) is data of that value, not another copy of a stage.

A stage prints the `next:` hint the command-line layer gives it (`hint`, a function of what the stage made:
the run, or the teacher run's record); without one it prints none.
"""
from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdoiqa import engine
from kdoiqa.accelerator import ACCELERATOR
from kdoiqa.checkpoints import (
    RESUME,
    check_run_folds,
    finished_folds,
    fold_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from kdoiqa.common import UserError, sha256_file
from kdoiqa.databases import (
    Database,
    database_key,
    default_data_root,
    load_database,
    resolve_database_root,
    setup_hint,
)
from kdoiqa.distributed import DIST, resolve_device
from kdoiqa.folds import AUTHORS_FILE, FoldSet, default_folds_path, load_folds, resolve_folds
from kdoiqa.image_store import ImageStore
from kdoiqa.methods import student_method, teacher_method
from kdoiqa.models.backbone import prepare_model
from kdoiqa.pairs import CROSS_TEACHER, TEACHER, Evaluation, load_pair, portable_database, portable_root
from kdoiqa.runs import Run, check_resumed_run, latest_finished_run, project_folders, read_run_record
from kdoiqa.settings import PROTOCOLS, DataSettings, RuntimeSettings, TrainingSettings
from kdoiqa.teacher_features import (
    authors_fold_dirs,
    feat_save_command,
    features_folder,
    fold_feature_path,
    load_features,
    load_teacher_features,
    peek_features,
    read_authors_fold,
    save_features,
)
from kdoiqa.training import precision, start_run, train_folds

CROSS_SCRIPTS = (CROSS_TEACHER, "crossdb_train")


def database_evaluation(database: str, data_root: str | None) -> Evaluation:
    """A database's folds, as the stages take them (the database loaded and checked)."""
    return Evaluation.of_database(_load_database(database, data_root), database, data_root)


def pair_evaluation(train: str, test: str, data_root: str | None) -> Evaluation:
    """A cross-database pair (all of A -> all of B), as the stages take it: a fold set of one split."""
    return Evaluation.of_pair(load_pair(train, test, data_root), data_root)


def _evaluation(settings: TrainingSettings) -> Evaluation:
    """What a training script's settings train and test on: the pair of a cross-database script, else --database."""
    run_cfg = settings.run
    if settings.script in CROSS_SCRIPTS:
        return pair_evaluation(run_cfg.database_train, run_cfg.database_test, run_cfg.data_root)
    return database_evaluation(run_cfg.database, run_cfg.data_root)


def _announce(evaluation: Evaluation) -> None:
    """After a run's header: a pair's runs say how its score directions are reconciled."""
    if evaluation.pair is not None and DIST.is_main:
        print(evaluation.pair.direction_note(), flush=True)


def _next(hint: Callable[[Any], str] | None, made: Any) -> None:
    """The command-line layer's `next:` line after a stage, from what the stage made (rank 0 prints it)."""
    if hint is not None and DIST.is_main:
        print(f"next: {hint(made)}", flush=True)


def _command(script: str, *words: object) -> str:
    """`python <script> word ...`, each word quoted for a POSIX shell: a hint that works when pasted."""
    return shlex.join(["python", script, *(str(w) for w in words)])


def _load_database(database: str, data_root: str | None, *, check_files: bool = True) -> Database:
    """`load_database`; a registered database missing under a relative data root is looked for from the working
    folder's parents and the checkout, and the error says what the data root is relative to (never a hint that
    would make a database a second time)."""
    root, spec = resolve_database_root(database, data_root)
    base = Path(data_root) if data_root is not None else default_data_root()
    if spec is not None and not base.is_absolute() and not (root / "meta.csv").is_file():
        where = f"{root} (relative to the working folder {Path.cwd()}; --data-root or $KDOIQA_DATA set the data root)"
        found = [folder / base for folder in project_folders() if (folder / base / spec.folder / "meta.csv").is_file()]
        if found:
            raise UserError(f"{where}: no {spec.name} database there; there is one in {found[0] / spec.folder}: add "
                            f"`--data-root {shlex.quote(str(found[0]))}`")
        raise UserError(f"{where}: no {spec.name} database there{setup_hint(spec, root)}")
    return load_database(database, data_root, check_files=check_files)


def _folds_file(recorded: str | None, db: Database) -> Path | None:
    """A fold file recorded by a run or a feature file: as recorded (absolute, or relative to the working folder
    it was made in), else the file of that name in the database's folds/ (the same split, found from elsewhere)."""
    if not recorded:
        return None
    path = Path(recorded)
    if not path.is_file() and (db.folds_dir() / path.name).is_file():
        return db.folds_dir() / path.name
    return path


def _refuse_split_flags(folds: FoldSet, db: Database, settings: TrainingSettings, explicit: frozenset[str],
                        whose: str, fix: str) -> None:
    """An explicit --folds / --split-seed that the split `folds` (chosen by something else) does not follow."""
    run_cfg = settings.run
    if run_cfg.folds_file:
        whose, fix = f"the fold file --folds-file {run_cfg.folds_file}", "drop the flag (the fold file decides)"
    if "folds" in explicit and run_cfg.folds != len(folds):
        raise UserError(f"--folds {run_cfg.folds}: {whose} has {len(folds)} folds ({folds.path or folds.source}); "
                        f"{fix}")
    if "split_seed" in explicit and (folds.path is None or Path(folds.path).resolve()
                                     != default_folds_path(db, len(folds), run_cfg.split_seed).resolve()):
        raise UserError(f"--split-seed {run_cfg.split_seed}: {whose} is {folds.path or folds.source}, not the default "
                        f"split of that seed; {fix}")


# ----------------------------------------------------------------------------------------------
# The teacher.

@DIST.scoped  # the run's launch and process group: set up by start_run, undone on return
def train_teacher(settings: TrainingSettings, explicit: frozenset[str] = frozenset(), *,
                  hint: Callable[[Run], str] | None = None) -> Run:
    """k-fold teacher on one database, or (cross-database settings) on all of A tested on all of B: the pair's one
    split. `explicit`: the flags given on the command line (one that cannot apply is refused); `hint`: the `next:`
    line, from the run."""
    evaluation = _evaluation(settings)
    db, folds = evaluation.train, evaluation.fixed_folds()
    if folds is None:  # the database's split, as the flags (and the protocol) choose it
        run_cfg = settings.run
        folds = resolve_folds(db, run_cfg.folds_file, k=run_cfg.folds, split_seed=run_cfg.split_seed,
                              prefer_authors=settings.protocol == "paper")
        _refuse_split_flags(folds, db, settings, explicit, "the split this teacher trains on (--protocol paper takes "
                            "the authors' folds when the database has them)", "drop the flag, or pass --folds-file")
        check_resumed_run(settings, db, folds)
    run = start_run(settings, db, folds=folds, test_db=evaluation.test, run_key=evaluation.key)
    _announce(evaluation)
    train_folds(run, lambda fold, split: teacher_method(settings.model))
    _next(hint, run)
    return run


# ----------------------------------------------------------------------------------------------
# Teacher features.

def find_teacher_run(script: str, key: str, what: str, train_hint: str, near: tuple[Path, ...] = ()) -> Path:
    """The latest finished teacher run of a database (or pair) under runs/ of the working folder, announced. None
    there: the latest one beside `near` (the database's folder) or in the checkout is named, not used."""
    run = latest_finished_run(script, key)
    if run is None:
        where = f"runs/{script}/{key}/ (relative to the working folder {Path.cwd()})"
        found = [r for folder in project_folders(*near) if (r := latest_finished_run(script, key, folder / "runs"))]
        if found:
            latest = max(found, key=lambda p: (p / "results.csv").stat().st_mtime_ns)
            raise UserError(f"no finished {script} run of {what} under {where}; there is one in {latest}: add "
                            f"`--run {shlex.quote(str(latest))}`")
        raise UserError(f"no finished {script} run of {what} under {where}; train one with `{train_hint}` or pass --run")
    print(f"teacher run: {run} (the latest finished {script} run of {what})", flush=True)
    return run


def _refuse_teacher_mismatch(explicit: frozenset[str], data: DataSettings, record: dict, run: Path) -> None:
    """Explicit face flags of a feature script must be the teacher's own: its features come from its faces."""
    teacher = record["settings"]["data"]
    for name, flag, mine, theirs, unit in (
            ("face_size", "--face-size", data.face_size, teacher.get("face_size"), "-px faces"),
            ("face_jpeg_quality", "--face-jpeg-quality", data.face_jpeg_quality, teacher.get("face_jpeg_quality"),
             " (JPEG quality of its faces; none: lossless)")):
        if name in explicit and theirs is not None and mine != theirs:
            raise UserError(f"{flag} {mine}: the teacher run {run} was trained on {theirs}{unit}, and its features "
                            f"are computed from faces made as in its training; drop {flag} (or give {theirs})")
    if "erp_size" in explicit:
        raise UserError("--erp-size does not apply to teacher features (the teacher sees cube faces, not the ERP "
                        "image); give it to the student, mask_train.py")


def _teacher_store(db: Database, record: dict, data: DataSettings, device: torch.device, progress: bool) -> ImageStore:
    """The faces of every image at the teacher's face size and pipeline, decoded once for every fold."""
    teacher = record["settings"]["data"]
    faces = DataSettings(face_size=int(teacher["face_size"]), face_jpeg_quality=teacher.get("face_jpeg_quality"),
                         faces=data.faces, cache=data.cache, workers=data.workers)
    return ImageStore(db, db.images, "faces", faces, device, progress=progress)


def _feature_precision(runtime: RuntimeSettings, record: dict) -> tuple[str, bool]:
    """(--amp, TF32) of the feature extraction: as given, else the teacher's protocol's (fp32 features,
    TF32 off, under the paper's)."""
    protocol = PROTOCOLS[record.get("protocol") or "ours"]
    tf32 = runtime.tf32 if runtime.tf32 is not None else protocol["tf32"]
    return (runtime.amp if runtime.amp is not None else protocol["amp"]), bool(tf32)


def _teacher_checkpoint(run_dir: Path, fold: int, resume_hint: str) -> tuple[dict, Path]:
    """A finished teacher fold's checkpoint (checked before any image is decoded)."""
    path = fold_checkpoint(run_dir, fold)
    if not path.is_file():
        if (path.parent / RESUME).is_file():
            raise UserError(f"{path.parent}: fold {fold} has not finished training; finish it with `{resume_hint}`")
        raise UserError(f"{path}: no checkpoint for fold {fold}; train it first (or check --run)")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "teacher":
        raise UserError(f"{path}: a {ckpt.get('kind')} checkpoint, not a teacher")
    return ckpt, path


def _teacher_features(checkpoint: tuple[dict, Path], store: ImageStore, batch_size: int, amp_tf32: tuple[str, bool],
                      device: torch.device, progress: bool, fold: int) -> tuple[torch.Tensor, Path]:
    ckpt, path = checkpoint
    amp, tf32 = amp_tf32
    model = prepare_model(model_from_checkpoint(ckpt, path), device, channels_last=ACCELERATOR.takes(device))
    with precision(tf32, False, device):  # TF32 for this extraction only
        _, feats = engine.infer(model, store, store.images, batch_size, engine.autocast_for(amp, device),
                                progress=progress, desc=f"teacher features (fold {fold})")
    return feats, path


def _refuse_other_teacher(evaluation: Evaluation, record: dict, run: Path) -> None:
    """A teacher run given with --run must be of this database (or pair): its features are of its images."""
    trained_on = record["database"]["key"]
    pair = evaluation.pair
    if pair is None:
        if trained_on != evaluation.key:
            raise UserError(f"{run}: a teacher of {trained_on} ({record['database']['root']}), not of "
                            f"{evaluation.key} ({evaluation.train.root})")
        return
    if trained_on != database_key(pair.train):
        raise UserError(f"{run}: a teacher trained on {trained_on}, not on {database_key(pair.train)}")
    if (record.get("test_database") or {}).get("key") != database_key(pair.test):
        raise UserError(f"{run}: a teacher of the pair {trained_on} -> "
                        f"{(record.get('test_database') or {}).get('key')}, not {pair.key}")


def _teacher_run_split(evaluation: Evaluation, run: Path, record: dict, fold: int | None,
                       resume: str) -> tuple[FoldSet, Path | None, list[int]]:
    """The split of a teacher run's features, the fold file it was read from, and the folds to extract. A pair's
    split is its one split (its checkpoint says whether it finished); a database's is the one the run recorded,
    unchanged since, and every fold the run planned must have finished (else `fold` alone is extracted)."""
    folds, folds_path = evaluation.fixed_folds(), None
    if folds is None:
        folds_path = _folds_file(record["folds"]["path"], evaluation.train)
        folds = load_folds(folds_path, evaluation.train)
        if folds.digest() != record["folds"]["sha256"]:
            raise UserError(f"{folds_path}: changed since the teacher run {run} was trained; retrain the teacher")
    if fold is not None and not 0 <= fold < len(folds):
        raise UserError(f"--fold {fold} is out of range: folds 0..{len(folds) - 1}")
    planned = [record["settings"]["run"]["fold"]] if record["settings"]["run"].get("fold") is not None \
        else list(range(len(folds)))
    finished = finished_folds(run)
    unfinished = [k for k in planned if k not in finished]
    if fold is None and unfinished and folds_path is not None:  # a database's split (a pair's: its checkpoint's check)
        done = [k for k in planned if k in finished]
        only = f", or make the finished folds' features with --fold {done[0]}" + (" (one at a time)" if len(done) > 1
                                                                                  else "") if done else ""
        raise UserError(f"{run}: fold{'s' if len(unfinished) > 1 else ''} {', '.join(map(str, unfinished))} of this "
                        f"teacher {'have' if len(unfinished) > 1 else 'has'} not finished training, and a student needs "
                        f"every fold's features; finish it with `{resume}`{only}")
    return folds, folds_path, [fold] if fold is not None else planned


def write_teacher_features(evaluation: Evaluation, run_dir: str | None, features_dir: str | None, *,
                           data: DataSettings, runtime: RuntimeSettings, batch_size: int = 32,
                           fold: int | None = None, explicit: frozenset[str] = frozenset(),
                           hint: Callable[[dict], str] | None = None) -> list[Path]:
    """feat_save.py / crossdb_feat.py: a teacher run's features of every image of the database it trained on, one
    file per fold (every fold of the run, which must all have finished, or `fold`); a pair's one split, one
    `CROSS_FILE`. `run_dir` None: the latest finished teacher run of the database (or pair). `explicit`: the flags
    given on the command line (face flags must be the teacher's; --erp-size cannot apply); `hint`: the `next:`
    line, from the teacher run's record (its args.json)."""
    db, script = evaluation.train, evaluation.teacher_script
    run = Path(run_dir) if run_dir else find_teacher_run(
        script, evaluation.key, evaluation.name, _command(f"{script}.py", *evaluation.database_words()),
        near=evaluation.roots)
    record = read_run_record(run, script)
    _refuse_other_teacher(evaluation, record, run)
    _refuse_teacher_mismatch(explicit, data, record, run)
    resume = _command(f"{script}.py", "--resume", "--out", run)
    folds, folds_path, fold_ids = _teacher_run_split(evaluation, run, record, fold, resume)
    out_dir = evaluation.features_dir(features_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file, expected a folder for the feature cache")
    checkpoints = {k: _teacher_checkpoint(run, k, resume) for k in fold_ids}
    check_run_folds(run, [path for _, path in checkpoints.values()], [ckpt for ckpt, _ in checkpoints.values()], record)
    device = resolve_device(runtime.device)
    store = _teacher_store(db, record, data, device, runtime.progress)
    # Stored in the feature files, so that it works from any working folder.
    rebuild = evaluation.features_command(run.resolve(), Path(features_dir).resolve() if features_dir else None,
                                          portable=True)
    written = []
    for k in fold_ids:
        feats, ckpt = _teacher_features(checkpoints[k], store, batch_size, _feature_precision(runtime, record), device,
                                        runtime.progress, k)
        out = evaluation.feature_path(out_dir, k)
        provenance = {"kind": "teacher run", "teacher_run": str(run.resolve()), "teacher_checkpoint": ckpt,
                      "teacher_checkpoint_sha256": sha256_file(ckpt), "protocol": record.get("protocol")}
        if folds_path is not None:
            provenance["folds_path"] = str(folds_path.resolve())
        save_features(out, db=db, names=store.images, feats=feats, fold=evaluation.feature_fold(k),
                      test_images=folds.folds[k].test, folds_sha256=folds.digest(), face_size=store.data.face_size,
                      rebuild=rebuild, provenance=provenance)
        print(f"wrote {out} ({evaluation.feature_rows(feats.shape[0])} x {feats.shape[1]})", flush=True)
        written.append(out)
    _next(hint, record)
    return written


def save_authors_features(database: str, data_root: str | None, folder: str, features_dir: str | None, *,
                          folds_file: str | None = None, hint: Callable[[None], str] | None = None) -> list[Path]:
    """feat_save.py --from-authors: the authors' released features as our checked cache, on their folds
    (`folds/authors.json` of the database unless `folds_file`). Every file is read and checked before
    anything is written."""
    db = _load_database(database, data_root, check_files=False)
    authors = Path(folds_file) if folds_file else db.folds_dir() / AUTHORS_FILE
    if not authors.is_file():
        raise UserError(f"{authors}: the authors' features belong to their folds; import them first with "
                        f"`python dataset.py folds --database {database} --authors DIR` (DIR: the folder of their "
                        f"<DB>_trainc_k.csv / _testc_k.csv)")
    folds = load_folds(authors, db)
    out_dir = features_folder(database_key(db), features_dir)
    rebuild = feat_save_command(portable_database(database), features_dir=Path(features_dir).resolve() if features_dir
                                else None, from_authors=Path(folder).resolve(), data_root=portable_root(data_root))
    sources = authors_fold_dirs(Path(folder), db, len(folds))
    read = [read_authors_fold(source, db) for source in sources]
    written = []
    for k, (source, (feats, digest)) in enumerate(zip(sources, read)):
        out = fold_feature_path(out_dir, k)
        save_features(out, db=db, names=db.images, feats=feats, fold=k, test_images=folds.folds[k].test,
                      folds_sha256=folds.digest(), face_size=None, rebuild=rebuild,
                      provenance={"kind": "authors' release", "source": str(source.resolve()), "files_sha256": digest,
                                  "folds_path": str(authors.resolve()), "protocol": "paper"})
        print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]}, the authors' fold {k + 1})", flush=True)
        written.append(out)
    _next(hint, None)
    return written


# ----------------------------------------------------------------------------------------------
# The student.

@DIST.scoped  # the run's launch and process group: set up by start_run, undone on return
def train_student(settings: TrainingSettings, explicit: frozenset[str] = frozenset(), *,
                  hint: Callable[[Run], str] | None = None) -> Run:
    """The ERP student (--kd mask|feature|none) on one database, or on all of A tested on all of B (the pair's one
    split). `explicit`: the flags given on the command line (a split flag the teacher's split overrides is
    refused); `hint`: the `next:` line, from the run."""
    distill = settings.distill
    evaluation = _evaluation(settings)
    db = evaluation.train
    features_dir = evaluation.features_dir(distill.features_dir)
    rebuild = evaluation.features_command(features_dir=distill.features_dir)  # the latest teacher's features, there
    folds = evaluation.fixed_folds()
    if folds is None:  # a database's split: the teacher's (read from its features), or the baseline's
        folds = (_split_of_features(settings, db, features_dir, rebuild, explicit) if distill.kd != "none"
                 else _baseline_split(settings, db, features_dir, explicit))
        check_resumed_run(settings, db, folds)
    run_folds = [settings.run.fold] if settings.run.fold is not None and 0 <= settings.run.fold < len(folds) else range(len(folds))
    features: dict[int, dict[str, torch.Tensor]] = {}
    sources: dict[int, dict] = {}
    for k in ([] if distill.kd == "none" else run_folds):  # every fold's cache checked before any training starts
        features[k], sources[k] = load_teacher_features(evaluation.feature_path(features_dir, k), db,
                                                        fold=evaluation.feature_fold(k), test_images=folds.folds[k].test,
                                                        rebuild_hint=rebuild)
    run = start_run(settings, db, folds=folds, test_db=evaluation.test, run_key=evaluation.key)
    run.record["teacher_features"] = _teachers_of_run(run, sources, evaluation.teacher_script, evaluation.key) \
        if distill.kd != "none" else None
    _announce(evaluation)
    train_folds(run, lambda fold, split: student_method(settings.model, distill),
                features_for_fold=features.get if features else None)
    _next(hint, run)
    return run


def _split_of_features(settings: TrainingSettings, db: Database, features_dir: Path, rebuild: str,
                       explicit: frozenset[str]) -> FoldSet:
    """A distilled student's split: its teacher's, so that its feature of a test image comes from a teacher that
    never trained on it. Any fold's file tells the split; an out-of-range --fold is refused by start_run."""
    fold = settings.run.fold
    peek = fold if fold is not None and fold_feature_path(features_dir, fold).is_file() else 0
    _features_exist(fold_feature_path(features_dir, peek), features_dir, db, rebuild)
    teacher = peek_features(fold_feature_path(features_dir, peek), rebuild)
    folds = load_folds(settings.run.folds_file or _folds_file(teacher["provenance"]["folds_path"], db), db)
    _refuse_split_flags(folds, db, settings, explicit, f"the split of the teacher features in {features_dir}",
                        "a distilled student trains on its teacher's split: drop the flag, or make features of "
                        "a teacher trained on that split")
    if "face_size" in explicit and teacher.get("face_size") not in (None, settings.data.face_size):
        raise UserError(f"--face-size {settings.data.face_size}: the teacher features in {features_dir} come from "
                        f"{teacher['face_size']}-px faces; drop --face-size (the student sees the ERP image), or "
                        f"make features of a {settings.data.face_size}-px teacher")
    _note_protocols(settings, teacher)
    return folds


def _features_exist(path: Path, features_dir: Path, db: Database, hint: str) -> None:
    """No teacher features where the student looks: say what the (relative) folder is relative to, and name
    this database's features found beside the database or in the checkout."""
    if path.is_file():
        return
    if features_dir.is_absolute():
        raise UserError(f"{path}: no teacher features; make them with `{hint}` (or train with --kd none)")
    where = f"{path} (relative to the working folder {Path.cwd()})"
    found = [folder / features_dir for folder in project_folders(db.root) if (folder / path).is_file()]
    if found:
        raise UserError(f"{where}: no teacher features; this database's features are in {found[0]}: add "
                        f"`--features-dir {shlex.quote(str(found[0]))}`")
    raise UserError(f"{where}: no teacher features; make them with `{hint}` (or train with --kd none)")


def _teachers_of_run(run: Run, sources: dict[int, dict], script: str, key: str) -> dict[str, dict]:
    """args.json's `teacher_features`: each fold's teacher (run, checkpoint and its SHA-256, the feature file),
    printed with the header. A resumed run must find the teacher each of its folds started with."""
    record = {str(k): source for k, source in sources.items()}
    if run.settings.run.resume:
        try:
            before = json.loads((run.run_dir / "args.json").read_text(encoding="utf-8")).get("teacher_features") or {}
        except (OSError, ValueError, AttributeError):
            before = {}
        for k, source in record.items():
            old = before.get(k) if isinstance(before, dict) else None
            if old and _teacher_id(old) != _teacher_id(source):
                raise UserError(f"{run.run_dir}: fold {k} was trained from the features of {_teacher_name(old)}, but "
                                f"{source['features']} now holds those of {_teacher_name(source)}; a resumed run "
                                f"keeps its teacher: make that teacher's features again (feat_save.py --run ... --fold "
                                f"{k}) or start a new --out")
    if DIST.is_main and record:
        runs = {source.get("teacher_run") or source.get("source") for source in record.values()}
        shas = ", ".join(f"fold {k} {str(source.get('teacher_checkpoint_sha256') or source.get('files_sha256'))[:12]}"
                         for k, source in record.items())
        what = next(iter(runs)) if len(runs) == 1 else "; ".join(f"fold {k} {_teacher_name(v)}" for k, v in record.items())
        kind = "teacher run" if all(v.get("kind") == "teacher run" for v in record.values()) else "teacher features"
        print(f"teacher: {kind} {what} (checkpoint sha256 {shas}), features {Path(next(iter(record.values()))['features']).parent}",
              flush=True)
        _note_newer_teacher(record, script, key)
    return record


def _teacher_id(source: dict) -> tuple:
    return source.get("kind"), source.get("teacher_checkpoint_sha256"), source.get("files_sha256")


def _teacher_name(source: dict) -> str:
    if source.get("kind") == "teacher run":
        return f"the teacher run {source.get('teacher_run')} (checkpoint sha256 {str(source.get('teacher_checkpoint_sha256'))[:12]})"
    return f"the authors' release {source.get('source')}"


def _note_newer_teacher(record: dict[str, dict], script: str, key: str) -> None:
    """A finished teacher run (of `script`, database or pair `key`) newer than the one the features come from is
    named: the student does not learn from it until its features are made."""
    latest = latest_finished_run(script, key)
    used = {Path(v["teacher_run"]).resolve() for v in record.values() if v.get("teacher_run")}
    if latest is None or not used or latest.resolve() in used:
        return
    newest = max(((Path(p) / "results.csv").stat().st_mtime_ns for p in used if (Path(p) / "results.csv").is_file()),
                 default=0)
    if (latest / "results.csv").stat().st_mtime_ns > newest:
        print(f"note: a newer finished teacher run, {latest}, is not the one these features come from; to learn from "
              f"it, make its features first (feat_save.py or crossdb_feat.py with --run {shlex.quote(str(latest))})",
              flush=True)


def _note_protocols(settings: TrainingSettings, teacher: dict) -> None:
    theirs = (teacher.get("provenance") or {}).get("protocol")
    if theirs and theirs != settings.protocol and DIST.is_main:
        print(f"note: these teacher features come from a --protocol {theirs} teacher; this student runs --protocol "
              f"{settings.protocol}", flush=True)


def _baseline_split(settings: TrainingSettings, db: Database, features_dir: Path,
                    explicit: frozenset[str] = frozenset()) -> FoldSet:
    """--kd none: the split of the teacher features beside it (as the mask-KD student takes it), so that the
    baseline and the student are compared fold by fold; --folds-file, an explicit --folds or --split-seed, or no
    features, the split those flags name."""
    run_cfg = settings.run
    path = fold_feature_path(features_dir, 0)
    if run_cfg.folds_file is None and path.is_file() and not explicit & {"folds", "split_seed"}:
        try:
            theirs = peek_features(path, "")
            folds_path = _folds_file((theirs.get("provenance") or {}).get("folds_path"), db)
        except UserError:
            folds_path = None
        if folds_path and Path(folds_path).is_file():
            folds = load_folds(folds_path, db)
            if DIST.is_main:
                print(f"baseline on the split of the teacher features in {features_dir} ({folds_path}, {len(folds)} "
                      f"folds), as the mask-KD student: the two pair fold by fold (--folds-file to choose another)",
                      flush=True)
            return folds
    folds = resolve_folds(db, run_cfg.folds_file, k=run_cfg.folds, split_seed=run_cfg.split_seed,
                          prefer_authors=settings.protocol == "paper")
    _refuse_split_flags(folds, db, settings, explicit, "the baseline's split (--protocol paper takes the authors' "
                        "folds when the database has them)", "drop the flag, or pass --folds-file")
    _note_split_against_features(folds, features_dir)
    return folds


def _note_split_against_features(folds: FoldSet, features_dir: Path) -> None:
    """--kd none: say so when the baseline's split is not the split of the teacher features it is compared with."""
    path = fold_feature_path(features_dir, 0)
    if not path.is_file() or not DIST.is_main:
        return
    try:
        theirs = peek_features(path, "")
    except UserError:
        return
    if theirs.get("folds_sha256") and theirs["folds_sha256"] != folds.digest():
        print(f"note: this baseline's split ({folds.path or folds.source}) differs from the split of the teacher "
              f"features in {features_dir} ({(theirs.get('provenance') or {}).get('folds_path')}); a comparison "
              f"of the two is not paired", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# A training in a fixed folder (reproduce.py, the cross-database matrix).

def training_state(run_dir: Path) -> str:
    """'done' (results.csv: every fold finished), 'partial' (a run to resume) or 'new'."""
    if (run_dir / "results.csv").is_file():
        return "done"
    return "partial" if (run_dir / "args.json").is_file() else "new"


def features_up_to_date(evaluation: Evaluation, teacher_dir: Path, features_dir: Path) -> bool:
    """Whether `features_dir` holds valid features of the teacher run `teacher_dir` for `evaluation` (every
    fold's, or the pair's `all.pt`): what the pipeline runner skips."""
    try:
        folds = evaluation.fixed_folds()
        if folds is None:
            folds = load_folds(read_run_record(teacher_dir, TEACHER)["folds"]["path"], evaluation.train)
        for k, fold in enumerate(folds.folds):
            load_features(evaluation.feature_path(features_dir, k), evaluation.train, fold=evaluation.feature_fold(k),
                          test_images=fold.test, rebuild_hint="")
        return True
    except UserError:
        return False
