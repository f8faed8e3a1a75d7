"""Tests of metrics.py: agreement with scipy, the logistic fit and its fallbacks, summaries."""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdoiqa import metrics
from kdoiqa.common import UserError
from kdoiqa.metrics import (
    evaluate,
    fit_logistic,
    format_results_table,
    logistic4,
    logistic5,
    orient,
    summarize,
)

PRED = np.array([0.12, 0.35, 0.2, 0.8, 0.55, 0.61, 0.9, 0.05, 0.47, 0.7, 0.33, 0.66])
MOS = np.array([20.0, 41.0, 30.0, 77.0, 52.0, 66.0, 80.0, 15.0, 40.0, 69.0, 45.0, 60.0])


def test_metrics_agree_with_scipy() -> None:
    result = evaluate(PRED, MOS)
    fit = fit_logistic(PRED, MOS)
    fitted = fit.predict(PRED)
    assert result["srcc"] == pytest.approx(stats.spearmanr(PRED, MOS)[0], abs=1e-6)
    assert result["krcc"] == pytest.approx(stats.kendalltau(PRED, MOS)[0], abs=1e-6)
    assert result["plcc"] == pytest.approx(stats.pearsonr(fitted, MOS)[0], abs=1e-6)
    assert result["rmse"] == pytest.approx(math.sqrt(np.mean((fitted - MOS) ** 2)), abs=1e-6)
    assert result["n"] == PRED.size and result["fit"] == "logistic4" and result["fit_fallback"] is None
    assert result["fit_params"] == pytest.approx(list(fit.params)) and result["sign_flipped"] is False
    # With ties, KRCC is tau-b.
    tied = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 4.0])
    y = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 4.0])
    assert evaluate(tied, y, fit="none")["krcc"] == pytest.approx(stats.kendalltau(tied, y, variant="b")[0], abs=1e-6)
    # fit="none": PLCC and RMSE on the raw predictions.
    raw = evaluate(PRED * 100, MOS, fit="none")
    assert raw["plcc"] == pytest.approx(stats.pearsonr(PRED, MOS)[0], abs=1e-6)
    assert raw["rmse"] == pytest.approx(math.sqrt(np.mean((PRED * 100 - MOS) ** 2)), abs=1e-6)


def test_logistic_functions_by_hand() -> None:
    # b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) at x = b3 is the midpoint; b4's sign is ignored.
    assert logistic4(0.5, 90.0, 10.0, 0.5, 0.1) == pytest.approx(50.0)
    assert logistic4(0.7, 90.0, 10.0, 0.5, -0.1) == pytest.approx(10 + 80 / (1 + math.exp(-2.0)))
    assert logistic5(2.0, 4.0, 1.0, 1.0, 0.5, 3.0) == pytest.approx(4 * (0.5 - 1 / (1 + math.e)) + 1.0 + 3.0)
    assert np.all(np.isfinite(logistic4(np.array([-1e6, 1e6]), 1.0, 0.0, 0.0, 1e-3)))  # no overflow


def test_fit_recovers_noise_free_logistic_parameters() -> None:
    truth = (90.0, 10.0, 0.5, 0.15)
    x = np.linspace(0.0, 1.0, 60)
    y = logistic4(x, *truth)
    fit = fit_logistic(x, y)
    assert fit.kind == "logistic4" and fit.fallback is None and fit.init == "paper"
    b1, b2, b3, b4 = fit.params
    assert (b1, b2, b3, abs(b4)) == pytest.approx(truth, rel=1e-5)
    result = evaluate(x, y)
    assert result["plcc"] == pytest.approx(1.0, abs=1e-9)
    assert result["rmse"] == pytest.approx(0.0, abs=1e-6)


def test_fit_on_noisy_monotone_data() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 1.0, 150)
    y = logistic4(x, 80.0, 20.0, 0.4, 0.1) + rng.normal(0.0, 3.0, x.size)
    fit = fit_logistic(x, y)
    assert fit.kind == "logistic4" and fit.fallback is None
    fitted_rmse = math.sqrt(np.mean((fit.predict(x) - y) ** 2))
    slope, intercept = np.polyfit(x, y, 1)
    assert fitted_rmse < math.sqrt(np.mean((slope * x + intercept - y) ** 2))
    assert fitted_rmse == pytest.approx(3.0, rel=0.2)
    result = evaluate(x, y)
    assert result["plcc"] > 0.95 and result["srcc"] > 0.9
    five = evaluate(x, y, fit="logistic5")
    assert five["fit"] == "logistic5" and five["plcc"] > 0.95


@pytest.mark.parametrize("kind", ["logistic4", "logistic5"])
def test_edge_cases_never_raise(kind: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy noise either
        const = evaluate(np.full(10, 3.3), MOS[:10], fit=kind)
        assert (const["srcc"], const["krcc"], const["plcc"]) == (0.0, 0.0, 0.0)
        assert const["fit"] == "constant" and "constant" in const["fit_fallback"]
        assert const["rmse"] == pytest.approx(np.std(MOS[:10]))
        three = evaluate([0.1, 0.5, 0.3], [10.0, 50.0, 40.0], fit=kind)
        assert three["fit"] == "linear" and "3 points" in three["fit_fallback"]
        assert three["srcc"] == pytest.approx(1.0)
        one = evaluate([0.4], [50.0], fit=kind)
        assert one["srcc"] == 0.0 and one["rmse"] == 0.0
        flat_mos = evaluate(PRED, np.full(PRED.size, 50.0), fit=kind)
        assert flat_mos["srcc"] == 0.0 and flat_mos["plcc"] == 0.0
        for offset, scale in ((1e4, 1.0), (1e6, 1e4), (1e4, 1e-4)):
            big = evaluate(PRED * scale + offset, MOS, fit=kind)
            assert all(math.isfinite(big[k]) for k in ("srcc", "krcc", "plcc", "rmse"))
            assert big["srcc"] == pytest.approx(stats.spearmanr(PRED, MOS)[0])
            assert big["plcc"] > 0.9


def test_huge_scale_uses_a_data_scaled_start_not_a_stuck_paper_fit() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.0, 100)
    y = logistic4(x, 90.0, 10.0, 0.5, 0.15) + rng.normal(0.0, 2.0, x.size)
    reference = fit_logistic(x, y)
    shifted = fit_logistic(x * 1e4 + 1e6, y)
    assert shifted.kind == "logistic4" and shifted.fallback is None and shifted.init != "paper"
    np.testing.assert_allclose(shifted.predict(x * 1e4 + 1e6), reference.predict(x), atol=1e-3)


def test_degenerate_fit_falls_back_to_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev")

    monkeypatch.setattr(metrics.optimize, "curve_fit", broken)
    fit = fit_logistic(PRED, MOS)
    assert fit.kind == "linear" and "maxfev" in fit.fallback
    slope, intercept = np.polyfit(PRED, MOS, 1)
    assert fit.params == pytest.approx((slope, intercept))
    result = evaluate(PRED, MOS)
    assert result["plcc"] == pytest.approx(stats.pearsonr(PRED, MOS)[0], abs=1e-6)


def test_non_finite_and_mismatched_input_is_a_user_error() -> None:
    with pytest.raises(UserError, match="NaN"):
        evaluate([0.1, float("nan"), 0.3], [1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="NaN or inf"):
        evaluate([0.1, 0.2, 0.3], [1.0, float("inf"), 3.0])
    with pytest.raises(UserError):
        fit_logistic([0.1, 0.2], [1.0, 2.0, 3.0])
    with pytest.raises(UserError):
        evaluate([], [])
    with pytest.raises(UserError):
        evaluate(PRED, MOS, fit="cubic")


def test_dmos_sign_convention() -> None:
    dmos = 100.0 - MOS  # a DMOS database: lower is better
    # A model trained on this DMOS database regresses the DMOS: positive correlations, no flip.
    own = evaluate(-PRED, dmos, higher_is_better=False)
    assert own["sign_flipped"] is False and own["srcc"] > 0.9 and own["plcc"] > 0.9
    assert evaluate(-PRED, dmos, higher_is_better=False, train_higher_is_better=False)["sign_flipped"] is False
    # A MOS-trained model tested on the DMOS database: correlations against -DMOS, flipped.
    cross = evaluate(PRED, dmos, higher_is_better=False, train_higher_is_better=True)
    plain = evaluate(PRED, MOS)
    assert cross["sign_flipped"] is True
    for key in ("srcc", "krcc", "plcc", "rmse"):
        assert cross[key] == pytest.approx(plain[key], rel=1e-4)  # same fit up to optimiser tolerance
    # And the reverse: a DMOS-trained model tested on a MOS database.
    reverse = evaluate(-PRED, MOS, higher_is_better=True, train_higher_is_better=False)
    assert reverse["sign_flipped"] is True and reverse["srcc"] == pytest.approx(plain["srcc"])
    np.testing.assert_array_equal(orient(dmos, higher_is_better=False), -dmos)
    np.testing.assert_array_equal(orient(MOS, higher_is_better=True), MOS)


def test_summarize_and_table() -> None:
    rows = [{"fold": k + 1, "srcc": s, "krcc": 0.7, "plcc": 0.9, "rmse": r, "n": 10}
            for k, (s, r) in enumerate([(0.9, 5.0), (0.8, 6.0), (0.95, 4.0)])]
    summary = summarize(rows)
    assert [row["fold"] for row in summary] == [1, 2, 3, "mean", "std", "median"]
    assert summary[3]["srcc"] == pytest.approx(np.mean([0.9, 0.8, 0.95]))
    assert summary[4]["srcc"] == pytest.approx(np.std([0.9, 0.8, 0.95], ddof=1))
    assert summary[5]["rmse"] == pytest.approx(5.0)
    assert summarize(summary) == summary  # summarising twice is harmless
    assert math.isnan(summarize(rows[:1])[2]["srcc"])  # sample std of one fold is undefined
    table = format_results_table(summary)
    lines = table.splitlines()
    assert lines[0].split() == ["fold", "srcc", "krcc", "plcc", "rmse", "n"]
    assert any(line.startswith("mean") and "0.8833" in line for line in lines)
    assert format_results_table(summarize(rows[:1])).count("n/a") == 4


# ----------------------------------------------------------------------------------------------
# Against an independent reference: scipy's curve_fit of the paper's logistic from its own start.

def paper_logistic(x, b1, b2, b3, b4):
    with np.errstate(over="ignore"):
        return b2 + (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4)))


def paper_fitted(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """What the paper's fit_function computes: curve_fit from [max y, min y, mean x, 0.5]."""
    from scipy.optimize import curve_fit

    popt, _ = curve_fit(paper_logistic, pred, mos, p0=[mos.max(), mos.min(), pred.mean(), 0.5], maxfev=100000)
    return paper_logistic(pred, *popt)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plcc_and_rmse_equal_the_papers_fit(seed):
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0.0, 1.0, 60)
    mos = paper_logistic(pred, 80.0, 20.0, 0.5, 0.12) + rng.normal(0.0, 3.0, pred.size)
    fitted = paper_fitted(pred, mos)
    result = evaluate(pred, mos)
    assert result["fit_fallback"] is None and result["fit"] == "logistic4"
    assert result["plcc"] == pytest.approx(stats.pearsonr(fitted, mos)[0], abs=1e-6)
    assert result["rmse"] == pytest.approx(float(np.sqrt(np.mean((fitted - mos) ** 2))), rel=1e-5)
    assert result["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)


def test_no_fallback_on_well_posed_data_and_rescaling_changes_nothing():
    fit = fit_logistic(PRED, MOS)
    assert fit.kind == "logistic4" and fit.fallback is None and fit.init == "paper"
    base = evaluate(PRED, MOS)
    for scale, offset in ((1e3, 5.0), (1e-3, -2.0), (50.0, 1e4)):
        rescaled = evaluate(PRED * scale + offset, MOS)
        assert rescaled["fit_fallback"] is None
        for key in ("srcc", "krcc", "plcc", "rmse"):
            assert rescaled[key] == pytest.approx(base[key], rel=1e-4), (scale, offset, key)


def test_what_each_fallback_returns(monkeypatch):
    # Constant predictions: a constant at the mean score; PLCC is undefined (0), RMSE the score's std.
    flat = fit_logistic(np.full(8, 0.3), MOS[:8])
    assert flat.kind == "constant" and flat.params == pytest.approx((MOS[:8].mean(),))
    assert flat.fallback == "constant predictions"
    # Too few points for four parameters: the least-squares line.
    few = fit_logistic(PRED[:4], MOS[:4])
    assert few.kind == "linear" and "only 4 points" in few.fallback
    assert few.params == pytest.approx(tuple(np.polyfit(PRED[:4], MOS[:4], 1)))
    # Every start worse than a line: the line, with each start's reason.
    monkeypatch.setattr(metrics.optimize, "curve_fit", lambda f, x, y, p0, maxfev: (np.asarray(p0), None))
    worse = fit_logistic(PRED, MOS)
    assert worse.kind == "linear" and worse.fallback.count("worse than linear") >= 3
    assert worse.params == pytest.approx(tuple(np.polyfit(PRED, MOS, 1)))
    assert evaluate(PRED, MOS)["plcc"] == pytest.approx(stats.pearsonr(PRED, MOS)[0], abs=1e-9)


def test_a_step_like_fit_is_degenerate():
    """Scores at two levels split at one prediction: the logistic turns into a step there (a two-level
    fit PLCC would reward); it is treated as degenerate, the line is used, and the reason recorded."""
    rng = np.random.default_rng(5)
    pred = np.sort(rng.uniform(0.0, 1.0, 60))
    mos = np.where(pred < 0.5, 30.0, 60.0) + rng.normal(0.0, 1.0, pred.size)
    fit = fit_logistic(pred, mos)
    assert fit.kind == "linear" and "step-like" in fit.fallback
    assert fit.params == pytest.approx(tuple(np.polyfit(pred, mos, 1)))
    result = evaluate(pred, mos)
    assert result["fit_fallback"] == fit.fallback
    assert result["plcc"] == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-9)
    # The share of the prediction range over which a curve makes the central 90% of its rise there, by hand:
    # the logistic 1 / (1 + exp(-(x - 0.5) / 0.1)) over [0, 1] goes from a = f(0) to b = f(1); invert it at
    # a + 0.05 (b - a) and a + 0.95 (b - a).
    f = lambda x: 1 / (1 + math.exp(-(x - 0.5) / 0.1))  # noqa: E731
    inverse = lambda v: 0.5 + 0.1 * math.log(v / (1 - v))  # noqa: E731
    a, b = f(0.0), f(1.0)
    by_hand = inverse(a + 0.95 * (b - a)) - inverse(a + 0.05 * (b - a))
    x = np.linspace(0.0, 1.0, 50)
    assert metrics.rise_share(logistic4, (1.0, 0.0, 0.5, 0.1), x) == pytest.approx(by_hand, abs=1e-3)


def test_the_fit_is_computed_once_and_reused():
    evaluation = metrics.assess(PRED, MOS)
    fitted = evaluation.fit.predict(PRED)
    assert evaluation.metrics["plcc"] == pytest.approx(stats.pearsonr(fitted, MOS)[0], abs=1e-12)
    assert evaluation.metrics["fit_params"] == list(evaluation.fit.params)
    flipped = metrics.assess(PRED, 100 - MOS, higher_is_better=False, train_higher_is_better=True)
    np.testing.assert_array_equal(flipped.target, MOS - 100)


# ----------------------------------------------------------------------------------------------
# --fit paper: the paper's fit_function exactly. Transcribed here from mask_train.py of
# github.com/Aca4peop/KD-OIQA (the same function in every one of its training scripts): its logistic,
# its start, its maxfev, the fit used as it comes; PLCC and RMSE as its evaluation computes them.

def their_logistic_func(X, bayta1, bayta2, bayta3, bayta4):
    logisticPart = 1 + np.exp(np.negative(np.divide(X - bayta3, np.abs(bayta4))))
    yhat = bayta2 + np.divide(bayta1 - bayta2, logisticPart)
    return yhat


def their_fit_function(y_label, y_output):
    from scipy.optimize import curve_fit

    beta = [np.max(y_label), np.min(y_label), np.mean(y_output), 0.5]
    popt, _ = curve_fit(their_logistic_func, y_output, y_label, p0=beta, maxfev=100000000)
    y_output_logistic = their_logistic_func(y_output, *popt)
    return y_output_logistic, popt  # (popt returned as well, for the tests)


def their_plcc_rmse(label, y_output):
    """(PLCC, RMSE, fitted, popt) as the paper's evaluation computes them; None where its curve_fit raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            y_output_logistic, popt = their_fit_function(label, y_output)
        except (RuntimeError, TypeError, ValueError):
            return None
        val_PLCC = stats.pearsonr(y_output_logistic, label)[0]
    val_RMSE = np.sqrt(((y_output_logistic - label) ** 2).mean())
    return val_PLCC, val_RMSE, y_output_logistic, popt


def random_prediction_sets(count: int = 30):
    """Prediction sets of the sizes of the paper's test folds (OIQA 60, CVIQ 102, IQA-ODI 216), from
    predictors that barely track the score to ones that track it closely, at the scales a network's
    outputs take; a few falling, and two-level scores that the logistic turns into a step."""
    rng = np.random.default_rng(2023)
    for i in range(count):
        n = (60, 102, 216)[i % 3]
        mos = rng.uniform(20.0, 80.0, n)
        strength = rng.uniform(0.0, 3.0) if i % 2 else rng.uniform(3.0, 20.0)  # weak, then strong
        if i % 10 == 9:
            mos = np.where(rng.random(n) < 0.5, 30.0, 60.0) + rng.normal(0.0, 1.0, n)
        sign = -1.0 if i % 7 == 6 else 1.0
        pred = sign * mos / 60.0 * strength + rng.normal(0.0, 1.0, n) + rng.uniform(-5.0, 50.0)
        yield pred, mos


def test_fit_paper_is_the_papers_fit_function():
    """Equal to 1e-9 wherever the paper's fit converges to a curve. Where it converges to a step (the
    logistic's 5-95% rise, 2 ln(19) |b4| wide, spans under 5% of the predictions' range), the paper's
    own call is not reproducible that far: the same call on the same arrays, repeated in one process,
    gives RMSE 14.0793352 or 14.0793395 on the tenth set (its b2 49.8198 or 49.8086), depending on the
    state of memory; there the figures agree to 1e-5."""
    converged = steps = differs_from_ours = 0
    for pred, mos in random_prediction_sets():
        theirs = their_plcc_rmse(mos, pred)
        if theirs is None:
            continue
        converged += 1
        plcc, rmse, fitted, popt = theirs
        step = 2 * math.log(19) * abs(popt[3]) < 0.05 * np.ptp(pred)
        steps += step
        tolerance = 1e-5 if step else 1e-9
        evaluation = metrics.assess(pred, mos, fit="paper")
        result = evaluation.metrics
        assert result["fit"] == "paper" and result["fit_fallback"] is None
        assert result["plcc"] == pytest.approx(plcc, abs=tolerance)
        assert result["rmse"] == pytest.approx(rmse, abs=tolerance)
        if not step:  # the fitted column of predictions.csv
            np.testing.assert_allclose(evaluation.fit.predict(pred), fitted, rtol=0, atol=1e-9)
        assert result["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
        differs_from_ours += abs(evaluate(pred, mos)["plcc"] - plcc) > 1e-6
    assert converged >= 25 and steps <= 5
    assert differs_from_ours >= 3  # the sets reach the regime where our fallbacks change the figure


def test_fit_paper_flipped_fits_the_test_databases_own_scores():
    """A MOS-trained model tested on a DMOS database: the paper's code fits its logistic to the DMOS as
    it is; the metrics, taken against the negated DMOS, are its PLCC and RMSE."""
    rng = np.random.default_rng(7)
    mos = rng.uniform(20.0, 80.0, 102)
    dmos = 100.0 - mos
    pred = mos / 60.0 * 1.5 + rng.normal(0.0, 1.0, mos.size)
    plcc, rmse, _, _ = their_plcc_rmse(dmos, pred)
    result = evaluate(pred, dmos, higher_is_better=False, fit="paper", train_higher_is_better=True)
    assert result["sign_flipped"] is True and result["fit"] == "paper"
    assert result["plcc"] == pytest.approx(plcc, abs=1e-9) and result["rmse"] == pytest.approx(rmse, abs=1e-9)
    assert result["srcc"] == pytest.approx(-stats.spearmanr(pred, dmos)[0], abs=1e-12)


def test_fit_paper_falls_back_only_when_curve_fit_raises(monkeypatch):
    # Three points for four parameters: the paper's curve_fit raises, and the metrics say so.
    pred, mos = np.array([0.1, 0.5, 0.3]), np.array([10.0, 50.0, 40.0])
    with pytest.raises(TypeError):
        their_fit_function(mos, pred)
    few = evaluate(pred, mos, fit="paper")
    assert few["fit"] == "linear" and "paper fit_function raised TypeError" in few["fit_fallback"]
    assert few["fit_params"] == pytest.approx(list(np.polyfit(pred, mos, 1)))
    # A step is used as it comes (our default would take a line instead).
    rng = np.random.default_rng(5)
    step_pred = np.sort(rng.uniform(0.0, 1.0, 60))
    step_mos = np.where(step_pred < 0.5, 30.0, 60.0) + rng.normal(0.0, 1.0, step_pred.size)
    plcc, rmse, _, popt = their_plcc_rmse(step_mos, step_pred)
    assert 2 * math.log(19) * abs(popt[3]) < 0.05 * np.ptp(step_pred)  # theirs is a step
    step = evaluate(step_pred, step_mos, fit="paper")
    assert step["fit"] == "paper" and step["fit_fallback"] is None
    assert step["plcc"] == pytest.approx(plcc, abs=1e-5) and step["rmse"] == pytest.approx(rmse, abs=1e-5)
    assert "step-like" in evaluate(step_pred, step_mos)["fit_fallback"]
    # The paper's curve_fit raising (its maxfev reached): our logistic4 fit with its own fallbacks.
    real = metrics.optimize.curve_fit

    def paper_call_raises(*args, **kwargs):
        if kwargs.get("maxfev") == 100000000:
            raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev = 100000000.")
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics.optimize, "curve_fit", paper_call_raises)
    fallback = evaluate(PRED, MOS, fit="paper")
    ours = evaluate(PRED, MOS, fit="logistic4")
    assert fallback["fit"] == "logistic4" and fallback["fit_params"] == pytest.approx(ours["fit_params"])
    assert fallback["fit_fallback"].startswith("paper fit_function raised RuntimeError")
    assert fallback["plcc"] == ours["plcc"] and fallback["fit_requested"] == "paper"


# ----------------------------------------------------------------------------------------------
# Per-distortion metrics: undefined is NaN, left out of means, with the count of folds that have it.

def test_an_undefined_per_distortion_correlation_is_nan():
    rng = np.random.default_rng(11)
    pred = rng.uniform(0.0, 1.0, 12)
    mos = 20.0 + 60.0 * pred + rng.normal(0.0, 5.0, 12)
    kinds = ["jpeg"] * 4 + ["reference"] * 4 + ["flat"] * 3 + ["single"]
    mos[4:8] = 90.0      # every reference scores the same (as a DMOS's references all score 0)
    pred[8:11] = 0.42    # the model gives every "flat" image the same score
    evaluation = metrics.assess(pred, mos)
    values = metrics.by_distortion(evaluation, pred, kinds)
    for key in ("srcc_reference", "plcc_reference", "srcc_flat", "plcc_flat", "srcc_single", "plcc_single"):
        assert math.isnan(values[key]), key
    assert values["srcc_jpeg"] == pytest.approx(stats.spearmanr(pred[:4], mos[:4])[0], abs=1e-12)
    fitted = evaluation.fit.predict(pred)
    assert values["plcc_jpeg"] == pytest.approx(stats.pearsonr(fitted[:4], mos[:4])[0], abs=1e-12)


def test_summaries_leave_undefined_folds_out_and_count_the_rest():
    nan = float("nan")
    rows = [{"fold": k, "srcc": 0.9, "srcc_blur": b, "srcc_reference": nan} for k, b in enumerate([0.8, nan, 0.6])]
    summary = summarize(rows, keys=["srcc", "srcc_blur", "srcc_reference"], counted=["srcc_blur", "srcc_reference"])
    mean, std, median = summary[3:]
    assert mean["srcc_blur"] == pytest.approx(0.7) and median["srcc_blur"] == pytest.approx(0.7)
    assert std["srcc_blur"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert all(row["folds_srcc_blur"] == 2 and row["folds_srcc_reference"] == 0 for row in (mean, std, median))
    assert math.isnan(mean["srcc_reference"]) and "folds_srcc" not in mean
    assert [metrics.mean_text(v, c, 3) for v, c in ((0.7, 2), (0.9, 3), (nan, 0))] == \
        ["0.700 (2 of 3 folds)", "0.900", "n/a (0 of 3 folds)"]
