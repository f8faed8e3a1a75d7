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

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kdoiqa import cli, paper_tables, pipeline
from kdoiqa.common import UserError, atomic_write_json, atomic_write_text, interrupt_hint, run_cli
from kdoiqa.databases import database_key, load_database, resolve_database_root
from kdoiqa.derived_files import extract_database, resize_database
from kdoiqa.distributed import DIST
from kdoiqa.pipeline import Stage
from kdoiqa.settings import PROTOCOLS

PAPER_DATABASES = ("CVIQ", "OIQA", "IQA-ODI")


def build_parser() -> cli.Parser:
    parser = cli.Parser(description=__doc__, parents=[cli.flags_parser("data", "model", "optim", "runtime",
                                                                        "training runtime")])
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
    for name in ("kd_warmup", "kd_feature_epochs", "folds"):
        cli.add_setting(g, name)
    return parser


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
    # The user's flags pass on to every training stage that takes them; each stage sets its own database,
    # protocol, seed and folder over them (cli.run_training).
    passed = cli.given_values(args, explicit)
    root = {"data_root": args.data_root} if args.data_root else {}
    data, runtime = cli.data_settings(args), cli.inference_runtime(args)
    result = Plan()

    def training(script: str, given: dict, run_dir: Path, label: str) -> Stage:
        return Stage(pipeline.stage_kind(script), label, lambda: cli.run_training(script, given, run_dir, label))

    def features(experiment: pipeline.Experiment, label: str) -> Stage:
        first = experiment.where.get("database_train", experiment.where.get("database"))
        hint = cli.features_hint(first, args.data_root, str(experiment.features),
                                 test=experiment.where.get("database_test"))
        return pipeline.features_stage(experiment, label, args.data_root, data, runtime, hint)

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
            given = {**passed, **root, "protocol": protocol, "seed": seed}
            experiments = []
            for name in databases:
                folder = base / label[name]
                experiments.append(pipeline.Experiment(
                    f"[{protocol} seed {seed}] {label[name]}", {"database": name}, folder / "teacher",
                    folder / "features", {kd: folder / f"student_{kd}" for kd in ("mask", "none")}))
                within.update({(label[name], kd, seed): run for kd, run in experiments[-1].students.items()})
                within[(label[name], "teacher", seed)] = folder / "teacher"
            for a in databases if args.cross else []:
                for b in (b for b in databases if b != a):
                    la, lb = label[a], label[b]
                    folder = base / "cross" / f"{la}-to-{lb}"
                    experiments.append(pipeline.Experiment(
                        f"[{protocol} seed {seed}] {la} -> {lb}", {"database_train": a, "database_test": b},
                        folder / "teacher", folder / "features",
                        {kd: folder / f"student_{kd}" for kd in ("mask", "none")}))
                    cross.update({(la, lb, kd, seed): run for kd, run in experiments[-1].students.items()})
                    cross[(la, lb, "teacher", seed)] = folder / "teacher"
            for experiment in experiments:
                result.stages += pipeline.experiment_stages(experiment, given, training, features)
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
    out = Path(args.out)
    # Ctrl-C continues the whole reproduction; one process group serves all its runs (undone at the end)
    with interrupt_hint(shlex.join(["python", "reproduce.py", *(sys.argv[1:] if argv is None else argv)])), DIST.scope():
        if DIST.enabled:
            DIST.init(args.device, "folds")
        if DIST.is_main:
            counts = {kind: sum(s.kind == kind for s in work.stages) for kind in dict.fromkeys(s.kind for s in work.stages)}
            print(f"reproduction in {out}: {len(work.stages)} stages ({', '.join(f'{n} {k}' for k, n in counts.items())})",
                  flush=True)
        pipeline.execute(work.stages, out)
        if DIST.is_main:
            write_tables(work, out)


if __name__ == "__main__":
    run_cli(main)
