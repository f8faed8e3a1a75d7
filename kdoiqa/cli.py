"""The command-line layer: the scripts' parsers, generated from the settings' declarations, and parsed
flags -> typed settings.

Every training flag is a field of `settings.py` declared once (default, help, type, protocol values);
the parsers here are made from those fields, so a flag has one name, one meaning and one default
everywhere. A command line is parsed once: what the user gave is what argparse saw, the rest are the
declared defaults (`Parsed.given`). The paper's spellings (`--num_epochs`, `--batch_size`,
`--database_train`, any `--foo_bar` for `--foo-bar`) are accepted. Only this module reads argparse
Namespaces; library code takes the dataclasses of `settings.py`.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kdoiqa.common import UserError, jsonable, parse_size
from kdoiqa.settings import (
    PROTOCOLS,
    SCRIPT_DEFAULTS,
    SETTINGS,
    DataSettings,
    DistillSettings,
    EvalSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    RuntimeSettings,
    Setting,
    TrainingSettings,
    erp_size,
    from_args,
    from_values,
    protocol_value,
    resume_free,
)
from kdoiqa.settings import minutes as _minutes
from kdoiqa.settings import non_negative as _non_negative
from kdoiqa.settings import positive as _positive

PAPER_SPELLINGS = {"--num_epochs": "--epochs", "--num-epochs": "--epochs", "--features": "--features-dir"}


def _shown(action: argparse.Action) -> Any:
    return getattr(action, "declared_default", action.default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring verbatim, and every flag's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = _shown(action)
        if "%(default)" in text or "(default" in text or default is argparse.SUPPRESS or default is None \
                or isinstance(default, bool) or action.nargs == 0:
            return text
        if isinstance(default, tuple) and len(default) == 2:
            return f"{text} (default: {default[0]}x{default[1]})"
        return f"{text} (default: {str(default).replace('%', '%%')})"


class Parsed(argparse.Namespace):
    """Parsed arguments; `given` names the destinations the command line gave (the others hold defaults). A slot,
    not an attribute: `vars(args)` holds the flags alone."""

    __slots__ = ("given",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.given: frozenset[str] = frozenset()


class Parser(argparse.ArgumentParser):
    """ArgumentParser that takes the paper's spellings of our flags, knows which flags a command line gave
    without parsing it twice, and reports a bad command line as a UserError (`run_cli` prints it as one
    line, exit code 2) instead of the usage block.

    Before parsing, each optional argument's default is kept aside (`declared_default`, shown by --help) and
    filled in after parsing, so that what argparse set is exactly what the user gave."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        for action in self._actions:  # also those of parents and groups; once per action
            _declare_default(action)
        parsed, rest = super().parse_known_args(self._normalise(argv), Parsed() if namespace is None else namespace)
        given = frozenset(vars(parsed))
        for action in self._actions:
            if action.dest is argparse.SUPPRESS or hasattr(parsed, action.dest) or not hasattr(action, "declared_default"):
                continue
            default = action.declared_default
            if isinstance(default, str) and action.type is not None:
                default = self._get_value(action, default)
            setattr(parsed, action.dest, default)
        if isinstance(parsed, Parsed):
            parsed.given = given | parsed.given if namespace is not None else given
        return parsed, rest

    def _normalise(self, argv: list[str]) -> list[str]:
        known = set(self._option_string_actions)
        out = []
        for i, token in enumerate(argv):
            if token == "--":
                return out + argv[i:]
            if token.startswith("--"):
                name, eq, value = token.partition("=")
                alias = PAPER_SPELLINGS.get(name, name.replace("_", "-"))
                if name not in known and alias in known:
                    token = alias + eq + value
            out.append(token)
        return out


def _declare_default(action: argparse.Action) -> None:
    """Keep an optional argument's default aside: argparse then sets only what the command line gives."""
    if action.option_strings and action.default is not argparse.SUPPRESS and not hasattr(action, "declared_default"):
        action.declared_default = action.default  # type: ignore[attr-defined]
        action.default = argparse.SUPPRESS


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, frozenset[str]]:
    """Parsed arguments and the destinations given explicitly on the command line (one parse)."""
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return args, frozenset(getattr(args, "given", frozenset()))


def _argparse_type(parse_word: Callable[[str], Any]) -> Callable[[str], Any]:
    """A settings parser as an argparse type: its ValueError becomes argparse's message."""
    if parse_word in (int, float):
        return parse_word

    def convert(text: str) -> Any:
        try:
            return parse_word(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = getattr(parse_word, "__name__", "value")
    return convert


def size_type(name: str) -> Callable[[str], tuple[int, int]]:
    """An argparse type: `parse_size` for the flag `name`, its ValueError as argparse's message."""
    return _argparse_type(functools.partial(parse_size, name=name))


erp_size_type = _argparse_type(erp_size)
positive = _argparse_type(_positive)
non_negative = _argparse_type(_non_negative)
minutes = _argparse_type(_minutes)


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _protocol_tail(setting: Setting) -> str:
    """Help-text tail of a setting whose default comes from --protocol."""
    flag = setting.flag
    words = {value: word for word, value in (flag.words or {}).items()}

    def show(value: Any) -> str:
        if value is None and setting.name == "face_jpeg_quality":
            return "lossless"
        return str(words.get(value, value))
    return f"(default by --protocol: ours {show(flag.protocol['ours'])}, paper {show(flag.protocol['paper'])})"


# ----------------------------------------------------------------------------------------------
# Parsers generated from the settings.

GROUP_TITLES = {"database": "database", "cross": "cross-database (the paper's --database_train / --database_test work too)",
                "data": "data", "model": "model", "optim": "optimisation (the paper's values)", "eval": "evaluation",
                "run": "run", "runtime": "runtime", "training runtime": "runtime (training)", "distill": "distillation"}


def add_setting(group: Any, name: str, *, student: bool = False, script: str = "", hidden: bool = False,
                default: Any = None) -> None:
    """The flag of the setting `name` (settings.SETTINGS), as declared; a student script accepts the teacher's
    own flags (a command line shared with the teacher works) but does not list them."""
    setting = SETTINGS[name]
    flag = setting.flag
    if default is None:
        default = SCRIPT_DEFAULTS.get(script, {}).get(name, setting.command_default)
    text = flag.help if not flag.by_protocol or "(default" in flag.help else f"{flag.help} {_protocol_tail(setting)}"
    kwargs: dict[str, Any] = {"dest": name, "default": default,
                              "help": argparse.SUPPRESS if hidden or (student and flag.teacher_only) else text}
    if isinstance(setting.default, bool) and flag.choices is None:
        kwargs["action"] = "store_false" if setting.default else "store_true"
    else:
        if flag.parse is not None:
            kwargs["type"] = _argparse_type(flag.parse)
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
        if flag.metavar is not None:
            kwargs["metavar"] = flag.metavar
    group.add_argument(setting.option, **kwargs)


def settings_of(key: str) -> list[str]:
    """The settings of the --help group `key`, in their declaration order."""
    return [name for name, s in SETTINGS.items() if s.flag.group == key]


def flags_parser(*keys: str, student: bool = False, script: str = "") -> Parser:
    """A parent parser of the settings groups `keys` (--help groups, in that order)."""
    p = Parser(add_help=False)
    for key in keys:
        g = p.add_argument_group(GROUP_TITLES[key])
        for name in settings_of(key):
            add_setting(g, name, student=student, script=script)
    return p


def database_parser() -> Parser:
    return flags_parser("database")


def cross_parser() -> Parser:
    p = Parser(add_help=False)
    g = p.add_argument_group(GROUP_TITLES["cross"])
    for name in (*settings_of("cross"), "data_root"):
        add_setting(g, name)
    g.add_argument("--database", default=None, help=argparse.SUPPRESS)  # refused with a hint (check_cross_values)
    return p


def check_cross_values(given: Mapping[str, Any] | argparse.Namespace) -> None:
    values = vars(given) if isinstance(given, argparse.Namespace) else given
    if values.get("database"):
        raise UserError("cross-database scripts take --database-train A --database-test B, not --database")


def training_parser(script: str, description: str | None = None) -> Parser:
    """The parser of a training script (teacher_train, mask_train, and their cross-database versions)."""
    cross, student = "crossdb" in script, script in ("mask_train", "crossdb_train")
    parents = [cross_parser() if cross else database_parser(),
               flags_parser("data", "model", "optim", "eval", "run", "runtime", "training runtime", student=student,
                            script=script)]
    if student:
        parents.append(flags_parser("distill"))
    return Parser(description=description, parents=parents)


def inference_parents(*, batch_size: int = 32) -> list[argparse.ArgumentParser]:
    """The parent parsers of a script that runs a trained network over a database (features)."""
    p = Parser(add_help=False)
    g = p.add_argument_group("inference")
    g.add_argument("--batch-size", type=positive, default=batch_size, help="images per forward pass")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                   help="default: the teacher run's protocol (fp32 features under paper, bf16 on CUDA under ours)")
    return [flags_parser("data"), flags_parser("runtime"), p]


# ----------------------------------------------------------------------------------------------
# Values -> settings: the declared defaults, the protocol layer, then what was given.

SCRIPTS = ("teacher_train", "mask_train", "teacher_crossdb_train", "crossdb_train")


@functools.cache
def _script_defaults(script: str) -> tuple[tuple[str, Any], ...]:
    parser = training_parser(script)
    return tuple((a.dest, _shown(a)) for a in parser._actions if a.option_strings and a.dest != "help")


def script_defaults(script: str) -> dict[str, Any]:
    """Every flag destination of a training script with its command-line default, in --help order."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown training script {script!r}")
    return dict(_script_defaults(script))


def resolve_protocol(values: Mapping[str, Any], script: str) -> dict[str, Any]:
    """A copy of `values` with each protocol-dependent setting left unset filled in from its protocol."""
    resolved = dict(values)
    protocol = resolved.get("protocol") or "ours"
    for name in PROTOCOLS[protocol]:
        if name in resolved and resolved[name] is None:
            resolved[name] = protocol_value(protocol, name, script)
    return resolved


def resume_values(values: dict[str, Any], given: Mapping[str, Any], script: str) -> dict[str, Any]:
    """`--resume --out DIR`: the run's own values from its args.json; values given now must agree with
    them (all disagreements are reported at once), except those that do not change what is trained."""
    run_dir = Path(values["out"])
    path = run_dir / "args.json"
    if not path.is_file():
        from kdoiqa.runs import no_args_json  # a run folder's files (not needed to parse a command line)

        raise UserError(no_args_json(run_dir))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        saved = record["args"]
        if not isinstance(saved, dict):
            raise ValueError("'args' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {err}); cannot resume this run") from None
    if record.get("script") != script:
        raise UserError(f"{path}: a {record.get('script')} run, not a {script} run; resume it with "
                        f"{record.get('script')}.py")
    mismatches = []
    for name in sorted(n for n in given if not resume_free(n)):
        if name in saved and jsonable(given[name]) != saved[name]:
            mismatches.append(f"{_spelled(name)} was {_show(saved[name])}, now {_show(given[name])}")
    if mismatches:
        raise UserError(f"{path}: this run was started with other settings: {'; '.join(mismatches)}; resume with "
                        f"`--resume --out {shlex.quote(str(run_dir))}` alone, or start a new --out")
    merged = {**values, **{k: v for k, v in saved.items() if k in values}}
    merged.update({name: value for name, value in given.items() if resume_free(name)})
    if isinstance(merged.get("erp_size"), list):
        merged["erp_size"] = tuple(merged["erp_size"])
    return merged


def _spelled(name: str) -> str:
    """A setting in a message: its flag, and for a negated flag the setting it switches off."""
    option = SETTINGS[name].option if name in SETTINGS else f"--{name.replace('_', '-')}"
    return f"{option} ({name})" if option.startswith("--no-") else option


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return repr(value)


def flag_of(dest: str) -> str:
    """The command-line spelling of a destination (`face_size` -> --face-size, `pretrained` -> --no-pretrained)."""
    return SETTINGS[dest].option if dest in SETTINGS else f"--{dest.replace('_', '-')}"


def refuse_explicit(explicit: frozenset[str], names: Sequence[str], why: str) -> None:
    """An explicit flag among `names` cannot apply (`why`): refused in one line, never silently dropped."""
    given = [flag_of(name) for name in names if name in explicit]
    if given:
        raise UserError(f"{', '.join(given)} cannot apply: {why}; drop {'it' if len(given) == 1 else 'them'}")


def given_values(args: argparse.Namespace, explicit: frozenset[str]) -> dict[str, Any]:
    """The values a command line gave (the destinations in `explicit`)."""
    return {name: getattr(args, name) for name in explicit if hasattr(args, name)}


def training_settings(script: str, args: argparse.Namespace, explicit: frozenset[str] = frozenset()) -> TrainingSettings:
    """The typed settings of a parsed training command line (see `settings_for`); flags of the script's own
    (crossdb_train.py --matrix) are not settings."""
    takes = script_defaults(script)
    return settings_for(script, {k: v for k, v in given_values(args, explicit).items() if k in takes})


def settings_for(script: str, given: Mapping[str, Any]) -> TrainingSettings:
    """Validate and group into typed settings the values of a training script: its declared defaults, the
    protocol's preset over them, and `given` (the user's, or an orchestrator's) over both. With `resume`,
    the run's own values from its args.json, checked against those given."""
    defaults = script_defaults(script)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{script} takes no {', '.join(unknown)}")
    values = {**defaults, **given}
    if values.get("resume"):
        if not values.get("out"):
            raise UserError("--resume needs --out RUN_FOLDER (the run to continue)")
        values = resume_values(values, given, script)
    raw = jsonable(values)
    resolved = resolve_protocol(values, script)
    check_training_values(resolved)
    settings = TrainingSettings(
        script=script, protocol=resolved["protocol"],
        data=from_values(DataSettings, {**resolved, "erp_size": tuple(resolved["erp_size"])}),
        runtime=from_values(RuntimeSettings, resolved),
        model=from_values(ModelSettings, resolved),
        optim=from_values(OptimSettings, resolved),
        eval=from_values(EvalSettings, resolved),
        run=from_values(RunSettings, resolved),
        distill=from_values(DistillSettings, resolved) if "kd" in resolved else None, args=raw)
    check_distill_values(settings)
    return settings


def check_training_values(values: Mapping[str, Any]) -> None:
    """Validate values that argparse cannot check (one-line errors)."""
    if "database_test" in values:  # a cross-database script: one split, all of A -> all of B
        check_cross_values(values)
        if values["folds_file"]:
            raise UserError("--folds-file does not apply: a cross-database run trains on all of A and tests on all of B")
        if values["fold"] not in (None, 0):
            raise UserError(f"--fold {values['fold']}: a cross-database run has a single split (fold 0)")
    if not 0 < values["val_fraction"] < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {values['val_fraction']}")
    if values["weights"] and not Path(values["weights"]).is_file():
        raise UserError(f"{values['weights']}: --weights file not found")
    if values["folds"] < 2 and not values["folds_file"]:
        raise UserError(f"--folds must be at least 2, got {values['folds']}")
    if values["lr"] <= 0:
        raise UserError(f"--lr must be positive, got {values['lr']}")


def data_settings(args: argparse.Namespace, **overrides: Any) -> DataSettings:
    return from_args(DataSettings, args, **overrides)


def inference_runtime(args: argparse.Namespace) -> RuntimeSettings:
    """The runtime of a feature script: --amp, --tf32 left unset (None) follow the protocol (--protocol, or
    the teacher run's own), resolved where the teacher run is known."""
    values = vars(args)
    if values.get("protocol") is not None:
        values = resolve_protocol(values, "")
    return from_values(RuntimeSettings, values)


# ----------------------------------------------------------------------------------------------
# The scripts' parsers (here, so that reproduce.py and the cross-database matrix build them too).

def teacher_parser(description: str | None = None, *, cross: bool = False) -> Parser:
    """teacher_train.py (cross: teacher_crossdb_train.py, 50 epochs as the paper)."""
    return training_parser("teacher_crossdb_train" if cross else "teacher_train", description)


def student_parser(description: str | None = None, *, cross: bool = False) -> Parser:
    """mask_train.py (cross: crossdb_train.py, 50 epochs as the paper)."""
    return training_parser("crossdb_train" if cross else "mask_train", description)


def features_parser(description: str | None = None, *, cross: bool = False) -> Parser:
    """feat_save.py (cross: crossdb_feat.py)."""
    parser = Parser(description=description, parents=[cross_parser() if cross else database_parser(),
                                                      *inference_parents()])
    g = parser.add_argument_group("features")
    g.add_argument("--run", default=None,
                   help="the teacher run folder (default: the latest finished teacher run of this "
                        + ("pair" if cross else "database") + ")")
    g.add_argument("--features-dir", default=None,
                   help="where the features go (default features/<A>-to-<B>)" if cross
                   else "where the features go (default features/<database key>)")
    if not cross:
        g.add_argument("--fold", type=int, default=None, help="only this fold (default: every finished fold of the run)")
        g.add_argument("--from-authors", default=None, metavar="DIR",
                       help="import the authors' released features (DIR/<1..5>/<id>.npy) instead of running a "
                            "teacher; needs the database's folds/authors.json (default: compute them from --run)")
    return parser


def to_argv(parser: argparse.ArgumentParser, values: Mapping[str, Any]) -> list[str]:
    """The command-line tokens that give `parser` the destinations `values` (those it knows), in the order of
    its flags: a command to print (a `next:` hint, the demo's steps), never one to parse again."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest not in values:
            continue
        value = values[action.dest]
        flag = max(action.option_strings, key=lambda s: (s.startswith("--"), "-" in s[2:], len(s)))
        if action.nargs == 0:  # store_true / store_false
            if value != _shown(action):
                argv.append(flag)
        elif value is not None:
            if isinstance(value, (list, tuple)) and action.dest == "erp_size":
                value = f"{value[0]}x{value[1]}"
            argv += [flag, str(value)]
    return argv


def carried_flags(parser: argparse.ArgumentParser, values: Mapping[str, Any], step: str) -> list[str]:
    """The tokens that give `parser` those of `values` (the parsed flags of an earlier command) that the
    `next:` hint of `step` (features, student) carries over (settings.Flag.carried) and that differ from
    its defaults: what the hint repeats of the user's own command line."""
    defaults = {a.dest: _shown(a) for a in parser._actions}

    def plain(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    chosen = {name: values[name] for name, s in SETTINGS.items() if step in s.flag.carried
              and name in values and name in defaults and values[name] is not None
              and plain(values[name]) != plain(defaults[name])}
    return to_argv(parser, chosen)


def check_distill_values(settings: TrainingSettings) -> None:
    """A distillation that never starts is refused: it would report the --kd none numbers as KD's."""
    d, epochs = settings.distill, settings.optim.epochs
    if d is None or d.kd == "none":
        return
    first = d.kd_warmup + 1 if d.kd == "feature" else d.kd_warmup + d.kd_feature_epochs + 1
    if epochs < first:
        phases = (f"--kd-warmup {d.kd_warmup}" if d.kd == "feature"
                  else f"--kd-warmup {d.kd_warmup} + --kd-feature-epochs {d.kd_feature_epochs}")
        raise UserError(f"--kd {d.kd} with --epochs {epochs}: its distillation phase starts at epoch {first} "
                        f"(after {phases}), so the run would never distil; raise --epochs to {first} or more, or "
                        f"lower the phase epochs")


# ----------------------------------------------------------------------------------------------
# "next:" hints: the command after a stage, with the user's flags that carry over (the stages print what
# these functions make of what they made).

def _command(script: str, *words: object) -> str:
    """`python <script> word ...`, each word quoted for a POSIX shell: a hint that works when pasted."""
    return shlex.join(["python", script, *(str(w) for w in words)])


def teacher_hint(settings: TrainingSettings) -> Callable[[Any], str]:
    """After a teacher run: the command of its features, with the run's flags that the feature script takes."""
    from kdoiqa.teacher_features import crossdb_feat_command, feat_save_command

    cross = settings.script == "teacher_crossdb_train"
    carried = carried_flags(features_parser(cross=cross), settings.args, "features")

    def hint(run: Any) -> str:
        line = (crossdb_feat_command(settings.run.database_train, settings.run.database_test, run.run_dir) if cross
                else feat_save_command(settings.run.database, run.run_dir))
        return " ".join([line, *map(shlex.quote, carried)])
    return hint


def student_hint(settings: TrainingSettings) -> Callable[[Any], str] | None:
    """After a within-database student: predict.py on the run and the database's first image."""
    if settings.script == "crossdb_train":
        return None
    device = ["--device", settings.runtime.device] if settings.runtime.device else []
    return lambda run: _command("predict.py", run.run_dir, run.db.root / run.db.images[0], *device)


def features_hint(database: str, data_root: str | None, features_dir: str | None, fold: int | None = None,
                  *, test: str | None = None) -> Callable[[dict], str]:
    """After teacher features (of `database`, or of the pair `database` -> `test`): the student's command, from
    the teacher run's record."""
    dirs = ["--features-dir", features_dir] if features_dir else []
    if test is not None:
        script, words = "crossdb_train.py", ["--database-train", database, "--database-test", test, *dirs]
    else:
        script, words = "mask_train.py", ["--database", database, *dirs, *(["--fold", str(fold)] if fold is not None else [])]
    return lambda record: student_command(script, words, record, data_root)


def authors_features_hint(database: str, data_root: str | None, features_dir: str | None) -> Callable[[Any], str]:
    """After the authors' features: mask_train.py on them."""
    return lambda _: _command("mask_train.py", "--database", database, *(["--data-root", data_root] if data_root else []),
                              *(["--features-dir", features_dir] if features_dir else []))


def student_command(script: str, words: list[str], teacher: dict, data_root: str | None) -> str:
    """The student's command after the features of the teacher run `teacher` (its args.json): `words`, then the
    user's own flags of that run that the student takes too, at the teacher's scale (its epochs, an ERP size
    four times its face size as the paper's 1024x512 to 256, distillation phases that fit those epochs)."""
    args = dict(teacher.get("args") or {})
    if data_root:
        args["data_root"] = data_root
    parser = student_parser(cross=script == "crossdb_train.py")
    words = [*words, *carried_flags(parser, args, "student")]
    face = int((teacher.get("settings") or {}).get("data", {}).get("face_size") or 256)
    if "--erp-size" not in words and face < 256:
        words += ["--erp-size", f"{4 * face}x{2 * face}"]
    epochs = int(args.get("epochs") or 100)
    if epochs < 11:  # the default phases (5 + 5 epochs) would leave no mask phase: refused by mask_train.py
        phase = (epochs - 1) // 3
        words += ["--kd-warmup", str(phase), "--kd-feature-epochs", str(phase)]
    return _command(script, *words)


# ----------------------------------------------------------------------------------------------
# A training in a fixed folder, resumable (reproduce.py, the cross-database matrix).

def run_training(script: str, given: Mapping[str, Any], run_dir: Path, label: str) -> str:
    """Train `script` with the values `given` in `run_dir` unless it is done there (with the same values: a run
    of other settings is refused, as --resume refuses it); resume it when it was interrupted. Returns the
    state found. `given` may hold values of other scripts too (an orchestrator's): those this one takes pass."""
    from kdoiqa import stages
    from kdoiqa.distributed import DIST

    state = stages.training_state(run_dir)
    takes = script_defaults(script)
    given = {**{k: v for k, v in given.items() if k in takes}, "out": str(run_dir),
             **({"resume": True} if state != "new" else {})}
    settings = settings_for(script, given)  # with resume: checked against the run's args.json
    if state == "done":
        if DIST.is_main:
            print(f"{label}: done, skipped ({run_dir})", flush=True)
        return state
    if DIST.is_main:
        print(f"{label}: {'resuming' if state == 'partial' else 'training'} in {run_dir}", flush=True)
    if "teacher" in script:
        stages.train_teacher(settings, frozenset(given), hint=teacher_hint(settings))
    else:
        stages.train_student(settings, frozenset(given), hint=student_hint(settings))
    return state


def matrix_settings(args: argparse.Namespace, explicit: frozenset[str]) -> Any:
    """crossdb_train.py --matrix A,B,...: the matrix's settings, every stage's flags checked before any work."""
    from kdoiqa.crossdb_matrix import MATRIX_DIR, MatrixSettings

    names = [n.strip() for n in args.matrix.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"--matrix needs at least two databases separated by commas, got {args.matrix!r}")
    if len(set(names)) != len(names):
        raise UserError(f"--matrix names a database twice: {args.matrix!r}")
    for flag in ("database_train", "database_test", "database", "folds_file", "features_dir"):
        if flag in explicit:
            raise UserError(f"--{flag.replace('_', '-')} does not go with --matrix (the matrix picks every pair "
                            f"and keeps its features under --out)")
    if args.fold not in (None, 0):
        raise UserError(f"--fold {args.fold}: a cross-database run has a single split")
    if args.resume:
        raise UserError("--matrix always resumes what is done; drop --resume")
    training_settings("crossdb_train", args, explicit)  # every stage's flags checked before any work
    return MatrixSettings(databases=tuple(names), out=Path(args.out) if args.out else MATRIX_DIR,
                          data_root=args.data_root, kd=args.kd, protocol=args.protocol, select=args.select,
                          data=data_settings(args), runtime=inference_runtime(args))


def matrix_steps(args: argparse.Namespace, explicit: frozenset[str]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The matrix's training stage (each pair's teacher and student, with the user's explicit flags; the
    matrix sets each pair's databases, folder and features over them) and the `next:` hint after a pair's
    features."""
    from kdoiqa import pipeline  # here, not at the top: parsing a command line needs no torch

    passed = given_values(args, explicit)  # --matrix and --out are not a stage's: run_training sets its own folder

    def training(script: str, given: dict, run_dir: Path, label: str) -> pipeline.Stage:
        values = {**passed, **given}
        return pipeline.Stage(pipeline.stage_kind(script), label, lambda: run_training(script, values, run_dir, label))

    def hint(pair: Any, features_dir: Path) -> Callable[[dict], str]:
        return features_hint(pair.train_arg, args.data_root, str(features_dir), test=pair.test_arg)
    return training, hint


# ----------------------------------------------------------------------------------------------
# predict.py, installed as the console script `kdoiqa-predict` (pyproject.toml's [project.scripts]).

def predict_parser() -> Parser:
    from kdoiqa import predicting

    parser = Parser(description=predicting.__doc__)
    parser.add_argument("model", type=Path, help="a checkpoint.pt, a fold folder or a run folder (every fold)")
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="ERP image files or folders (searched recursively; a database folder: its meta.csv images)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the scores to this CSV (default: print them only)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--batch-size", type=positive, default=16, help="images per forward pass")
    parser.add_argument("--threads", type=positive, default=default_threads(), help="decoding threads")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                        help="mixed precision (auto: bf16 on a GPU that computes it natively, else none; the score "
                             "head is fp32 either way)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--allow-partial", action="store_true",
                        help="score a run folder whose folds have not all finished with its finished folds (the "
                             "header names the unfinished ones; default: refused)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def predict_main(argv: Sequence[str] | None = None) -> int:
    """predict.py's command line -> `kdoiqa.predicting.predict`; returns the exit code."""
    from kdoiqa.predicting import predict

    args = predict_parser().parse_args(argv)
    return predict(args.model, args.inputs, csv=args.csv, device=args.device, batch_size=args.batch_size,
                   threads=args.threads, amp=args.amp, strict=args.strict, allow_partial=args.allow_partial,
                   progress=args.progress)


def predict_command() -> None:
    """The console script `kdoiqa-predict`: predict.py's command line, its errors one line (exit code 2)."""
    from kdoiqa.common import run_cli

    run_cli(predict_main)
