"""Correlation metrics of IQA: SRCC, KRCC, PLCC and RMSE after the VQEG logistic fit.

Pure numpy/scipy; no torch. ``train`` and ``benchmark`` call :func:`evaluate`.

Conventions, shared by every function here:

- Inputs are anything ``numpy.asarray`` turns into numbers (lists, arrays, a Bx1 tensor moved to
  numpy). They are flattened, so an ``(N, 1)`` prediction array pairs with an ``(N,)`` label array.
- Unusable inputs raise :class:`~loda_cli.errors.MetricError`: different sizes, NaN or inf,
  non-numeric values, or fewer than :data:`MIN_SAMPLES` samples.
- **Constant inputs.** A correlation with a constant vector is undefined (0/0). Every correlation
  here returns ``0.0`` for it and issues a :class:`MetricWarning`, rather than ``nan``: a model
  that predicts one value for every image has no ranking ability, 0.0 says so, and a ``nan`` would
  poison medians over splits and "best checkpoint" comparisons downstream.
- PLCC and RMSE with ``fit=True`` compare the fitted values ``f(pred)`` with ``mos``, where ``f``
  is the 4-parameter logistic of the VQEG protocol (the paper's). The logistic may be decreasing,
  so a lower-is-better prediction still gives a positive PLCC after the fit. When the fit does not
  converge, a linear fit replaces it, with a :class:`MetricWarning`; that never raises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import optimize, special, stats

from loda_cli.errors import MetricError, MetricWarning

__all__ = [
    "MIN_SAMPLES",
    "FitResult",
    "MetricWarning",
    "evaluate",
    "fit_logistic",
    "krcc",
    "logistic4",
    "plcc",
    "rmse",
    "srcc",
]

MIN_SAMPLES = 3
# The fit has 4 parameters; scipy's default budget (200 * (n + 1)) gives up too early on the
# flat, badly scaled predictions an untrained or half-trained model produces.
MAXFEV = 10_000


@dataclass(frozen=True)
class FitResult:
    """The monotonic map from predictions to labels that PLCC and RMSE are measured after.

    ``method`` is ``"logistic4"`` when the VQEG logistic converged; then ``params`` is
    ``(b1, b2, b3, b4)``. It is ``"linear"`` for the fallback; then ``params`` is
    ``(slope, intercept)``. ``converged`` is False exactly when the fallback was used, and
    ``message`` says why.
    """

    params: tuple[float, ...]
    converged: bool
    method: Literal["logistic4", "linear"]
    message: str = ""
    fitted: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def predict(self, pred: Any) -> np.ndarray:
        """Apply the fitted map to (new) predictions."""
        x = np.asarray(pred, dtype=np.float64).ravel()
        if self.method == "logistic4":
            return logistic4(x, *self.params)
        slope, intercept = self.params
        return slope * x + intercept

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": [float(p) for p in self.params],
            "converged": self.converged,
            "message": self.message,
        }


def logistic4(x: Any, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """``b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))``, the VQEG 4-parameter logistic.

    ``b1`` and ``b2`` are the upper and lower asymptotes, ``b3`` the midpoint and ``|b4|`` the
    scale. Written with ``expit`` so large arguments saturate instead of overflowing.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - b3) / abs(b4)
    return b2 + (b1 - b2) * special.expit(z)


def _logistic4_jacobian(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """Analytic N x 4 Jacobian of :func:`logistic4`.

    Finite differences step relative to each parameter, so a start like ``b3 = mean(pred)``
    that happens to be 1e-17 gets a useless step and a singular covariance. The exact
    derivatives have no such trap.
    """
    scale = abs(b4)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - b3) / scale
        s = special.expit(z)
        slope = (b1 - b2) * s * (1.0 - s)
        d_b3 = -slope / scale
        d_b4 = -slope * z / scale * np.sign(b4)
    return np.column_stack([s, 1.0 - s, d_b3, d_b4])


def _as_pair(pred: Any, mos: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten a (prediction, label) pair into float64 vectors."""
    try:
        x = np.asarray(pred, dtype=np.float64).ravel()
        y = np.asarray(mos, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise MetricError(f"predictions and labels must be numeric: {exc}") from None
    if x.size != y.size:
        raise MetricError(f"predictions and labels differ in length: {x.size} vs {y.size}")
    if x.size < MIN_SAMPLES:
        raise MetricError(f"need at least {MIN_SAMPLES} samples for a correlation, got {x.size}")
    for name, v in (("predictions", x), ("labels", y)):
        bad = ~np.isfinite(v)
        if bad.any():
            raise MetricError(
                f"{name} hold {int(bad.sum())} NaN or infinite values "
                f"(first at index {int(np.flatnonzero(bad)[0])})"
            )
    return x, y


def _is_constant(v: np.ndarray) -> bool:
    return bool(np.ptp(v) == 0.0)


def _pearson(x: np.ndarray, y: np.ndarray, what: str) -> float:
    """Pearson correlation of validated vectors; 0.0 with a warning when undefined."""
    if _is_constant(x) or _is_constant(y):
        warnings.warn(
            f"{what} is undefined for a constant input; returning 0.0",
            MetricWarning,
            stacklevel=3,
        )
        return 0.0
    xc = x - x.mean()
    yc = y - y.mean()
    # Normalising each vector first keeps the products in range for any input scale.
    xc /= np.linalg.norm(xc)
    yc /= np.linalg.norm(yc)
    return float(np.clip(np.dot(xc, yc), -1.0, 1.0))


def srcc(pred: Any, mos: Any) -> float:
    """Spearman rank correlation: Pearson's r of the ranks, ties given their average rank.

    Returns 0.0 with a :class:`MetricWarning` when either input is constant.
    """
    x, y = _as_pair(pred, mos)
    return _srcc(x, y)


def _srcc(x: np.ndarray, y: np.ndarray) -> float:
    return _pearson(stats.rankdata(x), stats.rankdata(y), "SRCC")


def krcc(pred: Any, mos: Any) -> float:
    """Kendall rank correlation, tau-b (ties in either input reduce the denominator).

    Returns 0.0 with a :class:`MetricWarning` when either input is constant.
    """
    x, y = _as_pair(pred, mos)
    return _krcc(x, y)


def _krcc(x: np.ndarray, y: np.ndarray) -> float:
    if _is_constant(x) or _is_constant(y):
        warnings.warn("KRCC is undefined for a constant input; returning 0.0", MetricWarning, 3)
        return 0.0
    # scipy's O(n log n) tau-b; a pairwise version would need n^2 memory for FLIVE's 40k images.
    tau = stats.kendalltau(x, y, variant="b").statistic
    return float(tau)


def fit_logistic(pred: Any, mos: Any) -> FitResult:
    """Fit the VQEG 4-parameter logistic from predictions to labels.

    The initial values are the paper's ``[max(mos), min(mos), mean(pred), 0.5]``. ``0.5`` suits
    LoDa's raw cosine scores in [-1, 1]; if that start does not converge (a model whose outputs
    live on another scale), one more start with ``b4 = std(pred)`` is tried.

    A fit that raises, warns ``OptimizeWarning`` (the covariance could not be estimated, i.e. the
    problem is degenerate) or yields non-finite values counts as not converged. Then a
    least-squares line (``numpy.polyfit``, degree 1) is used instead, a :class:`MetricWarning` is
    issued and the result says ``method="linear"``. Constant predictions fit the flat line at
    ``mean(mos)``. This function never raises for valid input.
    """
    x, y = _as_pair(pred, mos)
    return _fit(x, y)


def _fit(x: np.ndarray, y: np.ndarray) -> FitResult:
    if _is_constant(x):
        return _linear_fallback(x, y, "predictions are constant")
    if x.size < 4:
        # Four parameters cannot be fitted to three points (curve_fit raises TypeError).
        return _linear_fallback(x, y, f"only {x.size} samples for a 4-parameter fit")
    starts = [[y.max(), y.min(), x.mean(), 0.5]]
    spread = float(x.std())
    if spread > 0 and not math.isclose(spread, 0.5, rel_tol=0.1):
        starts.append([y.max(), y.min(), x.mean(), spread])
    reasons = []
    for p0 in starts:
        params, reason = _try_logistic(x, y, p0)
        if params is not None:
            fitted = logistic4(x, *params)
            return FitResult(tuple(float(p) for p in params), True, "logistic4", "", fitted)
        reasons.append(reason)
    return _linear_fallback(x, y, "; ".join(reasons))


def _try_logistic(x: np.ndarray, y: np.ndarray, p0: list[float]) -> tuple[np.ndarray | None, str]:
    """One curve_fit attempt. Returns (params, "") or (None, why it failed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", optimize.OptimizeWarning)
        # Overflow/invalid RuntimeWarnings inside the optimiser are expected while it explores;
        # the finiteness check below decides.
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            params, _ = optimize.curve_fit(
                logistic4, x, y, p0=p0, jac=_logistic4_jacobian, maxfev=MAXFEV
            )
        except optimize.OptimizeWarning as exc:
            return None, f"logistic fit degenerate ({exc})"
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            return None, f"logistic fit failed ({exc})"
    if not np.all(np.isfinite(params)) or params[3] == 0.0:
        return None, "logistic fit gave non-finite parameters"
    if not np.all(np.isfinite(logistic4(x, *params))):
        return None, "logistic fit gave non-finite values"
    return params, ""


def _linear_fallback(x: np.ndarray, y: np.ndarray, reason: str) -> FitResult:
    if _is_constant(x):
        slope, intercept = 0.0, float(y.mean())
    else:
        slope, intercept = (float(c) for c in np.polyfit(x, y, 1))
    message = f"{reason}; using a linear fit instead"
    warnings.warn(message, MetricWarning, stacklevel=3)
    fitted = slope * x + intercept
    return FitResult((slope, intercept), False, "linear", message, fitted)


def plcc(pred: Any, mos: Any, fit: bool = True) -> float:
    """Pearson linear correlation between ``f(pred)`` and ``mos``.

    With ``fit=True`` (the paper's protocol), ``f`` is :func:`fit_logistic`'s map; with
    ``fit=False`` it is the identity, i.e. plain Pearson's r. Returns 0.0 with a
    :class:`MetricWarning` when the (fitted) predictions or the labels are constant.
    """
    x, y = _as_pair(pred, mos)
    fitted = _fit(x, y).fitted if fit else x
    return _pearson(fitted, y, "PLCC")


def rmse(pred: Any, mos: Any, fit: bool = True) -> float:
    """Root mean squared error between ``f(pred)`` and ``mos``, in the units of ``mos``.

    ``f`` is as in :func:`plcc`. Without the fit it is only meaningful when the predictions are
    already on the label scale.
    """
    x, y = _as_pair(pred, mos)
    fitted = _fit(x, y).fitted if fit else x
    return float(np.sqrt(np.mean((fitted - y) ** 2)))


def evaluate(pred: Any, mos: Any) -> dict[str, Any]:
    """Every metric the paper reports, from one logistic fit.

    Returns ``{"n", "srcc", "plcc", "krcc", "rmse", "fit_method", "fit_params",
    "fit_converged", "fit_message"}``; every value is a plain Python type, so the dict goes
    straight into JSON and checkpoint metadata.
    """
    x, y = _as_pair(pred, mos)
    result = _fit(x, y)
    return {
        "n": int(x.size),
        "srcc": _srcc(x, y),
        "plcc": _pearson(result.fitted, y, "PLCC"),
        "krcc": _krcc(x, y),
        "rmse": float(np.sqrt(np.mean((result.fitted - y) ** 2))),
        "fit_method": result.method,
        "fit_params": [float(p) for p in result.params],
        "fit_converged": result.converged,
        "fit_message": result.message,
    }
