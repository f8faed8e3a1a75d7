"""The pipeline's stages as functions: what each script does, callable by reproduce.py and the
cross-database matrix as well (scripts never import scripts).

    train_teacher(settings)          teacher_train.py / teacher_crossdb_train.py
    save_teacher_features(...)       feat_save.py / crossdb_feat.py (and --from-authors)
    train_student(settings)          mask_train.py / crossdb_train.py
    run_training(script, argv, dir)  one of those trainings in a fixed folder: skipped when done, resumed
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from kdoiqa import cli, engine
from kdoiqa.checkpoints import RESUME, finished_folds, fold_checkpoint, load_checkpoint, model_from_checkpoint
from kdoiqa.common import UserError, sha256_file
from kdoiqa.databases import Database, database_key, load_database
from kdoiqa.distributed import DIST, resolve_device
from kdoiqa.folds import AUTHORS_FILE, FoldSet, load_folds, resolve_folds
from kdoiqa.image_store import ImageStore
from kdoiqa.methods import student_method, teacher_method
from kdoiqa.pairs import CrossPair, load_pair
from kdoiqa.runs import Run, latest_finished_run, read_run_record
from kdoiqa.settings import PROTOCOLS, DataSettings, RuntimeSettings, TrainingSettings
from kdoiqa.teacher_features import (
    CROSS_FILE,
    authors_fold_dirs,
    crossdb_feat_command,
    default_features_dir,
    feat_save_command,
    fold_feature_path,
    load_features,
    peek_features,
    read_authors_fold,
    save_features,
)
from kdoiqa.training import start_run, train_folds
from models.backbone import prepare_model

TEACHER, CROSS_TEACHER = "teacher_train", "teacher_crossdb_train"


def _pair(settings: TrainingSettings) -> CrossPair:
    return load_pair(settings.run.database_train, settings.run.database_test, settings.run.data_root)


def _next(line: str) -> None:
    if DIST.is_main:
        print(f"next: {line}", flush=True)


# ----------------------------------------------------------------------------------------------
# The teacher.

def train_teacher(settings: TrainingSettings) -> Run:
    """k-fold teacher on one database, or (cross-database settings) on all of A tested on all of B."""
    if settings.script == CROSS_TEACHER:
        pair = _pair(settings)
        run = start_run(settings, pair.train, folds=pair.folds(), test_db=pair.test, run_key=pair.key)
        if DIST.is_main:
            print(pair.direction_note(), flush=True)
        train_folds(run, lambda fold, split: teacher_method(settings.model))
        _next(crossdb_feat_command(pair.train_arg, pair.test_arg, run.run_dir))
        return run
    db = load_database(settings.run.database, settings.run.data_root)
    run = start_run(settings, db)
    train_folds(run, lambda fold, split: teacher_method(settings.model))
    carried = cli.carried_flags(cli.teacher_parser(), settings.args, cli.CARRIED_TO_FEATURES)
    _next(" ".join([feat_save_command(settings.run.database, run.run_dir), *map(shlex.quote, carried)]))
    return run


# ----------------------------------------------------------------------------------------------
# Teacher features.

def find_teacher_run(script: str, key: str, what: str, train_hint: str) -> Path:
    """The latest finished teacher run of a database (or pair), announced."""
    run = latest_finished_run(script, key)
    if run is None:
        raise UserError(f"no finished {script} run of {what} under runs/{script}/{key}/; train one with "
                        f"`{train_hint}` or pass --run")
    print(f"teacher run: {run} (the latest finished {script} run of {what})", flush=True)
    return run


def _teacher_store(db: Database, record: dict, data: DataSettings, device: torch.device, progress: bool) -> ImageStore:
    """The faces of every image at the teacher's face size and pipeline, decoded once for every fold."""
    teacher = record["settings"]["data"]
    faces = DataSettings(face_size=int(teacher["face_size"]), face_jpeg_quality=teacher.get("face_jpeg_quality"),
                         faces=data.faces, cache=data.cache, workers=data.workers)
    return ImageStore(db, db.images, "faces", faces, device, progress=progress)


def _feature_amp(runtime: RuntimeSettings, record: dict, device: torch.device) -> str:
    """--amp as given, else the teacher's protocol's (fp32 features under the paper's); TF32 likewise."""
    protocol = PROTOCOLS[record.get("protocol") or "ours"]
    if device.type == "cuda":
        tf32 = runtime.tf32 if runtime.tf32 is not None else protocol["tf32"]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    return runtime.amp if runtime.amp is not None else protocol["amp"]


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


def _teacher_features(checkpoint: tuple[dict, Path], store: ImageStore, batch_size: int, amp: str,
                      device: torch.device, progress: bool, fold: int) -> tuple[torch.Tensor, Path]:
    ckpt, path = checkpoint
    model = prepare_model(model_from_checkpoint(ckpt, path), device)
    _, feats = engine.infer(model, store, store.images, batch_size, engine.autocast_for(amp, device),
                            progress=progress, desc=f"teacher features (fold {fold})")
    return feats, path


def save_teacher_features(database: str, data_root: str | None, run_dir: str | None, features_dir: str | None, *,
                          data: DataSettings, runtime: RuntimeSettings, batch_size: int = 32,
                          fold: int | None = None) -> list[Path]:
    """feat_save.py: each finished fold's teacher features of every image of the database."""
    db = load_database(database, data_root)
    key = database_key(db)
    run = Path(run_dir) if run_dir else find_teacher_run(TEACHER, key, db.name, f"python teacher_train.py --database {database}")
    record = read_run_record(run, TEACHER)
    if record["database"]["key"] != key:
        raise UserError(f"{run}: a teacher of {record['database']['key']} ({record['database']['root']}), not of "
                        f"{key} ({db.root})")
    folds = load_folds(record["folds"]["path"], db)
    if folds.digest() != record["folds"]["sha256"]:
        raise UserError(f"{record['folds']['path']}: changed since the teacher run {run} was trained; retrain the teacher")
    if fold is not None and not 0 <= fold < len(folds):
        raise UserError(f"--fold {fold} is out of range: folds 0..{len(folds) - 1}")
    fold_ids = [fold] if fold is not None else finished_folds(run)
    if not fold_ids:
        raise UserError(f"{run}: no finished fold (fold<k>/checkpoint.pt); finish the teacher with "
                        f"`python teacher_train.py --resume --out {run}`")
    out_dir = Path(features_dir) if features_dir else default_features_dir(key)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file, expected a folder for the feature cache")
    checkpoints = {k: _teacher_checkpoint(run, k, f"python teacher_train.py --resume --out {run}") for k in fold_ids}
    device = resolve_device(runtime.device)
    store = _teacher_store(db, record, data, device, runtime.progress)
    rebuild = feat_save_command(database, run, features_dir)
    written = []
    for k in fold_ids:
        feats, ckpt = _teacher_features(checkpoints[k], store, batch_size, _feature_amp(runtime, record, device), device,
                                        runtime.progress, k)
        out = fold_feature_path(out_dir, k)
        save_features(out, db=db, names=store.images, feats=feats, fold=k, test_images=folds.folds[k].test,
                      folds_sha256=folds.digest(), face_size=store.data.face_size, rebuild=rebuild,
                      provenance={"kind": "teacher run", "teacher_run": str(run), "teacher_checkpoint": ckpt,
                                  "teacher_checkpoint_sha256": sha256_file(ckpt), "protocol": record.get("protocol"),
                                  "folds_path": record["folds"]["path"]})
        print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]})", flush=True)
        written.append(out)
    dir_flag = f" --features-dir {features_dir}" if features_dir else ""
    carried = cli.carried_flags(cli.student_parser(), record.get("args") or {}, cli.CARRIED_TO_STUDENT)
    _next(f"python mask_train.py --database {database}{dir_flag}" + "".join(f" {shlex.quote(t)}" for t in carried))
    return written


def save_authors_features(database: str, data_root: str | None, folder: str, features_dir: str | None, *,
                          folds_file: str | None = None) -> list[Path]:
    """feat_save.py --from-authors: the authors' released features as our checked cache, on their folds
    (`folds/authors.json` of the database unless `folds_file`). Every file is read and checked before
    anything is written."""
    db = load_database(database, data_root, check_files=False)
    authors = Path(folds_file) if folds_file else db.folds_dir() / AUTHORS_FILE
    if not authors.is_file():
        raise UserError(f"{authors}: the authors' features belong to their folds; import them first with "
                        f"`python dataset.py folds --database {database} --authors DIR` (DIR: the folder of their "
                        f"<DB>_trainc_k.csv / _testc_k.csv)")
    folds = load_folds(authors, db)
    out_dir = Path(features_dir) if features_dir else default_features_dir(database_key(db))
    rebuild = feat_save_command(database, features_dir=features_dir, from_authors=folder)
    sources = authors_fold_dirs(Path(folder), db, len(folds))
    read = [read_authors_fold(source, db) for source in sources]
    written = []
    for k, (source, (feats, digest)) in enumerate(zip(sources, read)):
        out = fold_feature_path(out_dir, k)
        save_features(out, db=db, names=db.images, feats=feats, fold=k, test_images=folds.folds[k].test,
                      folds_sha256=folds.digest(), face_size=None, rebuild=rebuild,
                      provenance={"kind": "authors' release", "source": str(source), "files_sha256": digest,
                                  "folds_path": str(authors), "protocol": "paper"})
        print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]}, the authors' fold {k + 1})", flush=True)
        written.append(out)
    _next(f"python mask_train.py --database {database}" + (f" --features-dir {features_dir}" if features_dir else ""))
    return written


def save_crossdb_features(train: str, test: str, data_root: str | None, run_dir: str | None, features_dir: str | None,
                          *, data: DataSettings, runtime: RuntimeSettings, batch_size: int = 32) -> Path:
    """crossdb_feat.py: the features of all of A from the cross-database teacher A -> B."""
    pair = load_pair(train, test, data_root)
    run = Path(run_dir) if run_dir else find_teacher_run(
        CROSS_TEACHER, pair.key, f"{pair.train.name} -> {pair.test.name}",
        f"python teacher_crossdb_train.py --database-train {train} --database-test {test}")
    record = read_run_record(run, CROSS_TEACHER)
    if record["database"]["key"] != database_key(pair.train):
        raise UserError(f"{run}: a teacher trained on {record['database']['key']}, not on {database_key(pair.train)}")
    if (record.get("test_database") or {}).get("key") != database_key(pair.test):
        raise UserError(f"{run}: a teacher of the pair {record['database']['key']} -> "
                        f"{(record.get('test_database') or {}).get('key')}, not {pair.key}")
    out_dir = Path(features_dir) if features_dir else default_features_dir(pair.key)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file, expected a folder for the feature cache")
    checkpoint = _teacher_checkpoint(run, 0, f"python {CROSS_TEACHER}.py --resume --out {run}")
    device = resolve_device(runtime.device)
    store = _teacher_store(pair.train, record, data, device, runtime.progress)
    feats, ckpt = _teacher_features(checkpoint, store, batch_size, _feature_amp(runtime, record, device), device,
                                    runtime.progress, 0)
    out = out_dir / CROSS_FILE
    save_features(out, db=pair.train, names=pair.train.images, feats=feats, fold=None, test_images=pair.test.images,
                  folds_sha256=pair.folds().digest(), face_size=store.data.face_size,
                  rebuild=crossdb_feat_command(train, test, run, features_dir),
                  provenance={"kind": "teacher run", "teacher_run": str(run), "teacher_checkpoint": ckpt,
                              "teacher_checkpoint_sha256": sha256_file(ckpt), "protocol": record.get("protocol")})
    print(f"wrote {out} ({feats.shape[0]} images of {pair.train.name} x {feats.shape[1]})", flush=True)
    dir_flag = f" --features-dir {features_dir}" if features_dir else ""
    _next(f"python crossdb_train.py --database-train {train} --database-test {test}{dir_flag}")
    return out


# ----------------------------------------------------------------------------------------------
# The student.

def train_student(settings: TrainingSettings) -> Run:
    """The ERP student (--kd mask|feature|none) on one database, or on all of A tested on all of B."""
    if settings.script == "crossdb_train":
        return _train_cross_student(settings)
    distill, database = settings.distill, settings.run.database
    db = load_database(database, settings.run.data_root)
    features_dir = Path(distill.features_dir) if distill.features_dir else default_features_dir(database_key(db))
    hint = feat_save_command(database, features_dir=distill.features_dir)  # the latest teacher's features, there
    if distill.kd != "none":
        # The student uses the teacher's split: its feature of a test image comes from a teacher that never
        # trained on it. Any fold's file tells the split; an out-of-range --fold is refused by start_run.
        peek = settings.run.fold if settings.run.fold is not None and fold_feature_path(features_dir, settings.run.fold).is_file() else 0
        teacher = peek_features(fold_feature_path(features_dir, peek), hint)
        folds = load_folds(settings.run.folds_file or teacher["provenance"]["folds_path"], db)
        _note_protocols(settings, teacher)
    else:
        folds = _baseline_split(settings, db, features_dir)
    run_folds = [settings.run.fold] if settings.run.fold is not None and 0 <= settings.run.fold < len(folds) else range(len(folds))
    features = {} if distill.kd == "none" else {  # every fold's cache checked before any training starts
        k: load_features(fold_feature_path(features_dir, k), db, fold=k, test_images=folds.folds[k].test,
                         rebuild_hint=hint)
        for k in run_folds}
    run = start_run(settings, db, folds=folds)
    train_folds(run, lambda fold, split: student_method(settings.model, distill),
                features_for_fold=features.get if features else None)
    device = [f"--device {settings.runtime.device}"] if settings.runtime.device else []
    _next(" ".join([f"python predict.py {run.run_dir} my_360_photos/", *device]))
    return run


def _note_protocols(settings: TrainingSettings, teacher: dict) -> None:
    theirs = (teacher.get("provenance") or {}).get("protocol")
    if theirs and theirs != settings.protocol and DIST.is_main:
        print(f"note: these teacher features come from a --protocol {theirs} teacher; this student runs --protocol "
              f"{settings.protocol}", flush=True)


def _baseline_split(settings: TrainingSettings, db: Database, features_dir: Path) -> FoldSet:
    """--kd none: the split of the teacher features beside it (as the mask-KD student takes it), so that the
    baseline and the student are compared fold by fold; --folds-file, or no features, the default split."""
    run_cfg = settings.run
    path = fold_feature_path(features_dir, 0)
    if run_cfg.folds_file is None and path.is_file():
        try:
            theirs = peek_features(path, "")
            folds_path = (theirs.get("provenance") or {}).get("folds_path")
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


def _train_cross_student(settings: TrainingSettings) -> Run:
    distill = settings.distill
    pair = _pair(settings)
    features = None
    if distill.kd != "none":
        # Checked before the run folder exists: a refusal leaves nothing behind.
        features_dir = Path(distill.features_dir) if distill.features_dir else default_features_dir(pair.key)
        hint = crossdb_feat_command(pair.train_arg, pair.test_arg, features_dir=distill.features_dir)
        features = load_features(features_dir / CROSS_FILE, pair.train, fold=None, test_images=pair.test.images,
                                 rebuild_hint=hint)
    run = start_run(settings, pair.train, folds=pair.folds(), test_db=pair.test, run_key=pair.key)
    if DIST.is_main:
        print(pair.direction_note(), flush=True)
    train_folds(run, lambda fold, split: student_method(settings.model, distill),
                features_for_fold=(lambda fold: features) if features is not None else None)
    return run


# ----------------------------------------------------------------------------------------------
# A training in a fixed folder, resumable (reproduce.py, the cross-database matrix).

TRAINERS = {"teacher_train": (cli.teacher_parser, False), "teacher_crossdb_train": (cli.teacher_parser, True),
            "mask_train": (cli.student_parser, False), "crossdb_train": (cli.student_parser, True)}


def training_state(run_dir: Path) -> str:
    """'done' (results.csv: every fold finished), 'partial' (a run to resume) or 'new'."""
    if (run_dir / "results.csv").is_file():
        return "done"
    return "partial" if (run_dir / "args.json").is_file() else "new"


def run_training(script: str, argv: list[str], run_dir: Path, label: str) -> str:
    """Train `script` with `argv` in `run_dir` unless it is done there (with the same flags: a run of other
    settings is refused, as --resume refuses it); resume it when it was interrupted. Returns the state found."""
    build, cross = TRAINERS[script]
    parser = build(cross=cross)
    state = training_state(run_dir)
    args, explicit = cli.parse(parser, [*argv, "--out", str(run_dir), *(["--resume"] if state != "new" else [])])
    settings = cli.training_settings(script, args, explicit)  # with --resume: checked against the run's args.json
    if state == "done":
        if DIST.is_main:
            print(f"{label}: done, skipped ({run_dir})", flush=True)
        return state
    if DIST.is_main:
        print(f"{label}: {'resuming' if state == 'partial' else 'training'} in {run_dir}", flush=True)
    (train_teacher if "teacher" in script else train_student)(settings)
    return state


def features_up_to_date(teacher_dir: Path, features_dir: Path, data_root: str | None, *, database: str | None = None,
                        pair: tuple[str, str] | None = None) -> bool:
    """Whether `features_dir` holds valid features of the teacher run `teacher_dir` (every fold's, or the
    pair's `all.pt`): what reproduce.py and the matrix skip."""
    try:
        if pair is not None:
            cross = load_pair(pair[0], pair[1], data_root)
            load_features(features_dir / CROSS_FILE, cross.train, fold=None, test_images=cross.test.images,
                          rebuild_hint="")
            return True
        db = load_database(database, data_root)
        folds = load_folds(read_run_record(teacher_dir, TEACHER)["folds"]["path"], db)
        for k, fold in enumerate(folds.folds):
            load_features(fold_feature_path(features_dir, k), db, fold=k, test_images=fold.test, rebuild_hint="")
        return True
    except UserError:
        return False
