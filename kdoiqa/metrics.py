"""Quality-assessment metrics: logistic mapping, SRCC, KRCC, PLCC, RMSE, and fold summaries.

The paper's conventions, made robust: SRCC (Spearman) and KRCC (Kendall tau-b) on the raw
predictions; PLCC and RMSE after a mapping fitted on the same data (by default the paper's
``b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))`` from ``[max y, min y, mean x, 0.5]``). The fit
never raises for finite input: a failed, degenerate (step-like) or worse-than-linear fit falls
back to a linear one and says why (``FitResult.fallback``). ``fit="paper"`` is instead the paper's
``fit_function`` exactly (one ``curve_fit`` from its start with its ``maxfev``, used as it comes, a
step included); only when that call raises is the default fit used, and said. A model regresses its
training database's own score (MOS or DMOS), so a good model correlates positively with it; only when it
is scored on a database whose score runs the other way (cross-database, ``train_higher_is_better``)
are the metrics taken against the negated test score (``sign_flipped``). Fold summaries append
mean, sample standard deviation (ddof=1) and median rows.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from kdoiqa.common import UserError

METRIC_KEYS: tuple[str, ...] = ("srcc", "krcc", "plcc", "rmse")
SUMMARY_LABELS: tuple[str, ...] = ("mean", "std", "median")
FIT_KINDS: tuple[str, ...] = ("logistic4", "logistic5", "paper", "none")
MIN_FIT_POINTS = 5      # fewer points than this: no nonlinear fit, a straight line instead
_MAXFEV = 20000
PAPER_MAXFEV = 100000000  # the paper's fit_function: curve_fit(..., maxfev=100000000)
# A nonlinear fit is kept unless its RMSE exceeds the linear fit's by more than this fraction
# (near-linear data make the two agree to rounding; a stuck fit is worse by far more).
_LINEAR_TOLERANCE = 1e-3
# A fit whose central 90% rise spans less than this share of the prediction range is a step, not a fit.
STEP_SHARE = 0.05


# ----------------------------------------------------------------------------------------------
# Mapping functions.

def logistic4(x: Any, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The paper's 4-parameter logistic ``b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))``.

    Evaluated with ``scipy.special.expit`` so that large arguments do not overflow.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        return b2 + (b1 - b2) * special.expit((x - b3) / np.abs(b4))


def paper_logistic(x: Any, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The paper's ``logistic_func`` as its code writes it (``np.exp``, then the division), so that a
    fit through it takes exactly the paper's steps: ``b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        logistic_part = 1 + np.exp(np.negative(np.divide(x - b3, np.abs(b4))))
        return b2 + np.divide(b1 - b2, logistic_part)


def logistic5(x: Any, b1: float, b2: float, b3: float, b4: float, b5: float) -> np.ndarray:
    """The VQEG 5-parameter logistic ``b1 * (0.5 - 1 / (1 + exp(b2 * (x - b3)))) + b4 * x + b5``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        return b1 * (0.5 - special.expit(-b2 * (x - b3))) + b4 * x + b5


def _linear(x: Any, slope: float, intercept: float) -> np.ndarray:
    return slope * np.asarray(x, dtype=np.float64) + intercept


@dataclass(frozen=True)
class FitResult:
    """A fitted mapping from predictions to subjective scores.

    Attributes:
        kind: the mapping actually used: ``logistic4``, ``logistic5``, ``paper`` (the paper's
            fit_function: its logistic, evaluated as its code does), ``linear``, ``constant`` or
            ``none`` (identity).
        params: its parameters (logistic: b1..b4/b5; linear: slope, intercept; constant: value).
        fallback: why the requested mapping was not used (None when it was).
        requested: the mapping that was asked for.
        init: which initial guess produced the logistic fit (``paper``, ``scaled``, ...), or None.
    """

    kind: str
    params: tuple[float, ...] = field(default_factory=tuple)
    fallback: str | None = None
    requested: str = "logistic4"
    init: str | None = None

    def predict(self, x: Any) -> np.ndarray:
        """Map raw predictions ``x`` through the fitted function (float64 array)."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "logistic4":
            return logistic4(x, *self.params)
        if self.kind == "logistic5":
            return logistic5(x, *self.params)
        if self.kind == "paper":
            return paper_logistic(x, *self.params)
        if self.kind == "linear":
            return _linear(x, *self.params)
        if self.kind == "constant":
            return np.full_like(x, self.params[0])
        return x.copy()  # "none": identity


# ----------------------------------------------------------------------------------------------
# Input checking.

def _as_array(values: Any, what: str) -> np.ndarray:
    """A 1-D float64 copy of a list / numpy array / torch tensor."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise UserError(f"{what} must be numbers: {err}") from None
    return array


def _check_pair(pred: Any, mos: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _as_array(pred, "predictions")
    y = _as_array(mos, "subjective scores")
    if x.shape != y.shape:
        raise UserError(f"{x.size} predictions but {y.size} subjective scores: they must pair up one to one")
    if x.size == 0:
        raise UserError("no predictions to evaluate (empty test set?): check the fold files and meta.csv")
    bad = ~np.isfinite(x)
    if bad.any():
        raise UserError(f"{int(bad.sum())} of {x.size} predictions are NaN or inf: training diverged "
                        "(try a lower learning rate) or an input image is broken")
    bad = ~np.isfinite(y)
    if bad.any():
        raise UserError(f"{int(bad.sum())} of {y.size} subjective scores are NaN or inf: fix the mos column of meta.csv")
    return x, y


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------------------------
# Fitting.

def _linear_fit(x: np.ndarray, y: np.ndarray, requested: str, reason: str | None) -> FitResult:
    """Least-squares line, or the mean of y when x is constant (or there is one point)."""
    if x.size < 2 or np.ptp(x) == 0.0:
        return FitResult("constant", (float(np.mean(y)),), reason, requested)
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    intercept = float(y.mean() - slope * x.mean())
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        return FitResult("constant", (float(np.mean(y)),), reason, requested)
    return FitResult("linear", (slope, intercept), reason, requested)


def _initial_guesses(kind: str, x: np.ndarray, y: np.ndarray) -> list[tuple[str, list[float]]]:
    """Initial guesses in the order they are tried; the paper's comes first for logistic4."""
    xmean, xstd = float(x.mean()), float(x.std()) or 1.0
    ymax, ymin, ymean = float(y.max()), float(y.min()), float(y.mean())
    if kind == "logistic4":
        return [
            ("paper", [ymax, ymin, xmean, 0.5]),
            ("scaled", [ymax, ymin, xmean, xstd]),
            ("scaled-decreasing", [ymin, ymax, xmean, xstd]),
        ]
    # logistic5: rising or falling sigmoid of the data's own scale, no linear term to start.
    span = ymax - ymin or 1.0
    return [
        ("scaled", [span, 1.0 / xstd, xmean, 0.0, ymean]),
        ("scaled-decreasing", [-span, 1.0 / xstd, xmean, 0.0, ymean]),
    ]


def _unstandardize(kind: str, params: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Parameters fitted on ``z = (x - mean) / std`` rewritten for raw ``x``."""
    p = np.array(params, dtype=np.float64)
    if kind == "logistic4":  # (z - b3) / |b4| == (x - (mean + std*b3)) / |std*b4|
        p[2], p[3] = mean + std * p[2], std * p[3]
    else:  # b2 (z - b3) == (b2/std) (x - (mean + std*b3)); b4 z + b5 == (b4/std) x + b5 - b4 mean/std
        p[1], p[2], p[3], p[4] = p[1] / std, mean + std * p[2], p[3] / std, p[4] - p[3] * mean / std
    return p


def rise_share(func: Any, params: Sequence[float], x: np.ndarray) -> float:
    """The share of the prediction range [min x, max x] over which the fitted curve makes the central
    90% of its total rise (1.0 for a curve that does not move there)."""
    xs = np.linspace(float(x.min()), float(x.max()), 2001)
    steps = np.abs(np.diff(func(xs, *params)))
    total = float(steps.sum())
    if not math.isfinite(total) or total <= 0.0:
        return 1.0
    cumulative = np.concatenate([[0.0], np.cumsum(steps)]) / total
    lo, hi = np.searchsorted(cumulative, 0.05), np.searchsorted(cumulative, 0.95)
    return float((xs[min(hi, xs.size - 1)] - xs[lo]) / (xs[-1] - xs[0]))


def _paper_params(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, ...] | None, str | None]:
    """The paper's ``fit_function``: one ``curve_fit`` of its logistic from ``[max y, min y, mean x, 0.5]``
    with ``maxfev=100000000``. Its parameters, or None and why when the call raises (or, which the paper's
    code would carry on with as NaN, gives non-finite values)."""
    beta = [np.max(y), np.min(y), np.mean(x), 0.5]
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(paper_logistic, x, y, p0=beta, maxfev=PAPER_MAXFEV)
    except (RuntimeError, ValueError, TypeError, FloatingPointError, np.linalg.LinAlgError) as err:
        return None, f"paper fit_function raised {type(err).__name__} ({str(err).splitlines()[0][:80]})"
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(paper_logistic(x, *params)))):
        return None, "paper fit_function gave non-finite values"
    return tuple(float(p) for p in params), None


def _paper_fallback(x: np.ndarray, y: np.ndarray, reason: str) -> FitResult:
    """Our logistic4 fit (with its own fallbacks) in place of a paper fit that could not be made."""
    ours = fit_logistic(x, y, "logistic4")
    used = ours.kind if ours.fallback is None else f"{ours.kind} ({ours.fallback})"
    return FitResult(ours.kind, ours.params, f"{reason}; used our logistic4 fit: {used}", "paper", ours.init)


def fit_logistic(pred: Any, mos: Any, kind: str = "logistic4") -> FitResult:
    """Fit a mapping from predictions ``pred`` to subjective scores ``mos``.

    ``kind`` is ``logistic4`` (the paper's logistic, fitted robustly), ``logistic5`` (VQEG), ``paper``
    (the paper's ``fit_function`` exactly: see below) or ``none`` (identity).

    ``paper``: one ``curve_fit`` of the paper's logistic from ``[max y, min y, mean x, 0.5]`` with
    ``maxfev=100000000``, whatever it converges to (a step included). Only when that call raises (or gives
    non-finite values) is the ``logistic4`` fit below used instead, with the reason in ``fallback``.
    Initial guesses are tried in order (for logistic4 the paper's ``[max y, min y, mean x, 0.5]``
    first, then ``b4 = std(x)``, then a falling curve, then fits on standardised predictions) and
    the first fit that converges to finite values and is not worse than a straight line is kept. Otherwise (fewer than
    ``MIN_FIT_POINTS`` points, constant predictions, every guess failing) the result is a linear
    least-squares fit, or a constant for constant predictions, with the reason in ``fallback``.
    Never raises for finite input; NaN/inf or mismatched lengths raise ``UserError``.
    """
    if kind not in FIT_KINDS:
        raise UserError(f"unknown fit {kind!r}: choose one of {', '.join(FIT_KINDS)}")
    x, y = _check_pair(pred, mos)
    if kind == "none":
        return FitResult("none", (), None, kind)
    if kind == "paper":
        params, reason = _paper_params(x, y)
        return FitResult("paper", params, None, "paper", "paper") if params is not None else _paper_fallback(x, y, reason)
    if np.ptp(x) == 0.0:
        return _linear_fit(x, y, kind, "constant predictions")
    n_params = 4 if kind == "logistic4" else 5
    min_points = max(MIN_FIT_POINTS, n_params + 1)
    if x.size < min_points:
        return _linear_fit(x, y, kind, f"only {x.size} points (a {kind} fit needs at least {min_points})")

    linear = _linear_fit(x, y, kind, None)
    linear_rmse = _rmse(linear.predict(x), y)
    func = logistic4 if kind == "logistic4" else logistic5
    failures: list[str] = []
    mean, std = float(x.mean()), float(x.std())
    z = (x - mean) / std
    guesses = [(name, p0, False) for name, p0 in _initial_guesses(kind, x, y)]
    # Last resort: fit on standardised predictions (well conditioned whatever their offset and
    # scale), then express the parameters in the raw units.
    guesses += [(f"standardized-{name}", p0, True) for name, p0 in _initial_guesses(kind, z, y)[-2:]]
    for name, p0, standardized in guesses:
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", optimize.OptimizeWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                params, _ = optimize.curve_fit(func, z if standardized else x, y, p0=p0, maxfev=_MAXFEV)
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
            failures.append(f"{name} init: {str(err).splitlines()[0][:80]}")
            continue
        if standardized:
            params = _unstandardize(kind, params, mean, std)
        fitted = func(x, *params)
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fitted))):
            failures.append(f"{name} init: non-finite result")
            continue
        fit_rmse = _rmse(fitted, y)
        if fit_rmse > linear_rmse * (1.0 + _LINEAR_TOLERANCE) + 1e-12 * (1.0 + float(np.abs(y).max())):
            failures.append(f"{name} init: RMSE {fit_rmse:.4g} worse than linear {linear_rmse:.4g}")
            continue
        share = rise_share(func, params, x)
        if share < STEP_SHARE:
            # A step: the curve splits the predictions into two levels, which PLCC would reward as if
            # it were a fit. No other start does better on the same data; fall back at once.
            return FitResult(linear.kind, linear.params, f"{kind} fit is step-like (90% of its rise within "
                             f"{100 * share:.2g}% of the prediction range); used a linear fit", kind)
        return FitResult(kind, tuple(float(p) for p in params), None, kind, name)
    return FitResult(linear.kind, linear.params, f"{kind} fit failed ({'; '.join(failures)}); used a linear fit",
                     kind)


# ----------------------------------------------------------------------------------------------
# Evaluation.

def orient(scores: Any, higher_is_better: bool) -> np.ndarray:
    """Scores turned so that higher means better quality: unchanged for a MOS, negated for a DMOS."""
    array = _as_array(scores, "scores")
    return array if higher_is_better else -array


def _corr(func: Any, x: np.ndarray, y: np.ndarray, undefined: float = 0.0) -> float:
    """A correlation coefficient, `undefined` where it is undefined (constant input, < 2 points)."""
    if x.size < 2 or np.ptp(x) == 0.0 or np.ptp(y) == 0.0:
        return undefined
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        value = float(func(x, y)[0])
    return value if math.isfinite(value) else undefined


@dataclass(frozen=True)
class Evaluation:
    """The metrics of one set of predictions, with the one fitted mapping they were computed after
    (reused for the `fitted` column of predictions.csv and the curve of scatter.png)."""

    metrics: dict[str, Any]
    fit: FitResult
    target: np.ndarray   # the scores the metrics were computed against (negated when sign_flipped)


def assess(pred: Any, mos: Any, higher_is_better: bool = True, fit: str = "logistic4",
           train_higher_is_better: bool | None = None) -> Evaluation:
    """SRCC, KRCC (tau-b), PLCC and RMSE of predictions against subjective scores, and the fit.

    Args:
        pred: model predictions (1-D; list, numpy array or torch tensor).
        mos: the test database's own scores (MOS or DMOS).
        higher_is_better: the test database's score direction (False for a DMOS).
        fit: mapping fitted before PLCC/RMSE: ``logistic4`` (the paper's logistic, fitted robustly),
            ``logistic5``, ``paper`` (the paper's fit_function exactly) or ``none``.
        train_higher_is_better: score direction of the database the model was trained on. When
            given and different from ``higher_is_better`` (cross-database), every metric is
            computed against the negated test score, so that a good model is positive, and
            ``sign_flipped`` is True. When None, the model is taken to regress the test score
            itself and nothing is flipped.

    The metrics dict holds srcc, krcc, plcc, rmse, n, fit (mapping used), fit_requested (the `fit`
    asked for), fit_fallback (reason or None), fit_params (list of floats), sign_flipped (bool).
    Undefined correlations of the whole set (constant predictions or scores) are 0.0, never NaN (per
    distortion type, `by_distortion`, they are NaN). RMSE is in the units of the test score. PLCC is
    taken after the fitted mapping, which can itself turn decreasing, so PLCC is (as usual in
    IQA) non-negative for any monotone relation; SRCC/KRCC keep the sign.

    With ``fit="paper"`` the logistic is fitted to the test database's own scores, as the paper's code
    does; when the scores are flipped, the mapping used is that fit negated (exactly: the same PLCC and
    RMSE as the paper's).
    """
    x, y = _check_pair(pred, mos)
    if fit not in FIT_KINDS:
        raise UserError(f"unknown fit {fit!r}: choose one of {', '.join(FIT_KINDS)}")
    sign_flipped = train_higher_is_better is not None and bool(train_higher_is_better) != bool(higher_is_better)
    target = -y if sign_flipped else y
    if fit == "paper" and sign_flipped:
        params, reason = _paper_params(x, y)
        if params is None:
            result = _paper_fallback(x, target, reason)
        else:  # -(b2 + (b1 - b2) / L) == -b2 + (-b1 + b2) / L, bit for bit
            result = FitResult("paper", (-params[0], -params[1], params[2], params[3]), None, "paper", "paper")
    else:
        result = fit_logistic(x, target, kind=fit)
    fitted = result.predict(x)
    values = {
        "srcc": _corr(stats.spearmanr, x, target),
        "krcc": _corr(stats.kendalltau, x, target),
        "plcc": _corr(stats.pearsonr, fitted, target),
        "rmse": _rmse(fitted, target),
        "n": int(x.size),
        "fit": result.kind,
        "fit_requested": fit,
        "fit_fallback": result.fallback,
        "fit_params": list(result.params),
        "sign_flipped": bool(sign_flipped),
    }
    return Evaluation(values, result, target)


def evaluate(pred: Any, mos: Any, higher_is_better: bool = True, fit: str = "logistic4",
             train_higher_is_better: bool | None = None) -> dict[str, Any]:
    """The metrics dict of `assess` (see there)."""
    return assess(pred, mos, higher_is_better, fit, train_higher_is_better).metrics


# ----------------------------------------------------------------------------------------------
# Fold summaries and tables.

def _label_key(rows: Sequence[dict[str, Any]]) -> str:
    for key in ("fold", "name", "run"):
        if any(key in row for row in rows):
            return key
    return "fold"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


MIN_SUBSET = 3  # images of one distortion type below which its correlations are not computed


def by_distortion(evaluation: Evaluation, pred: Any, distortions: Sequence[str]) -> dict[str, float]:
    """SRCC and PLCC within each distortion type (`srcc_<type>`, `plcc_<type>`), as OIQA papers report them:
    against the same target as the whole set, PLCC after the same fitted mapping (fitted once on the whole
    set). NaN where it is undefined: a type with fewer than MIN_SUBSET images, or whose images all score the
    same (or all get the same prediction, or the same fitted value)."""
    x = _as_array(pred, "predictions")
    fitted = np.asarray(evaluation.fit.predict(x), dtype=np.float64)
    target = np.asarray(evaluation.target, dtype=np.float64)
    kinds = np.asarray([str(d) for d in distortions])
    out: dict[str, float] = {}
    for kind in sorted(set(kinds)):
        name = distortion_column(kind)
        keep = kinds == kind
        if keep.sum() < MIN_SUBSET:
            out[f"srcc_{name}"] = out[f"plcc_{name}"] = float("nan")
            continue
        out[f"srcc_{name}"] = _corr(stats.spearmanr, x[keep], target[keep], undefined=float("nan"))
        out[f"plcc_{name}"] = _corr(stats.pearsonr, fitted[keep], target[keep], undefined=float("nan"))
    return out


def distortion_column(kind: str) -> str:
    """A distortion type as a column-name suffix (`JPEG compression` -> `JPEG_compression`)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", str(kind)).strip("_") or "unnamed"


def summarize(rows: Iterable[dict[str, Any]], keys: Sequence[str] = METRIC_KEYS,
              counted: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per-fold rows followed by ``mean``, ``std`` and ``median`` rows over the folds.

    The label goes in the rows' ``fold`` column (or ``name``/``run`` when that is what the rows
    use). ``std`` is the sample standard deviation (``ddof=1``), NaN with a single fold. Rows
    already labelled mean/std/median are dropped and recomputed, so summarising twice is harmless.
    Non-numeric, missing or undefined (NaN) values are skipped, so that each statistic is over the folds
    that have the metric; a metric absent from every row is left out. For each key in ``counted`` the
    summary rows also hold ``folds_<key>``, the number of folds it is over (0 when none has it; the
    statistics are then NaN).
    """
    rows = list(rows)
    label = _label_key(rows)
    folds = [dict(row) for row in rows if str(row.get(label)) not in SUMMARY_LABELS]
    stats_rows = {name: {label: name} for name in SUMMARY_LABELS}
    for key in keys:
        values = np.array([v for v in (_number(row.get(key)) for row in folds) if v is not None])
        if key in counted:
            for name in SUMMARY_LABELS:
                stats_rows[name][f"folds_{key}"] = int(values.size)
                stats_rows[name].setdefault(key, float("nan"))
        if values.size == 0:
            continue
        stats_rows["mean"][key] = float(values.mean())
        stats_rows["std"][key] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
        stats_rows["median"][key] = float(np.median(values))
    return folds + [stats_rows[name] for name in SUMMARY_LABELS]


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def mean_text(value: Any, count: int, total: int, digits: int = 3) -> str:
    """A mean over `count` of `total` folds: ``0.812``, ``0.812 (3 of 5 folds)`` when some folds lack the
    metric, ``n/a (0 of 5 folds)`` when none has it."""
    text = _cell(float("nan") if value is None else float(value), digits)
    return text if count == total else f"{text} ({count} of {total} folds)"


def format_results_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                         digits: int = 4) -> str:
    """A plain-text, column-aligned table of result rows (e.g. ``summarize(...)``'s output).

    Default columns: the label column (fold/name/run), srcc, krcc, plcc, rmse, then n, as far as
    the rows have them. A rule separates per-fold rows from mean/std/median rows.
    """
    rows = list(rows)
    if not rows:
        return "(no results)"
    if columns is None:
        label = _label_key(rows)
        wanted = [label, *METRIC_KEYS, "n"]
        columns = [c for c in wanted if any(c in row for row in rows)]
    header = [str(c) for c in columns]
    body = [[_cell(row.get(c), digits) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(width) if i else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule]
    label = columns[0] if columns else None
    for i, (row, cells) in enumerate(zip(rows, body)):
        is_summary = label is not None and str(row.get(label)) in SUMMARY_LABELS
        previous_summary = i > 0 and label is not None and str(rows[i - 1].get(label)) in SUMMARY_LABELS
        if is_summary and i > 0 and not previous_summary:
            out.append(rule)
        out.append(line(cells))
    return "\n".join(out)
