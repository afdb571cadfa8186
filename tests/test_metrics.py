"""Metrics against independent values: hand-worked cases, scipy.stats, and a brute-force tau-b."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from loda_cli import metrics
from loda_cli.errors import LodaError, MetricError
from loda_cli.metrics import (
    FitResult,
    MetricWarning,
    evaluate,
    fit_logistic,
    krcc,
    logistic4,
    plcc,
    rmse,
    srcc,
)


def _tau_b_brute_force(x, y):
    """Kendall's tau-b from its definition, over all pairs (independent of scipy)."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx = np.sign(x[i] - x[j])
        dy = np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx == dy:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / math.sqrt(
        (concordant + discordant + ties_x) * (concordant + discordant + ties_y)
    )


# --- hand-made cases --------------------------------------------------------------------------


def test_perfect_monotonic_nonlinear_gives_rank_correlations_of_one():
    x = np.array([0.1, 0.5, 0.7, 2.0, 9.0])
    y = x**3 + 4  # monotonic, far from linear
    assert srcc(x, y) == pytest.approx(1.0)
    assert krcc(x, y) == pytest.approx(1.0)


def test_reversed_order_gives_minus_one():
    x = [1, 2, 3, 4, 5, 6]
    y = [60, 50, 40, 30, 20, 10]
    assert srcc(x, y) == pytest.approx(-1.0)
    assert krcc(x, y) == pytest.approx(-1.0)
    assert plcc(x, y, fit=False) == pytest.approx(-1.0)


def test_srcc_with_ties_matches_hand_computation():
    # ranks of x: [1, 2.5, 2.5, 4]; ranks of y: [1, 2, 3, 4]
    x = [1, 2, 2, 3]
    y = [10, 20, 30, 40]
    rx = np.array([1, 2.5, 2.5, 4]) - 2.5
    ry = np.array([1, 2, 3, 4]) - 2.5
    expected = float(rx @ ry / math.sqrt((rx @ rx) * (ry @ ry)))
    assert srcc(x, y) == pytest.approx(expected)
    assert expected == pytest.approx(0.9486832980505138)


def test_krcc_with_ties_matches_hand_computation():
    # Pairs of (x, y) = (1,10) (2,20) (2,30) (3,40): 5 concordant, 0 discordant, 1 tie in x.
    # tau-b = 5 / sqrt((5 + 1) * 5)
    assert krcc([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(5 / math.sqrt(30))


def test_small_example_against_textbook_values():
    # Worked example: x and y with one swapped pair among five.
    x = [1, 2, 3, 4, 5]
    y = [1, 3, 2, 4, 5]
    # d = [0, 1, 1, 0, 0] -> rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert srcc(x, y) == pytest.approx(0.9)
    # 9 concordant, 1 discordant of 10 pairs -> tau = 0.8
    assert krcc(x, y) == pytest.approx(0.8)


# --- against scipy and brute force ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_against_scipy_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 15, size=60).astype(float)  # many ties
    y = 0.3 * x + rng.normal(size=60)
    assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert krcc(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert krcc(x, y) == pytest.approx(_tau_b_brute_force(x, y), abs=1e-12)
    assert plcc(x, y, fit=False) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
            st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
        ),
        min_size=3,
        max_size=40,
    )
)
def test_rank_correlations_match_scipy_property(pairs):
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, k = srcc(x, y), krcc(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        assert s == 0.0 and k == 0.0
        return
    assert s == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-9)
    assert k == pytest.approx(_tau_b_brute_force(x, y), abs=1e-9)
    assert -1.0 <= s <= 1.0 and -1.0 <= k <= 1.0


def test_plcc_without_fit_is_pearson_and_scale_invariant():
    rng = np.random.default_rng(7)
    x = rng.normal(size=100)
    y = 2 * x + rng.normal(size=100)
    r = stats.pearsonr(x, y).statistic
    assert plcc(x, y, fit=False) == pytest.approx(r, abs=1e-12)
    assert plcc(1e6 * x + 3, y, fit=False) == pytest.approx(r, abs=1e-9)
    assert rmse(x, y, fit=False) == pytest.approx(np.sqrt(np.mean((x - y) ** 2)))


# --- the logistic fit -------------------------------------------------------------------------


def test_logistic4_formula_by_hand():
    b1, b2, b3, b4 = 5.0, 1.0, 0.2, -0.3  # |b4| is used, so the sign of b4 is irrelevant
    x = np.array([0.2, 0.5, -1.0])
    expected = b2 + (b1 - b2) / (1 + np.exp(-(x - b3) / abs(b4)))
    np.testing.assert_allclose(logistic4(x, b1, b2, b3, b4), expected)
    assert logistic4(0.2, b1, b2, b3, b4) == pytest.approx(3.0)  # midpoint
    # Saturates without overflow warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert logistic4(-1e6, b1, b2, b3, b4) == pytest.approx(b2)
        assert logistic4(1e6, b1, b2, b3, b4) == pytest.approx(b1)


def test_fit_recovers_known_logistic():
    rng = np.random.default_rng(3407)
    true = (4.5, 1.2, 0.1, 0.25)
    x = rng.uniform(-1, 1, size=400)
    y = logistic4(x, *true) + rng.normal(scale=1e-3, size=x.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricWarning)
        result = fit_logistic(x, y)
    assert result.method == "logistic4" and result.converged and result.message == ""
    b1, b2, b3, b4 = result.params
    assert (b1, b2, b3, abs(b4)) == pytest.approx(true, abs=5e-3)
    assert plcc(x, y) == pytest.approx(1.0, abs=1e-5)
    assert rmse(x, y) == pytest.approx(1e-3, rel=0.2)
    # The nonlinear map makes raw Pearson clearly worse than the fitted PLCC.
    assert plcc(x, y, fit=False) < plcc(x, y) - 0.01


def test_fit_flips_for_lower_is_better_predictions():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=200)
    y = logistic4(-x, 80, 10, 0.0, 0.3) + rng.normal(scale=0.5, size=x.size)
    assert plcc(x, y, fit=False) < 0
    assert plcc(x, y) > 0.99
    assert srcc(x, y) < -0.95


def test_fit_on_another_scale_converges_via_second_start():
    # Predictions on a 0-100 scale: the paper's b4 = 0.5 start is badly scaled.
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 100, size=300)
    y = logistic4(x, 5, 1, 50, 12) + rng.normal(scale=0.01, size=x.size)
    result = fit_logistic(x, y)
    assert result.method == "logistic4"
    assert plcc(x, y) == pytest.approx(1.0, abs=1e-4)


def test_analytic_jacobian_matches_finite_differences():
    x = np.linspace(-2, 2, 31)
    params = np.array([4.0, 1.5, 0.3, -0.4])
    jac = metrics._logistic4_jacobian(x, *params)
    h = 1e-6
    for k in range(4):
        up, down = params.copy(), params.copy()
        up[k] += h
        down[k] -= h
        numeric = (logistic4(x, *up) - logistic4(x, *down)) / (2 * h)
        np.testing.assert_allclose(jac[:, k], numeric, atol=1e-6)


def test_fit_converges_when_mean_prediction_is_almost_zero():
    # Regression: mean(pred) = -7e-17 as the b3 start made finite-difference steps vanish, the
    # covariance singular, and the fit fall back to linear on clean logistic data.
    x = np.linspace(-1, 1, 50)
    assert 0 < abs(x.mean()) < 1e-15
    y = logistic4(x, 3, 1, 0, 0.2) + 0.001 * np.sin(13 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricWarning)
        assert fit_logistic(x, y).method == "logistic4"


def test_fit_result_predict_and_to_dict():
    x = np.linspace(-1, 1, 50)
    y = logistic4(x, 3, 1, 0, 0.2) + 0.001 * np.sin(13 * x)
    result = fit_logistic(x, y)
    np.testing.assert_allclose(result.predict(x), result.fitted)
    d = result.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["method"] == "logistic4" and len(d["params"]) == 4


def test_fit_falls_back_to_linear_when_curve_fit_raises(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: maxfev exceeded")

    monkeypatch.setattr(metrics.optimize, "curve_fit", boom)
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = 2 * x + 1 + np.array([0.1, -0.1, 0.0, 0.1, -0.1])
    with pytest.warns(MetricWarning, match="linear"):
        result = fit_logistic(x, y)
    assert result.method == "linear" and not result.converged
    assert "maxfev" in result.message
    slope, intercept = result.params
    ref_slope, ref_intercept = np.polyfit(x, y, 1)
    assert (slope, intercept) == pytest.approx((ref_slope, ref_intercept))
    with pytest.warns(MetricWarning):
        out = evaluate(x, y)
    assert out["fit_method"] == "linear" and out["fit_converged"] is False
    assert out["plcc"] == pytest.approx(stats.pearsonr(x, y).statistic)


def test_fit_falls_back_on_optimize_warning(monkeypatch):
    real = optimize.curve_fit

    def warns(*args, **kwargs):
        message = "Covariance of the parameters could not be estimated"
        warnings.warn(message, optimize.OptimizeWarning, stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics.optimize, "curve_fit", warns)
    x = np.linspace(0, 1, 20)
    with pytest.warns(MetricWarning, match="degenerate"):
        result = fit_logistic(x, x**2)
    assert result.method == "linear"


def test_fit_falls_back_on_non_finite_parameters(monkeypatch):
    monkeypatch.setattr(
        metrics.optimize, "curve_fit", lambda *a, **k: (np.array([np.nan, 1, 0, 1]), None)
    )
    x = np.linspace(0, 1, 10)
    with pytest.warns(MetricWarning, match="non-finite"):
        assert fit_logistic(x, 3 * x).method == "linear"


def test_pathological_data_never_crashes():
    # Two clusters and a step: the logistic may or may not converge; either way no exception,
    # finite output, and the result says what happened.
    x = np.array([0, 0, 0, 0, 1e-9, 1, 1, 1, 1, 1], dtype=float)
    y = np.array([1, 5, 1, 5, 3, 2, 4, 2, 4, 3], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        out = evaluate(x, y)
    assert out["fit_method"] in ("logistic4", "linear")
    assert all(math.isfinite(out[k]) for k in ("srcc", "plcc", "krcc", "rmse"))


# --- constant inputs --------------------------------------------------------------------------


def test_constant_predictions_give_zero_with_warning():
    x = np.full(10, 0.3)
    y = np.arange(10, dtype=float)
    for fn in (srcc, krcc, lambda a, b: plcc(a, b, fit=False)):
        with pytest.warns(MetricWarning, match="constant"):
            assert fn(x, y) == 0.0
    with pytest.warns(MetricWarning):
        result = fit_logistic(x, y)
    assert result.method == "linear" and result.params == (0.0, pytest.approx(4.5))
    with pytest.warns(MetricWarning):
        out = evaluate(x, y)
    assert out["srcc"] == out["plcc"] == out["krcc"] == 0.0
    assert out["rmse"] == pytest.approx(np.std(y))


def test_constant_labels_give_zero_with_warning():
    with pytest.warns(MetricWarning):
        assert srcc([1, 2, 3], [4, 4, 4]) == 0.0


# --- input validation -------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [srcc, krcc, plcc, rmse, fit_logistic, evaluate])
def test_length_mismatch_raises(fn):
    with pytest.raises(MetricError, match="length"):
        fn([1, 2, 3, 4], [1, 2, 3])


@pytest.mark.parametrize("fn", [srcc, krcc, plcc, rmse, fit_logistic, evaluate])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(fn, bad):
    with pytest.raises(MetricError, match="NaN or infinite"):
        fn([1, 2, bad, 4], [1, 2, 3, 4])
    with pytest.raises(MetricError, match="labels"):
        fn([1, 2, 3, 4], [1, bad, 3, 4])


@pytest.mark.parametrize("fn", [srcc, krcc, plcc, rmse, fit_logistic, evaluate])
def test_too_few_samples_raises(fn):
    with pytest.raises(MetricError, match="at least 3"):
        fn([1, 2], [2, 1])
    with pytest.raises(MetricError):
        fn([], [])


def test_non_numeric_raises_metric_error():
    with pytest.raises(MetricError, match="numeric"):
        srcc(["a", "b", "c"], [1, 2, 3])


def test_metric_error_is_a_loda_error():
    assert issubclass(MetricError, LodaError)
    assert issubclass(MetricWarning, UserWarning)


def test_column_vector_predictions_are_flattened():
    x = np.arange(6, dtype=float).reshape(6, 1)
    assert srcc(x, np.arange(6)) == pytest.approx(1.0)


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_returns_json_ready_dict_with_all_metrics():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 80)
    y = logistic4(x, 5, 1, 0, 0.3) + rng.normal(scale=0.2, size=80)
    out = evaluate(x, y)
    assert set(out) == {
        "n", "srcc", "plcc", "krcc", "rmse",
        "fit_method", "fit_params", "fit_converged", "fit_message",
    }  # fmt: skip
    assert out["n"] == 80
    assert out["srcc"] == pytest.approx(srcc(x, y))
    assert out["krcc"] == pytest.approx(krcc(x, y))
    assert out["plcc"] == pytest.approx(plcc(x, y))
    assert out["rmse"] == pytest.approx(rmse(x, y))
    assert json.loads(json.dumps(out)) == out
    assert isinstance(fit_logistic(x, y), FitResult)


def test_three_samples_fall_back_to_a_line_instead_of_crashing():
    import warnings

    from loda_cli.metrics import MetricWarning, evaluate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate([0.1, 0.2, 0.4], [1.0, 2.0, 3.5])
    assert result["fit_method"] == "linear" and result["n"] == 3
    assert any(issubclass(w.category, MetricWarning) for w in caught)


def test_the_cli_shows_a_metric_warning_as_one_line(capsys, monkeypatch, tmp_path):
    """In a `loda` command, a metric's fallback is a 'warning:' line, not Python's file:line report;
    other warnings stay as Python shows them."""
    from typer.testing import CliRunner

    from loda_cli.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # put back afterwards
    monkeypatch.setenv("LODA_HOME", str(tmp_path))
    assert CliRunner().invoke(main.app, ["weights", "list"]).exit_code == 0
    assert warnings.showwarning is main._show_warning  # every command installs it

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = main._show_warning
        metrics.krcc([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
        warnings.warn("something else", DeprecationWarning)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "warning: KRCC is undefined for a constant input; returning 0.0"
    assert "metrics.py" not in lines[0] and "warning: something else" not in err  # Python's, as before
