"""The pipeline runner: teacher -> features -> students as a list of stages, run in order, each skipped
when its work is done and resumed when it was interrupted.

reproduce.py (every database and cross pair, per protocol and seed), the cross-database matrix
(`crossdb_train.py --matrix`) and demo.py build their stages here: one `Experiment` (a database's folds,
or a cross pair, which is a one-split fold set) becomes the same stages whoever runs it. How a stage
trains is the caller's: in this process from settings values (`cli.run_training`), or, in demo.py, as
the shell command a user would type.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdoiqa import stages
from kdoiqa.distributed import DIST


@dataclass
class Stage:
    kind: str                    # faces, erp, teacher, features, student, ... (for the time estimate)
    label: str
    run: Callable[[], str]       # returns "done" when it found its work done
    ranks: str = "all"           # "all": every torchrun process takes part; "main": rank 0 alone


# How a caller trains: (script, the values it sets, run folder, label) -> the stage.
TrainingStage = Callable[[str, dict, Path, str], Stage]
# How a caller writes a teacher's features: (experiment, label) -> the stage.
FeaturesStage = Callable[["Experiment", str], Stage]


@dataclass(frozen=True)
class Experiment:
    """One teacher -> features -> students experiment: within a database (`where` = {"database": ...}) or
    across a pair (`where` = {"database_train": A, "database_test": B})."""

    tag: str                                   # the stages' label prefix
    where: Mapping[str, str]
    teacher: Path | None                       # the teacher's run folder (None: no teacher, a --kd none student)
    features: Path | None                      # the teacher features' folder
    students: Mapping[str, Path] = field(default_factory=dict)   # --kd -> the student's run folder

    @property
    def cross(self) -> bool:
        return "database_train" in self.where

    @property
    def scripts(self) -> tuple[str, str]:
        """(teacher script, student script)."""
        return ("teacher_crossdb_train", "crossdb_train") if self.cross else ("teacher_train", "mask_train")


def experiment_stages(experiment: Experiment, given: Mapping[str, Any], training: TrainingStage,
                      features: FeaturesStage) -> list[Stage]:
    """The experiment's stages: teacher, its features, then each student (distilled from those features, or
    the baseline on the same split). `given`: the values every training takes (the experiment sets its
    databases, --kd and the features folder over them)."""
    teacher_script, student_script = experiment.scripts
    base = {**given, **experiment.where}
    stages = []
    if experiment.teacher is not None:
        stages.append(training(teacher_script, base, experiment.teacher, f"{experiment.tag}: teacher"))
        stages.append(features(experiment, f"{experiment.tag}: features"))
    for kd, run_dir in experiment.students.items():
        values = {**base, "kd": kd, **({"features_dir": str(experiment.features)} if experiment.features else {})}
        label = f"{experiment.tag}: student" + (f" --kd {kd}" if len(experiment.students) > 1 else "")
        stages.append(training(student_script, values, run_dir, label))
    return stages


def execute(stages: Sequence[Stage], out: Path | None = None) -> None:
    """Run the stages in order, each announced with the time so far and an estimate of what is left (from the
    durations of the same kinds of stage, kept in <out>/stages.jsonl across calls)."""
    history_path = out / "stages.jsonl" if out is not None else None
    history = [json.loads(line) for line in history_path.read_text().splitlines()] \
        if history_path is not None and history_path.is_file() else []
    started = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        if DIST.is_main:
            print(f"\n== [{i}/{len(stages)}] {stage.label} ({minutes(time.perf_counter() - started)} so far"
                  f"{_estimate(stages[i - 1:], history)})", flush=True)
        t0 = time.perf_counter()
        state = stage.run() if stage.ranks == "all" or DIST.is_main else "done"
        if state == "done" and stage.ranks == "main" and DIST.is_main:
            print(f"{stage.label}: done, skipped", flush=True)
        DIST.barrier()
        if state != "done" and DIST.is_main:
            history.append({"kind": stage.kind, "label": stage.label, "seconds": time.perf_counter() - t0})
            if history_path is not None:
                history_path.parent.mkdir(parents=True, exist_ok=True)
                with open(history_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(history[-1]) + "\n")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _estimate(remaining: Sequence[Stage], history: list[dict]) -> str:
    """About how long the stages left take, from the durations of the same kinds of stage so far."""
    by_kind: dict[str, list[float]] = {}
    for record in history:
        by_kind.setdefault(record["kind"], []).append(record["seconds"])
    known = [sum(by_kind[s.kind]) / len(by_kind[s.kind]) for s in remaining if s.kind in by_kind]
    if not known:
        return "; time left: estimated once a stage of each kind has run"
    unknown = sum(s.kind not in by_kind for s in remaining)
    return f"; about {minutes(sum(known))} left" + (f" + {unknown} stage(s) of kinds not timed yet" if unknown else "")


def stage_kind(script: str) -> str:
    """The time-estimate kind of a training script's stage."""
    return ("cross-" if "crossdb" in script else "") + ("teacher" if "teacher" in script else "student")


def features_stage(experiment: Experiment, label: str, data_root: str | None, data: Any, runtime: Any,
                   hint: Callable[[dict], str] | None = None) -> Stage:
    """The stage writing the teacher's features of `experiment` (skipped when they are up to date with the
    teacher run): `data`, `runtime` the feature extraction's settings, `hint` the `next:` line after them."""
    teacher, features = experiment.teacher, experiment.features
    assert teacher is not None and features is not None, "an experiment without a teacher has no features stage"

    def run() -> str:
        where = experiment.where
        evaluation = (stages.pair_evaluation(where["database_train"], where["database_test"], data_root)
                      if experiment.cross else stages.database_evaluation(where["database"], data_root))
        if stages.features_up_to_date(evaluation, teacher, features):
            return "done"
        stages.write_teacher_features(evaluation, str(teacher), str(features), data=data, runtime=runtime, hint=hint)
        return "made"
    return Stage("cross-features" if experiment.cross else "features", label, run, ranks="main")
