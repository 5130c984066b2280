"""The scaling-law fits and the compute of a run.

The fits, each from a paper (in our words):

- GPT-4 technical report (OpenAI 2023), section 3, "Predictable scaling":
  the final loss of the big run was predicted before it was trained by
  fitting L(C) = a * C**b + c, a power law in training compute C plus an
  irreducible loss c, to runs using 1,000x to 10,000x less compute. A
  capability (HumanEval pass rate) was predicted the same way, from
  -E[log pass_rate(C)] = alpha * C**(-k).              fit_power_law, fit_pass_rate
- Kaplan et al. 2020, "Scaling laws for neural language models": loss is a
  power law in parameters, data and compute over many orders of magnitude,
  and training costs about 6 FLOPs per parameter per token (2 forward, 4
  backward) plus the attention term.                    training_flops
- Hoffmann et al. 2022, "Training compute-optimal large language models"
  (Chinchilla): L(N, D) = E + A / N**alpha + B / D**beta, fitted by
  minimising a Huber loss between predicted and observed log loss with
  L-BFGS started from a grid; under C = 6 N D the loss-minimising N and D
  grow as powers of C, in closed form.                 fit_chinchilla
- Bhagia et al. 2024, "Establishing task scaling laws via compute-efficient
  model ladders" (OLMo): a task's accuracy is predicted in two steps, compute
  (or N, D) -> task loss -> accuracy, the second a sigmoid in the loss.
                                                        fit_sigmoid, CapabilityFit

Every fit is a frozen object with the point estimate, `predict`, bootstrap
confidence intervals of its parameters and of its predictions (`interval`),
and `to_dict()` for JSON. The optimisers are scipy's; each fit runs in
normalised units (compute divided by its geometric mean) so the problem is
well conditioned whatever the caller's units, and reports in the caller's.

    fit = fit_power_law(compute, loss)
    fit.a, fit.b, fit.c, fit.b_interval
    fit.predict(30 * compute.max()), fit.interval(30 * compute.max())
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import warnings
from collections.abc import Callable

import jax
import numpy as np
from scipy import optimize, special

from gptjax import model
from gptjax.train.flops import flops_per_token

# ----------------------------------------------------------------------------- compute


def training_flops(cfg, tokens):
    """Training FLOPs of `tokens` tokens of a model `cfg`: tokens * (6 N + 6 L T D).

    The formula is the MFU's own (gptjax.train.flops.flops_per_token), called
    rather than restated, so a rung's compute and the logged MFU cannot drift
    apart. N is `matmul_params(cfg)`. Scalar in -> float out; array -> array.
    """
    t = np.asarray(tokens, dtype=np.float64)
    _check_values("training_flops", "tokens", t, positive=True)
    out = t * flops_per_token(cfg)
    return float(out) if out.ndim == 0 else out


def matmul_params(cfg) -> int:
    """N of the FLOPs formula: the weights used in one matmul per token.

    Counted from the parameter tree `init_params` builds (shapes only, via
    jax.eval_shape, no arrays allocated): every block's weight matrix plus
    the token embedding, which is also the tied output projection. Not the
    position table (a lookup), biases or LayerNorm gains (elementwise).
    """
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    leaves = jax.tree_util.tree_leaves_with_path(shapes["h"])
    blocks = sum(math.prod(leaf.shape) for path, leaf in leaves if path[-1].key == "w")
    return int(blocks + math.prod(shapes["wte"].shape))


# ----------------------------------------------------------------------------- input checks


def _check_values(where: str, name: str, x: np.ndarray, *, positive: bool) -> None:
    """Raise naming the first non-finite (or, if `positive`, non-positive) entry."""

    def label(bad: np.ndarray) -> tuple[str, float]:
        i = tuple(int(j) for j in bad[0])
        index = "" if x.ndim == 0 else f"[{i[0] if x.ndim == 1 else i}]"
        return f"{name}{index}", x[i]

    bad = np.argwhere(~np.isfinite(x))
    if len(bad):  # argwhere of a 0-d array has one empty row when true
        what, value = label(bad)
        raise ValueError(f"{where}: {what} is {value}; every {name} value must be finite")
    bad = np.argwhere(x <= 0)
    if positive and len(bad):
        what, value = label(bad)
        raise ValueError(f"{where}: {what} = {value:g}; every {name} value must be > 0")


def _points(where: str, name: str, values, *, positive: bool) -> np.ndarray:
    """One value per run, as float64, checked."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {name} must be numbers, one per run") from e
    if x.ndim != 1:
        raise ValueError(f"{where}: {name} must be one-dimensional (one value per run), "
                         f"got shape {x.shape}")
    _check_values(where, name, x, positive=positive)
    return x


def _check_fit_inputs(where: str, arrays: dict[str, np.ndarray], n_params: int,
                      n_bootstrap: int, confidence: float) -> int:
    (first, x0), *rest = arrays.items()
    for name, x in rest:
        if len(x) != len(x0):
            raise ValueError(f"{where}: {first} has {len(x0)} values but {name} has {len(x)}; "
                             "give one of each per run")
    if len(x0) < n_params + 1:
        raise ValueError(f"{where}: {len(x0)} points; fitting {n_params} parameters needs at "
                         f"least {n_params + 1} (one more than the parameters, so the fit is "
                         "not exact and its residuals mean something)")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer) \
            or n_bootstrap < 1:
        raise ValueError(f"{where}: n_bootstrap must be an int >= 1, got {n_bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{where}: confidence must be in (0, 1), got {confidence!r}")
    return len(x0)


def _query(where: str, name: str, value, *, positive: bool):
    """A prediction's input: any shape; returns (flat, shape, is_scalar)."""
    try:
        x = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {name} must be numbers") from e
    _check_values(where, name, x, positive=positive)
    return x.reshape(-1), x.shape, x.ndim == 0


def _shaped(y: np.ndarray, shape: tuple, scalar: bool):
    return float(y[0]) if scalar else y.reshape(shape)


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return lo, hi


def _pair(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


# ----------------------------------------------------------------------------- bootstrap

# How a residual enters an observation, matching each fit's objective: the power
# law's are relative (y = fit * (1 + r)), Chinchilla's and the pass rate's are on
# the log scale (y = fit * exp(r)), accuracy's are additive (y = fit + r).
_NOISE = {
    "relative": (lambda y, f: y / f - 1.0, lambda f, r: f * (1.0 + r)),
    "log": (lambda y, f: np.log(y) - np.log(f), lambda f, r: f * np.exp(r)),
    "additive": (lambda y, f: y - f, lambda f, r: f + r),
}


def _residual_bootstrap(where: str, refit: Callable[[np.ndarray], np.ndarray | None],
                        observed: np.ndarray, fitted: np.ndarray, kind: str, n_params: int,
                        n_bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Refit to fitted + resampled residuals; returns (replicates, residuals, n_failed).

    Residuals are centred and inflated by sqrt(n / (n - p)): a least-squares fit
    pulls its own residuals toward zero by about that factor, and a ladder has
    few points, so the raw residuals would make the intervals too narrow.
    `refit` returns None for a resample it cannot fit; those are dropped and
    counted, and a warning says so when they exceed a tenth. Even so, with ten
    or twenty points the percentile intervals run somewhat narrower than their
    nominal confidence (a known small-sample property of the bootstrap);
    tests/test_scaling.py pins their coverage over many synthetic ladders.
    """
    residual_of, apply = _NOISE[kind]
    n = len(observed)
    r = residual_of(observed, fitted)
    r = (r - r.mean()) * math.sqrt(n / (n - n_params))
    rng = np.random.default_rng(seed)
    replicates, failed = [], 0
    for _ in range(n_bootstrap):
        theta = refit(apply(fitted, rng.choice(r, size=n, replace=True)))
        if theta is None:
            failed += 1
        else:
            replicates.append(theta)
    if not replicates:
        raise RuntimeError(f"{where}: all {n_bootstrap} bootstrap refits failed; the points "
                           "do not constrain this form (too few, or too noisy)")
    if failed > 0.1 * n_bootstrap:
        warnings.warn(f"{where}: {failed} of {n_bootstrap} bootstrap refits failed and were "
                      "dropped; the intervals rest on the rest", RuntimeWarning, stacklevel=3)
    return np.asarray(replicates), r, failed


class _BootstrapFit:
    """What the fits share: point prediction, bootstrap replicates, intervals.

    A subclass is a frozen dataclass with fields `theta` (the point estimate in
    its fitting units), `replicates` (one row per bootstrap refit), `residuals`
    (the centred, inflated residual pool), `confidence` and `seed`, and defines
    `_inputs(where, *x) -> (list of flat arrays, shape, is_scalar)` and
    `_evaluate(theta of shape (R, P), *flat) -> (R, M)`.
    """

    _noise: str

    def predict(self, *x):
        flat, shape, scalar = self._inputs(f"{type(self).__name__}.predict", *x)
        return _shaped(self._evaluate(self.theta[None, :], *flat)[0], shape, scalar)

    def bootstrap_predictions(self, *x, new_run: bool = False) -> np.ndarray:
        """One prediction per bootstrap replicate: shape (replicates, *shape of x).

        new_run=True adds to each a residual drawn from the fit's own residuals,
        so the spread covers a fresh run's scatter about the curve too, not only
        the uncertainty of the curve.
        """
        flat, shape, _ = self._inputs(f"{type(self).__name__}.interval", *x)
        y = self._evaluate(self.replicates, *flat)
        if new_run:
            rng = np.random.default_rng([self.seed, 1])
            y = _NOISE[self._noise][1](y, rng.choice(self.residuals, size=y.shape))
        return y.reshape((len(y),) + shape)

    def interval(self, *x, new_run: bool = False):
        """(lo, hi): the central `confidence` band of the bootstrap predictions.

        By default the band of the fitted curve; new_run=True widens it to where
        one new run is expected to land (see bootstrap_predictions).
        """
        y = self.bootstrap_predictions(*x, new_run=new_run)
        lo, hi = _quantiles(y, self.confidence)
        scalar = y.ndim == 1
        return (float(lo), float(hi)) if scalar else (lo, hi)


def _common_dict(fit) -> dict:
    return {"confidence": fit.confidence, "n_bootstrap": len(fit.replicates) + fit.n_failed,
            "n_bootstrap_failed": fit.n_failed, "seed": fit.seed,
            "bootstrap": "residual"}


# ----------------------------------------------------------------------------- L(C) = a C^b + c

_POWER_LAW_BOUNDS = ([0.0, -10.0, 0.0], [np.inf, 0.0, np.inf])  # a >= 0, -10 <= b <= 0, c >= 0


def _power_law(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """theta (R, 3) = (a, b, c) in normalised units, x (M,) -> (R, M)."""
    a, b, c = (theta[:, i:i + 1] for i in range(3))
    return a * x[None, :] ** b + c


def _fit_power_law_once(x: np.ndarray, y: np.ndarray, starts) -> np.ndarray | None:
    """Least squares of relative residuals from each start; the best (a, b, c), or None.

    Starts of two values (a, b) hold c at 0 (fit_power_law(irreducible=False))."""
    logx = np.log(x)
    free_c = len(starts[0]) == 3

    def residuals(theta):
        return (theta[0] * x ** theta[1] + (theta[2] if free_c else 0.0)) / y - 1.0

    def jacobian(theta):
        xb = x ** theta[1]
        columns = [xb / y, theta[0] * xb * logx / y] + ([1.0 / y] if free_c else [])
        return np.stack(columns, axis=1)

    bounds = _POWER_LAW_BOUNDS if free_c else tuple(b[:2] for b in _POWER_LAW_BOUNDS)
    best = None
    for start in starts:
        try:
            res = optimize.least_squares(residuals, start, jac=jacobian,
                                         bounds=bounds, x_scale="jac")
        except (ValueError, np.linalg.LinAlgError):
            continue
        if res.status > 0 and np.all(np.isfinite(res.x)) and (best is None
                                                              or res.cost < best.cost):
            best = res
    if best is None:
        return None
    return best.x if free_c else np.array([best.x[0], best.x[1], 0.0])


def _power_law_starts(x: np.ndarray, y: np.ndarray, free_c: bool = True) -> list[np.ndarray]:
    """Starts with c below the smallest loss and b from the log-log slope of L - c (with
    c held at 0: one start, (a, b) only)."""
    starts = []
    for fraction in (0.0, 0.5, 0.9, 0.99) if free_c else (0.0,):
        c = fraction * y.min()
        slope, intercept = np.polyfit(np.log(x), np.log(y - c), 1)
        start = [math.exp(intercept), float(np.clip(slope, -10.0, 0.0))]
        starts.append(np.array(start + [c] if free_c else start))
    return starts


@dataclasses.dataclass(frozen=True, eq=False)
class PowerLawFit(_BootstrapFit):
    """L(C) = a * C**b + c, as fitted by `fit_power_law` (a, b, c in the caller's units)."""

    a: float
    b: float
    c: float
    a_interval: tuple[float, float]
    b_interval: tuple[float, float]
    c_interval: tuple[float, float]
    compute: np.ndarray = dataclasses.field(repr=False)
    loss: np.ndarray = dataclasses.field(repr=False)
    scale: float = dataclasses.field(repr=False)  # compute unit of the fitting: geometric mean
    theta: np.ndarray = dataclasses.field(repr=False)  # (a * scale**b, b, c)
    replicates: np.ndarray = dataclasses.field(repr=False)
    residuals: np.ndarray = dataclasses.field(repr=False)
    confidence: float = 0.9
    seed: int = 0
    n_failed: int = 0

    _noise = "relative"

    def _inputs(self, where, compute):
        flat, shape, scalar = _query(where, "compute", compute, positive=True)
        return [flat / self.scale], shape, scalar

    def _evaluate(self, theta, x):
        return _power_law(theta, x)

    @property
    def irreducible(self) -> bool:
        """Whether c was fitted (False: held at 0, a pure power law)."""
        return self.n_free == 3

    n_free: int = 3  # parameters fitted: 3, or 2 with c held at 0

    def to_dict(self) -> dict:
        form = "L(C) = a * C**b + c" if self.irreducible else "L(C) = a * C**b"
        return {"form": form, "a": self.a, "b": self.b, "c": self.c,
                "a_interval": _pair(self.a_interval), "b_interval": _pair(self.b_interval),
                "c_interval": _pair(self.c_interval), "compute": _pair(self.compute),
                "loss": _pair(self.loss), "fitted": _pair(self.predict(self.compute)),
                **_common_dict(self)}


def fit_power_law(compute, loss, *, n_bootstrap: int = 1000, seed: int = 0,
                  confidence: float = 0.9, irreducible: bool = True) -> PowerLawFit:
    """Fit L(C) = a * C**b + c with b <= 0 and c >= 0 (GPT-4 report, section 3).

    irreducible=False holds c at 0: Kaplan et al. 2020's L(C) = (C_c / C)**alpha, a
    straight line in log-log, for ladders far above the loss floor, where c is not
    identified by the points (two parameters, so three points suffice).

    C is training compute (any unit: FLOPs, PF-days), L the final loss of each
    run. The optimiser is scipy's bounded least squares on relative residuals
    (loss noise scales with the loss), in units where C is divided by its
    geometric mean, started from several guesses: c at 0, 50, 90 and 99% of
    the smallest loss, a and b from a straight line through log C, log(L - c).

    Intervals: a residual bootstrap (`n_bootstrap` refits to fitted values
    times resampled relative residuals, started from the fit). Chosen over
    resampling the points because a ladder is a designed experiment with few
    rungs: resampled points often repeat the same two or three compute values,
    leaving a, b, c unidentified, and extrapolation is exactly what such a
    resample would distort. Resamples whose refit fails are dropped and
    counted (`n_failed`). The intervals are the central `confidence` quantiles.

    >>> fit = fit_power_law(compute, loss)
    >>> fit.predict(1e21), fit.interval(1e21), fit.b_interval
    """
    where = "fit_power_law"
    compute = _points(where, "compute", compute, positive=True)
    loss = _points(where, "loss", loss, positive=True)
    n_free = 3 if irreducible else 2
    _check_fit_inputs(where, {"compute": compute, "loss": loss}, n_free, n_bootstrap,
                      confidence)
    if len(np.unique(compute)) < n_free:
        raise ValueError(f"{where}: compute takes {len(np.unique(compute))} distinct values; "
                         f"{'a, b and c' if irreducible else 'a and b'} need runs at "
                         f"{n_free} or more compute budgets")
    scale = float(np.exp(np.log(compute).mean()))
    x = compute / scale
    starts = _power_law_starts(x, loss, irreducible)
    theta = _fit_power_law_once(x, loss, starts)
    if theta is None:
        raise RuntimeError(f"{where}: least squares failed from every start")

    def refit(y):
        if np.any(y <= 0):  # a residual below -100%: no loss to fit
            return None
        out = _fit_power_law_once(x, y, [theta[:n_free]])
        return out if out is not None else _fit_power_law_once(
            x, y, _power_law_starts(x, y, irreducible))

    fitted = _power_law(theta[None], x)[0]
    replicates, residuals, failed = _residual_bootstrap(
        where, refit, loss, fitted, "relative", n_free, n_bootstrap, seed)
    # back to the caller's units: a * (C / s)**b = (a * s**-b) * C**b
    a_caller = replicates[:, 0] * scale ** -replicates[:, 1]
    intervals = [_quantiles(v, confidence) for v in (a_caller, replicates[:, 1], replicates[:, 2])]
    return PowerLawFit(
        a=float(theta[0] * scale ** -theta[1]), b=float(theta[1]), c=float(theta[2]),
        a_interval=tuple(map(float, intervals[0])), b_interval=tuple(map(float, intervals[1])),
        c_interval=tuple(map(float, intervals[2])), compute=compute, loss=loss, scale=scale,
        theta=theta, replicates=replicates, residuals=residuals, confidence=confidence,
        seed=seed, n_failed=failed, n_free=n_free)


# ----------------------------------------------------------------------------- L(N, D), Chinchilla

_CHINCHILLA_NAMES = ("E", "A", "B", "alpha", "beta")
_EXPONENT_BOUNDS = (0.0, 5.0)


def _chinchilla(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray) -> np.ndarray:
    """theta (R, 5) = (log E, log A, log B, alpha, beta) in normalised units -> L, (R, M)."""
    e, a, b, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    return np.exp(e) + np.exp(a - alpha * logn[None]) + np.exp(b - beta * logd[None])


def _fit_chinchilla_once(logn, logd, logy, delta, starts) -> np.ndarray | None:
    """Hoffmann et al.'s objective, sum of Huber_delta(log prediction - log L), from
    each start; the best, or None.

    scipy's least_squares with loss="huber" and f_scale=delta minimises exactly
    that sum (its cost is 0.5 r**2 for |r| <= delta, delta |r| - delta**2 / 2
    beyond); its trust region with the analytic Jacobian converges in far fewer
    evaluations than L-BFGS on this nearly-L1 objective.
    """

    def parts(theta):
        e, a, b, alpha, beta = theta
        terms = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])
        return terms, special.logsumexp(terms, axis=0)

    def residuals(theta):
        return parts(theta)[1] - logy

    def jacobian(theta):
        terms, log_pred = parts(theta)
        w = np.exp(terms - log_pred)  # d log_pred / d term
        return np.stack([w[2], w[0], w[1], -w[0] * logn, -w[1] * logd], axis=1)

    bounds = ([-np.inf] * 3 + [_EXPONENT_BOUNDS[0]] * 2, [np.inf] * 3 + [_EXPONENT_BOUNDS[1]] * 2)
    best = None
    for start in starts:
        try:
            res = optimize.least_squares(residuals, np.clip(start, *bounds), jac=jacobian,
                                         bounds=bounds, loss="huber", f_scale=delta)
        except (ValueError, np.linalg.LinAlgError):
            continue
        if res.status > 0 and np.all(np.isfinite(res.x)) and (best is None
                                                              or res.cost < best.cost):
            best = res
    return None if best is None else best.x


def _chinchilla_starts(logn, logd, loss, keep: int = 3) -> list[np.ndarray]:
    """The `keep` best points of a grid over (alpha, beta), E, A, B solved at each.

    Hoffmann et al. start L-BFGS from a grid over all five parameters. For fixed
    exponents the loss is linear in E, A and B, so here those three come from a
    non-negative least squares (relative errors) at each grid point instead: a
    400-point grid for the cost of a few optimiser runs.
    """
    grid = np.linspace(0.05, 2.0, 20)
    scored = []
    for alpha, beta in itertools.product(grid, grid):
        design = np.stack([np.ones_like(loss), np.exp(-alpha * logn), np.exp(-beta * logd)], 1)
        coef, rnorm = optimize.nnls(design / loss[:, None], np.ones_like(loss))
        log_coef = np.log(np.maximum(coef, 1e-6 * loss.min()))  # a zero term: start tiny
        scored.append((rnorm, np.array([*log_coef, alpha, beta])))
    scored.sort(key=lambda pair: pair[0])
    return [start for _, start in scored[:keep]]


@dataclasses.dataclass(frozen=True, eq=False)
class ChinchillaFit(_BootstrapFit):
    """L(N, D) = E + A / N**alpha + B / D**beta, as fitted by `fit_chinchilla`."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, tuple[float, float]]
    n_params: np.ndarray = dataclasses.field(repr=False)
    n_tokens: np.ndarray = dataclasses.field(repr=False)
    loss: np.ndarray = dataclasses.field(repr=False)
    scale_n: float = dataclasses.field(repr=False)  # geometric means: the fitting units
    scale_d: float = dataclasses.field(repr=False)
    theta: np.ndarray = dataclasses.field(repr=False)  # (log E, log A', log B', alpha, beta)
    replicates: np.ndarray = dataclasses.field(repr=False)
    residuals: np.ndarray = dataclasses.field(repr=False)
    huber_delta: float = 1e-3
    confidence: float = 0.9
    seed: int = 0
    n_failed: int = 0

    _noise = "log"

    def _inputs(self, where, n_params, n_tokens):
        n, n_shape, n_scalar = _query(where, "n_params", n_params, positive=True)
        d, d_shape, d_scalar = _query(where, "n_tokens", n_tokens, positive=True)
        try:
            n, d = np.broadcast_arrays(n.reshape(n_shape), d.reshape(d_shape))
        except ValueError as e:
            raise ValueError(f"{where}: n_params of shape {n_shape} and n_tokens of shape "
                             f"{d_shape} do not broadcast") from e
        logs = [np.log(n.reshape(-1) / self.scale_n), np.log(d.reshape(-1) / self.scale_d)]
        return logs, n.shape, n_scalar and d_scalar

    def _evaluate(self, theta, logn, logd):
        return _chinchilla(theta, logn, logd)

    def _optimum(self, theta: np.ndarray, compute: np.ndarray):
        """N_opt, D_opt (R, M) for parameter rows theta (R, 5), in the caller's units."""
        _, log_a, log_b, alpha, beta = (theta[:, i:i + 1] for i in range(5))
        if np.any(alpha <= 0) or np.any(beta <= 0):
            raise ValueError("ChinchillaFit.compute_optimal: an exponent is 0, so the loss "
                             "does not fall with N or D and no finite optimum exists")
        log_a = log_a + alpha * math.log(self.scale_n)  # A = A' * scale_n**alpha
        log_b = log_b + beta * math.log(self.scale_d)
        log_g = (np.log(alpha) + log_a - np.log(beta) - log_b) / (alpha + beta)
        log_c6 = np.log(compute / 6.0)[None, :]
        log_n = log_g + beta / (alpha + beta) * log_c6
        return np.exp(log_n), np.exp(log_c6 - log_n)

    def compute_optimal(self, compute):
        """(N_opt, D_opt) minimising L(N, D) under C = 6 N D (Hoffmann et al., eq. 4):

        N_opt = G (C/6)**(beta/(alpha+beta)), G = (alpha A / (beta B))**(1/(alpha+beta)),
        D_opt = (C/6) / N_opt.
        """
        flat, shape, scalar = _query("ChinchillaFit.compute_optimal", "compute", compute,
                                     positive=True)
        n, d = self._optimum(self.theta[None, :], flat)
        return _shaped(n[0], shape, scalar), _shaped(d[0], shape, scalar)

    def compute_optimal_interval(self, compute):
        """((N_lo, N_hi), (D_lo, D_hi)) at `compute` from the bootstrap replicates."""
        flat, shape, scalar = _query("ChinchillaFit.compute_optimal_interval", "compute",
                                     compute, positive=True)
        n, d = self._optimum(self.replicates, flat)
        (n_lo, n_hi), (d_lo, d_hi) = _quantiles(n, self.confidence), _quantiles(d, self.confidence)
        return ((_shaped(n_lo, shape, scalar), _shaped(n_hi, shape, scalar)),
                (_shaped(d_lo, shape, scalar), _shaped(d_hi, shape, scalar)))

    def to_dict(self) -> dict:
        return {"form": "L(N, D) = E + A / N**alpha + B / D**beta",
                **{k: getattr(self, k) for k in _CHINCHILLA_NAMES},
                "intervals": {k: _pair(v) for k, v in self.intervals.items()},
                "n_params": _pair(self.n_params), "n_tokens": _pair(self.n_tokens),
                "loss": _pair(self.loss),
                "fitted": _pair(self.predict(self.n_params, self.n_tokens)),
                "huber_delta": self.huber_delta, **_common_dict(self)}


def _chinchilla_caller_units(theta: np.ndarray, scale_n: float, scale_d: float) -> np.ndarray:
    """Rows (log E, log A', log B', alpha, beta) -> (E, A, B, alpha, beta)."""
    e, a, b, alpha, beta = theta.T
    return np.stack([np.exp(e), np.exp(a + alpha * math.log(scale_n)),
                     np.exp(b + beta * math.log(scale_d)), alpha, beta], axis=1)


def fit_chinchilla(n_params, n_tokens, loss, *, n_bootstrap: int = 200, seed: int = 0,
                   confidence: float = 0.9, huber_delta: float = 1e-3) -> ChinchillaFit:
    """Fit L(N, D) = E + A / N**alpha + B / D**beta (Hoffmann et al. 2022, section 3.3).

    As the paper: minimise the Huber loss (delta 1e-3, robust to a stray run)
    between log of the prediction, written as a log-sum-exp, and log L, from
    the best points of a grid of starts (see _chinchilla_starts; the optimiser
    is scipy's least_squares, see _fit_chinchilla_once); here in units where N
    and D are divided by their geometric means. alpha and beta are bounded to
    [0, 5].

    The runs must vary N and D independently (several token budgets per model
    size, as the paper's IsoFLOP profiles): with a fixed tokens-per-parameter
    ratio, log N and log D move together and A/N**alpha cannot be told from
    B/D**beta; that case is refused. Intervals: the residual bootstrap of
    `fit_power_law` (why there), on log-loss residuals, each refit started
    from the fit; fewer refits by default than the other fits, since each is a
    five-parameter robust fit.
    """
    where = "fit_chinchilla"
    n = _points(where, "n_params", n_params, positive=True)
    d = _points(where, "n_tokens", n_tokens, positive=True)
    loss = _points(where, "loss", loss, positive=True)
    _check_fit_inputs(where, {"n_params": n, "n_tokens": d, "loss": loss}, 5, n_bootstrap,
                      confidence)
    if not (isinstance(huber_delta, numbers.Real) and huber_delta > 0):
        raise ValueError(f"{where}: huber_delta must be > 0, got {huber_delta!r}")
    design = np.stack([np.ones_like(n), np.log(n), np.log(d)], axis=1)
    if np.linalg.matrix_rank(design) < 3:
        raise ValueError(f"{where}: log n_params and log n_tokens do not vary independently "
                         "(one value of either, or a fixed tokens-per-parameter ratio), so "
                         "A / N**alpha cannot be separated from B / D**beta; train some model "
                         "sizes for more than one token budget")
    scale_n, scale_d = (float(np.exp(np.log(v).mean())) for v in (n, d))
    logn, logd = np.log(n / scale_n), np.log(d / scale_d)
    theta = _fit_chinchilla_once(logn, logd, np.log(loss), huber_delta,
                                 _chinchilla_starts(logn, logd, loss))
    if theta is None:
        raise RuntimeError(f"{where}: least squares failed from every start")

    def refit(y):
        out = _fit_chinchilla_once(logn, logd, np.log(y), huber_delta, [theta])
        return out if out is not None else _fit_chinchilla_once(
            logn, logd, np.log(y), huber_delta, _chinchilla_starts(logn, logd, y))

    fitted = _chinchilla(theta[None], logn, logd)[0]
    replicates, residuals, failed = _residual_bootstrap(
        where, refit, loss, fitted, "log", 5, n_bootstrap, seed)
    point = _chinchilla_caller_units(theta[None], scale_n, scale_d)[0]
    caller = _chinchilla_caller_units(replicates, scale_n, scale_d)
    lo, hi = _quantiles(caller, confidence)
    return ChinchillaFit(
        **{k: float(v) for k, v in zip(_CHINCHILLA_NAMES, point)},
        intervals={k: (float(a), float(b)) for k, a, b in zip(_CHINCHILLA_NAMES, lo, hi)},
        n_params=n, n_tokens=d, loss=loss, scale_n=scale_n, scale_d=scale_d, theta=theta,
        replicates=replicates, residuals=residuals, huber_delta=float(huber_delta),
        confidence=confidence, seed=seed, n_failed=failed)


# ----------------------------------------------------------------------------- loss -> accuracy


def _sigmoid(theta: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """theta (R, 4) = (lo, hi, k, L0); loss (M,) or (R, M) -> accuracy (R, M)."""
    lo, hi, k, l0 = (theta[:, i:i + 1] for i in range(4))
    return lo + (hi - lo) * special.expit(-k * (loss - l0))


def _fit_sigmoid_once(loss, acc, chance, starts) -> np.ndarray | None:
    """curve_fit from each start; the full (lo, hi, k, L0) of the best, or None."""
    if chance is None:
        def f(L, lo, hi, k, l0):
            return _sigmoid(np.array([[lo, hi, k, l0]]), L)[0]
        bounds = ([0.0, 0.0, 0.0, -np.inf], [1.0, 1.0, np.inf, np.inf])
    else:
        def f(L, hi, k, l0):
            return _sigmoid(np.array([[chance, hi, k, l0]]), L)[0]
        bounds = ([0.0, 0.0, -np.inf], [1.0, np.inf, np.inf])
    best, best_cost = None, np.inf
    for start in starts:
        p0 = start if chance is None else start[1:]
        p0 = np.clip(p0, bounds[0], bounds[1])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optimize.OptimizeWarning)
                p, _ = optimize.curve_fit(f, loss, acc, p0=p0, bounds=bounds, maxfev=5000)
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            continue
        cost = float(np.sum((f(loss, *p) - acc) ** 2))
        if np.all(np.isfinite(p)) and cost < best_cost:
            best, best_cost = p, cost
    if best is None:
        return None
    return np.asarray(best if chance is None else [chance, *best], dtype=np.float64)


def _sigmoid_starts(loss, acc, chance) -> list[np.ndarray]:
    lo = float(acc.min()) if chance is None else chance
    hi = float(acc.max())
    width = max(float(np.ptp(loss)), 1e-6)
    return [np.array([lo, hi, k / width, l0])
            for k in (2.0, 8.0, 32.0) for l0 in np.quantile(loss, [0.25, 0.5, 0.75])]


@dataclasses.dataclass(frozen=True, eq=False)
class SigmoidFit(_BootstrapFit):
    """acc(L) = lo + (hi - lo) / (1 + exp(k (L - L0))), as fitted by `fit_sigmoid`."""

    lo: float
    hi: float
    k: float
    L0: float
    intervals: dict[str, tuple[float, float]]
    loss: np.ndarray = dataclasses.field(repr=False)
    accuracy: np.ndarray = dataclasses.field(repr=False)
    theta: np.ndarray = dataclasses.field(repr=False)  # (lo, hi, k, L0)
    replicates: np.ndarray = dataclasses.field(repr=False)
    residuals: np.ndarray = dataclasses.field(repr=False)
    chance: float | None = None
    confidence: float = 0.9
    seed: int = 0
    n_failed: int = 0

    _noise = "additive"

    def _inputs(self, where, loss):
        flat, shape, scalar = _query(where, "loss", loss, positive=False)
        return [flat], shape, scalar

    def _evaluate(self, theta, loss):
        return _sigmoid(theta, loss)

    def to_dict(self) -> dict:
        return {"form": "acc(L) = lo + (hi - lo) / (1 + exp(k (L - L0)))", "lo": self.lo,
                "hi": self.hi, "k": self.k, "L0": self.L0, "chance": self.chance,
                "intervals": {k: _pair(v) for k, v in self.intervals.items()},
                "loss": _pair(self.loss), "accuracy": _pair(self.accuracy),
                "fitted": _pair(self.predict(self.loss)), **_common_dict(self)}


def fit_sigmoid(loss, accuracy, *, chance: float | None = None, n_bootstrap: int = 1000,
                seed: int = 0, confidence: float = 0.9) -> SigmoidFit:
    """Fit accuracy as a falling sigmoid of loss (Bhagia et al. 2024, step 2).

    acc(L) = lo + (hi - lo) / (1 + exp(k (L - L0))), k >= 0, lo and hi in
    [0, 1]: accuracy sits near `lo` while the loss is high, rises around L0 and
    saturates at `hi`. For multiple choice pass `chance` (1 / choices) to fix
    lo there, leaving hi, k, L0. Accuracies are fractions in [0, 1]. Fitted
    with scipy's curve_fit from a small grid of k and L0; intervals by the
    residual bootstrap of `fit_power_law` (why there), on absolute residuals.
    """
    where = "fit_sigmoid"
    loss = _points(where, "loss", loss, positive=False)
    acc = _points(where, "accuracy", accuracy, positive=False)
    bad = np.flatnonzero((acc < 0) | (acc > 1))
    if bad.size:
        raise ValueError(f"{where}: accuracy[{bad[0]}] = {acc[bad[0]]:g}; accuracies are "
                         "fractions in [0, 1]")
    if chance is not None and not (isinstance(chance, numbers.Real) and 0 <= chance < 1):
        raise ValueError(f"{where}: chance must be a fraction in [0, 1), got {chance!r}")
    n_free = 4 if chance is None else 3
    _check_fit_inputs(where, {"loss": loss, "accuracy": acc}, n_free, n_bootstrap, confidence)
    if len(np.unique(loss)) < n_free:
        raise ValueError(f"{where}: loss takes {len(np.unique(loss))} distinct values; "
                         f"{n_free} parameters need at least {n_free}")
    chance = None if chance is None else float(chance)
    theta = _fit_sigmoid_once(loss, acc, chance, _sigmoid_starts(loss, acc, chance))
    if theta is None:
        raise RuntimeError(f"{where}: curve_fit failed from every start")

    def refit(y):
        out = _fit_sigmoid_once(loss, y, chance, [theta])
        return out if out is not None else _fit_sigmoid_once(
            loss, y, chance, _sigmoid_starts(loss, y, chance))

    fitted = _sigmoid(theta[None], loss)[0]
    replicates, residuals, failed = _residual_bootstrap(
        where, refit, acc, fitted, "additive", n_free, n_bootstrap, seed)
    lo, hi = _quantiles(replicates, confidence)
    names = ("lo", "hi", "k", "L0")
    return SigmoidFit(
        **{k: float(v) for k, v in zip(names, theta)},
        intervals={k: (float(a), float(b)) for k, a, b in zip(names, lo, hi)},
        loss=loss, accuracy=acc, chance=chance, theta=theta, replicates=replicates,
        residuals=residuals, confidence=confidence, seed=seed, n_failed=failed)


@dataclasses.dataclass(frozen=True, eq=False)
class CapabilityFit:
    """Accuracy from compute (or N, D) in two steps (Bhagia et al. 2024):
    `loss_fit` (PowerLawFit or ChinchillaFit) gives the loss, `accuracy_fit`
    (SigmoidFit) turns it into accuracy.

    >>> capability = CapabilityFit(fit_power_law(compute, task_loss),
    ...                            fit_sigmoid(task_loss, accuracy, chance=0.25))
    >>> capability.predict(1e21), capability.interval(1e21)

    The interval pairs the i-th bootstrap replicate of one fit with the i-th of
    the other (they were drawn independently), so it carries both steps'
    uncertainty.
    """

    loss_fit: PowerLawFit | ChinchillaFit
    accuracy_fit: SigmoidFit

    def __post_init__(self):
        if not isinstance(self.loss_fit, PowerLawFit | ChinchillaFit):
            raise ValueError("CapabilityFit: loss_fit must be a PowerLawFit or ChinchillaFit, "
                             f"got {type(self.loss_fit).__name__}")
        if not isinstance(self.accuracy_fit, SigmoidFit):
            raise ValueError("CapabilityFit: accuracy_fit must be a SigmoidFit, "
                             f"got {type(self.accuracy_fit).__name__}")

    @property
    def confidence(self) -> float:
        return self.accuracy_fit.confidence

    def predict(self, *x):
        return self.accuracy_fit.predict(self.loss_fit.predict(*x))

    def interval(self, *x, new_run: bool = False):
        losses = self.loss_fit.bootstrap_predictions(*x, new_run=new_run)
        shape = losses.shape[1:]
        sig = self.accuracy_fit
        m = min(len(losses), len(sig.replicates))
        acc = _sigmoid(sig.replicates[:m], losses[:m].reshape(m, -1))
        if new_run:
            rng = np.random.default_rng([sig.seed, 2])
            acc = acc + rng.choice(sig.residuals, size=acc.shape)
        lo, hi = _quantiles(acc, self.confidence)
        if not shape:
            return float(lo[0]), float(hi[0])
        return lo.reshape(shape), hi.reshape(shape)

    def to_dict(self) -> dict:
        return {"loss_fit": self.loss_fit.to_dict(), "accuracy_fit": self.accuracy_fit.to_dict()}


# ----------------------------------------------------------------------------- pass rate (GPT-4)


@dataclasses.dataclass(frozen=True, eq=False)
class PassRateFit(_BootstrapFit):
    """-E[log pass_rate](C) = alpha * C**(-k), as fitted by `fit_pass_rate`."""

    alpha: float
    k: float
    alpha_interval: tuple[float, float]
    k_interval: tuple[float, float]
    compute: np.ndarray = dataclasses.field(repr=False)
    neg_log_pass_rate: np.ndarray = dataclasses.field(repr=False)
    scale: float = dataclasses.field(repr=False)
    theta: np.ndarray = dataclasses.field(repr=False)  # (log(alpha * scale**-k), k)
    replicates: np.ndarray = dataclasses.field(repr=False)
    residuals: np.ndarray = dataclasses.field(repr=False)
    confidence: float = 0.9
    seed: int = 0
    n_failed: int = 0

    _noise = "log"

    def _inputs(self, where, compute):
        flat, shape, scalar = _query(where, "compute", compute, positive=True)
        return [np.log(flat / self.scale)], shape, scalar

    def _evaluate(self, theta, logx):
        return np.exp(theta[:, :1] - theta[:, 1:2] * logx[None, :])

    def pass_rate(self, compute):
        """exp(-predict(C)): the geometric-mean pass rate over the problems."""
        y = self.predict(compute)
        return math.exp(-y) if isinstance(y, float) else np.exp(-y)

    def to_dict(self) -> dict:
        return {"form": "-E[log pass_rate] = alpha * C**(-k)", "alpha": self.alpha, "k": self.k,
                "alpha_interval": _pair(self.alpha_interval),
                "k_interval": _pair(self.k_interval), "compute": _pair(self.compute),
                "neg_log_pass_rate": _pair(self.neg_log_pass_rate), **_common_dict(self)}


def _fit_pass_rate_once(logx, logy) -> np.ndarray | None:
    def f(lx, log_alpha, k):
        return log_alpha - k * lx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            slope = float(np.polyfit(logx, logy, 1)[0])
            p0 = [float(logy.mean()), min(max(-slope, 0.0), 10.0)]
            p, _ = optimize.curve_fit(f, logx, logy, p0=p0,
                                      bounds=([-np.inf, 0.0], [np.inf, np.inf]))
    except (RuntimeError, ValueError, np.linalg.LinAlgError):
        return None
    return p if np.all(np.isfinite(p)) else None


def fit_pass_rate(compute, pass_rate, *, n_bootstrap: int = 1000, seed: int = 0,
                  confidence: float = 0.9) -> PassRateFit:
    """Fit -E_P[log pass_rate(C)] = alpha * C**(-k), k >= 0 (GPT-4 report, section 3.1).

    `pass_rate` is one value per run, or (runs, problems): then, as the report,
    the mean over problems of log pass rate (each problem's pass rate must be
    above 0, so estimate it from enough samples). The form is a straight line
    in log C, log(-mean log pass rate), fitted by curve_fit with k bounded at 0;
    intervals by the residual bootstrap of `fit_power_law`, on that log scale.
    """
    where = "fit_pass_rate"
    compute = _points(where, "compute", compute, positive=True)
    try:
        p = np.asarray(pass_rate, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: pass_rate must be numbers") from e
    if p.ndim not in (1, 2):
        raise ValueError(f"{where}: pass_rate must be (runs,) or (runs, problems), "
                         f"got shape {p.shape}")
    _check_values(where, "pass_rate", p, positive=True)
    bad = np.argwhere(p > 1)
    if bad.size:
        i = tuple(int(j) for j in bad[0])
        raise ValueError(f"{where}: pass_rate[{i[0] if p.ndim == 1 else i}] = {p[i]:g}; "
                         "pass rates are fractions in (0, 1]")
    y = -np.log(p) if p.ndim == 1 else -np.log(p).mean(axis=1)
    _check_fit_inputs(where, {"compute": compute, "pass_rate": y}, 2, n_bootstrap, confidence)
    perfect = np.flatnonzero(y == 0)
    if perfect.size:
        raise ValueError(f"{where}: run {perfect[0]} passes every problem (-log pass rate is "
                         "0), which a power law in C never reaches; leave it out")
    if len(np.unique(compute)) < 2:
        raise ValueError(f"{where}: every run has the same compute; a slope needs two budgets")
    scale = float(np.exp(np.log(compute).mean()))
    logx = np.log(compute / scale)
    theta = _fit_pass_rate_once(logx, np.log(y))
    if theta is None:
        raise RuntimeError(f"{where}: curve_fit failed")
    fitted = np.exp(theta[0] - theta[1] * logx)
    replicates, residuals, failed = _residual_bootstrap(
        where, lambda v: _fit_pass_rate_once(logx, np.log(v)), y, fitted, "log", 2,
        n_bootstrap, seed)
    # alpha * (C / s)**-k = (alpha * s**k) * C**-k
    alpha = np.exp(replicates[:, 0]) * scale ** replicates[:, 1]
    a_lo, a_hi = _quantiles(alpha, confidence)
    k_lo, k_hi = _quantiles(replicates[:, 1], confidence)
    return PassRateFit(
        alpha=float(math.exp(theta[0]) * scale ** theta[1]), k=float(theta[1]),
        alpha_interval=(float(a_lo), float(a_hi)), k_interval=(float(k_lo), float(k_hi)),
        compute=compute, neg_log_pass_rate=y, scale=scale, theta=theta,
        replicates=replicates, residuals=residuals, confidence=confidence, seed=seed,
        n_failed=failed)
