"""Reproduce the paper in one command: its experiments on the databases under the data root, under
both protocols, resumable, and its tables.

For each protocol, seed and database: cube faces, resized ERPs, the 5-fold teacher, its features,
the student with mask distillation and the no-KD baseline; then every ordered pair of databases
across (teacher, features, mask KD, baseline). Writes <out>/tables.md and tables.tex: Table 1
(teacher, baseline, mask KD: SRCC/PLCC mean ± std), the paired effect mask KD - baseline with a 95%
bootstrap interval (the paper's claim), and the cross-database table, with the authors' teacher beside.
A second call skips what is done; an interrupted one resumes. Training flags (sizes, model, runtime,
--epochs ...) pass through to every stage.

    python reproduce.py                                   # CVIQ, OIQA, IQA-ODI found under ./data
    python reproduce.py --databases OIQA --protocols paper --seeds 3
    torchrun --nproc_per_node=4 reproduce.py --parallel folds
"""
from __future__ import annotations

import json
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kdoiqa import cli, paper_tables, stages
from kdoiqa.common import INTERRUPT_HINT, UserError, atomic_write_json, atomic_write_text, run_cli
from kdoiqa.databases import database_key, load_database, resolve_database_root
from kdoiqa.derived_files import extract_database, resize_database
from kdoiqa.distributed import DIST
from kdoiqa.settings import PROTOCOLS

PAPER_DATABASES = ("CVIQ", "OIQA", "IQA-ODI")
# Flags of the training scripts that reproduce.py passes on (its own: --databases, --protocols, --seeds, --out).
OWN = frozenset({"databases", "protocols", "seeds", "out", "data_root", "cross", "seed"})


def build_parser() -> cli.Parser:
    passed = [cli.data_parser(), cli.model_parser(), cli.optim_parser(), cli.training_runtime_parser()]
    parser = cli.Parser(description=__doc__, parents=passed)
    g = parser.add_argument_group("reproduction")
    g.add_argument("--databases", default=None,
                   help="comma-separated (default: those of CVIQ, OIQA, IQA-ODI present under the data root)")
    g.add_argument("--data-root", default=None, help="folder of the registered databases (default ./data or $KDOIQA_DATA)")
    g.add_argument("--protocols", default="paper,ours", help="comma-separated, from paper, ours")
    g.add_argument("--seeds", type=cli.positive, default=1,
                   help="how many training seeds: --seed, --seed + 1, ... (each a full run of every stage)")
    g.add_argument("--out", default="reproduction", help="where the runs, features and tables go")
    g.add_argument("--no-cross", dest="cross", action="store_false", help="skip the cross-database pairs")
    g = parser.add_argument_group("distillation (passed on)")
    g.add_argument("--kd-warmup", type=cli.non_negative, default=5, help="supervised-only epochs first")
    g.add_argument("--kd-feature-epochs", type=cli.non_negative, default=5, help="feature imitation epochs before the mask")
    g.add_argument("--folds", type=cli.positive, default=5, help="folds of each database's default split")
    return parser


@dataclass
class Stage:
    kind: str                    # faces, erp, teacher, features, student, ... (for the time estimate)
    label: str
    run: Callable[[], str]       # returns "done" when it found its work done
    ranks: str = "all"           # "all": every torchrun process takes part; "main": rank 0 alone


@dataclass
class Plan:
    stages: list[Stage] = field(default_factory=list)
    within: dict = field(default_factory=dict)     # protocol -> {(database, model, seed): run folder}
    cross: dict = field(default_factory=dict)      # protocol -> {(A, B, model, seed): run folder}


def present_databases(names: str | None, data_root: str | None) -> list[str]:
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for name in chosen:
            load_database(name, data_root, check_files=False)  # a one-line error when it is not there
        return chosen
    found = [n for n in PAPER_DATABASES if (resolve_database_root(n, data_root)[0] / "meta.csv").is_file()]
    if not found:
        root = resolve_database_root("OIQA", data_root)[0].parent
        raise UserError(f"{root}: none of {', '.join(PAPER_DATABASES)} is prepared here (see the README's "
                        f"'Databases'); or pass --data-root / --databases")
    return found


def database_labels(names: list[str], data_root: str | None) -> dict[str, str]:
    """Each --databases entry -> the name its runs, features and table columns go by under --out: the
    database's name (a folder's database.json name, else the folder's name), never its path; entries that
    share a name are told apart by their database key."""
    dbs = {n: load_database(n, data_root, check_files=False) for n in names}
    labels = {n: re.sub(r"[^A-Za-z0-9_.-]+", "_", db.name) for n, db in dbs.items()}
    for n in names:
        if list(labels.values()).count(labels[n]) > 1:
            labels[n] = database_key(dbs[n])
    if len(set(labels.values())) < len(labels):
        raise UserError(f"--databases names one database twice ({', '.join(names)})")
    return labels


def plan(args, explicit: frozenset[str]) -> Plan:
    out = Path(args.out)
    databases = present_databases(args.databases, args.data_root)
    label = database_labels(databases, args.data_root)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise UserError(f"--protocols takes paper and/or ours, got {args.protocols!r}")
    passed = {dest: getattr(args, dest) for dest in explicit - OWN}
    root = ["--data-root", args.data_root] if args.data_root else []
    data = cli.data_settings(args)
    result = Plan()

    def training(script: str, where: list[str], run_dir: Path, protocol: str, seed: int, label: str,
                 extra: dict | None = None) -> Stage:
        build, cross = cli.TRAINERS[script]
        argv = [*where, *root, "--protocol", protocol, "--seed", str(seed),
                *cli.to_argv(build(cross=cross), {**passed, **(extra or {})})]
        kind = ("cross-" if cross else "") + ("teacher" if "teacher" in script else "student")
        return Stage(kind, label, lambda: cli.run_training(script, argv, run_dir, label))

    for protocol in protocols:
        quality = passed.get("face_jpeg_quality", PROTOCOLS[protocol]["face_jpeg_quality"])
        within, cross = result.within.setdefault(protocol, {}), result.cross.setdefault(protocol, {})
        for name in databases:
            result.stages.append(Stage("faces", f"[{protocol}] {label[name]}: cube faces", ranks="main",
                                       run=lambda n=name, q=quality: _faces(n, args, data, q)))
            result.stages.append(Stage("erp", f"[{protocol}] {label[name]}: resized ERPs", ranks="main",
                                       run=lambda n=name: _erp(n, args, data)))
        for seed in range(args.seed, args.seed + args.seeds):
            base = out / protocol / f"seed{seed}"
            for name in databases:
                tag, where = f"[{protocol} seed {seed}] {label[name]}", ["--database", name]
                teacher, feats = base / label[name] / "teacher", base / label[name] / "features"
                result.stages.append(training("teacher_train", where, teacher, protocol, seed, f"{tag}: teacher"))
                result.stages.append(Stage("features", f"{tag}: features", ranks="main",
                                           run=lambda n=name, t=teacher, f=feats: _features(n, t, f, args, data)))
                for kd in ("mask", "none"):
                    run_dir = base / label[name] / f"student_{kd}"
                    result.stages.append(training("mask_train", where, run_dir, protocol, seed, f"{tag}: student --kd {kd}",
                                                  {"kd": kd, "features_dir": str(feats)}))
                    within[(label[name], kd, seed)] = run_dir
                within[(label[name], "teacher", seed)] = teacher
            for a in databases if args.cross else []:
                for b in (b for b in databases if b != a):
                    la, lb = label[a], label[b]
                    pair_dir, tag = base / "cross" / f"{la}-to-{lb}", f"[{protocol} seed {seed}] {la} -> {lb}"
                    where = ["--database-train", a, "--database-test", b]
                    result.stages.append(training("teacher_crossdb_train", where, pair_dir / "teacher", protocol, seed,
                                                  f"{tag}: teacher"))
                    result.stages.append(Stage("cross-features", f"{tag}: features", ranks="main",
                                               run=lambda a=a, b=b, d=pair_dir: _cross_features(a, b, d, args, data)))
                    for kd in ("mask", "none"):
                        result.stages.append(training("crossdb_train", where, pair_dir / f"student_{kd}", protocol, seed,
                                                      f"{tag}: student --kd {kd}",
                                                      {"kd": kd, "features_dir": str(pair_dir / "features")}))
                        cross[(la, lb, kd, seed)] = pair_dir / f"student_{kd}"
                    cross[(la, lb, "teacher", seed)] = pair_dir / "teacher"
    return result


def _faces(name: str, args, data, quality) -> str:
    db = load_database(name, args.data_root)
    summary = extract_database(db, data.face_size, args.device, cli.default_threads(), jpeg_quality=quality,
                               progress=args.progress)
    return "done" if not summary.written else "made"


def _erp(name: str, args, data) -> str:
    db = load_database(name, args.data_root)
    summary = resize_database(db, data.erp_size, cli.default_threads(), progress=args.progress)
    return "done" if not summary.written else "made"


def _features(name: str, teacher: Path, features: Path, args, data) -> str:
    if stages.features_up_to_date(teacher, features, args.data_root, database=name):
        return "done"
    stages.save_teacher_features(name, args.data_root, str(teacher), str(features), data=data,
                                 runtime=cli.inference_runtime(args),
                                 hint=cli.features_hint(name, args.data_root, str(features)))
    return "made"


def _cross_features(a: str, b: str, pair_dir: Path, args, data) -> str:
    if stages.features_up_to_date(pair_dir / "teacher", pair_dir / "features", args.data_root, pair=(a, b)):
        return "done"
    stages.save_crossdb_features(a, b, args.data_root, str(pair_dir / "teacher"), str(pair_dir / "features"),
                                 data=data, runtime=cli.inference_runtime(args),
                                 hint=cli.features_hint(a, args.data_root, str(pair_dir / "features"), test=b))
    return "made"


def execute(work: Plan, out: Path) -> None:
    """Run the stages in order, each announced with the time so far and an estimate of what is left."""
    history_path = out / "stages.jsonl"
    history = [json.loads(line) for line in history_path.read_text().splitlines()] if history_path.is_file() else []
    started = time.perf_counter()
    for i, stage in enumerate(work.stages, 1):
        if DIST.is_main:
            print(f"\n== [{i}/{len(work.stages)}] {stage.label} ({_minutes(time.perf_counter() - started)} so far"
                  f"{_estimate(work.stages[i - 1:], history)})", flush=True)
        t0 = time.perf_counter()
        state = stage.run() if stage.ranks == "all" or DIST.is_main else "done"
        if state == "done" and stage.ranks == "main" and DIST.is_main:
            print(f"{stage.label}: done, skipped", flush=True)
        DIST.barrier()
        if state != "done" and DIST.is_main:
            history.append({"kind": stage.kind, "label": stage.label, "seconds": time.perf_counter() - t0})
            out.mkdir(parents=True, exist_ok=True)
            with open(history_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(history[-1]) + "\n")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _estimate(remaining: list[Stage], history: list[dict]) -> str:
    """About how long the stages left take, from the durations of the same kinds of stage so far."""
    by_kind: dict[str, list[float]] = {}
    for record in history:
        by_kind.setdefault(record["kind"], []).append(record["seconds"])
    known = [sum(by_kind[s.kind]) / len(by_kind[s.kind]) for s in remaining if s.kind in by_kind]
    if not known:
        return "; time left: estimated once a stage of each kind has run"
    unknown = sum(s.kind not in by_kind for s in remaining)
    return f"; about {_minutes(sum(known))} left" + (f" + {unknown} stage(s) of kinds not timed yet" if unknown else "")


def write_tables(work: Plan, out: Path) -> None:
    """tables.md, tables.tex and effects.json from the finished runs."""
    md, tex, effects = ["# KD-OIQA reproduction", ""], [], []
    for protocol, runs in work.within.items():
        databases = list(dict.fromkeys(db for db, _, _ in runs))
        note = ("best epoch on each test fold, as the paper's code" if protocol == "paper"
                else "last epoch, no selection")
        for fmt, lines in ((False, md), (True, tex)):
            table1, effect, records = paper_tables.within_tables(runs, databases, protocol, tex=fmt)
            heading = f"protocol {protocol} ({note}); mean ± std over folds and seeds"
            if fmt:
                lines += [f"% Table 1, {heading.replace('±', '+/-')}", table1, "",
                          "% mask KD - baseline, paired by fold and seed", effect, ""]
            else:
                lines += [f"## Table 1 — {heading}", "", table1, "",
                          "Paired effect of mask distillation (mask KD − baseline, same fold and seed), "
                          "95% percentile bootstrap interval over the pairs:", "", effect, ""]
                effects += records
            by_type = paper_tables.distortion_table(runs, databases, tex=fmt)
            if by_type is not None:
                lines += ([f"% SRCC per distortion type, protocol {protocol}", by_type, ""] if fmt else
                          [f"### SRCC per distortion type — protocol {protocol}", "", by_type, ""])
        if work.cross.get(protocol):
            for fmt, lines in ((False, md), (True, tex)):
                table = paper_tables.cross_table(work.cross[protocol], tex=fmt)
                lines += ([f"% cross-database, protocol {protocol}", table, ""] if fmt else
                          [f"## Cross-database — protocol {protocol}", "", table, ""])
    shown = {db for runs in work.within.values() for db, _, _ in runs}
    if shown & set(paper_tables.PAPER_TEACHER):
        md += ["The authors' teacher: the 5-fold means of the figures in their teacher checkpoints' names "
               "(listed in feat_save.py and crossdb_feat.py of github.com/Aca4peop/KD-OIQA), best epoch on the "
               "test fold.", ""]
    md += [f"Paired-effect intervals need at least {paper_tables.MIN_PAIRS} paired folds; at small sizes trained "
           "from scratch the differences between models are noise, not findings.", ""]
    atomic_write_text(out / "tables.md", "\n".join(md))
    atomic_write_text(out / "tables.tex", "\n".join(tex) + "\n")
    atomic_write_json(out / "effects.json", effects)
    print("\n" + "\n".join(md), flush=True)
    print(f"tables: {out / 'tables.md'}, {out / 'tables.tex'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args, explicit = cli.parse(build_parser(), argv)
    work = plan(args, explicit)
    INTERRUPT_HINT.insert(0, shlex.join(["python", "reproduce.py", *(sys.argv[1:] if argv is None else argv)]))
    out = Path(args.out)
    if DIST.enabled:
        DIST.init(args.device, "folds")
    if DIST.is_main:
        counts = {kind: sum(s.kind == kind for s in work.stages) for kind in dict.fromkeys(s.kind for s in work.stages)}
        print(f"reproduction in {out}: {len(work.stages)} stages ({', '.join(f'{n} {k}' for k, n in counts.items())})",
              flush=True)
    execute(work, out)
    if DIST.is_main:
        write_tables(work, out)


if __name__ == "__main__":
    run_cli(main)
