"""Scaling-law fits recover known laws from noisy synthetic points; bad inputs are refused.

Every case draws its points from a known law with a fixed seed, so a fit that
drifts, an interval that stops covering the truth, or one that grows absurdly
wide fails here.
"""

import json
import math

import numpy as np
import pytest
from scipy import optimize

from gptjax import scaling
from gptjax.config import PRESETS, GPTConfig
from gptjax.scaling import fits
from gptjax.train.flops import flops_per_token

# ----------------------------------------------------------------------------- L(C) = a C^b + c

# The reducible loss falls from 4 nats at 1e12 FLOPs to 0.25 at 1e20 toward c = 1.7.
B_TRUE, C_TRUE = -0.15, 1.7
A_TRUE = 4.0 / 1e12**B_TRUE


def _power_law_points(noise: float, seed: int, n: int = 20):
    rng = np.random.default_rng(seed)
    compute = np.logspace(12, 20, n)
    loss = (A_TRUE * compute**B_TRUE + C_TRUE) * (1 + noise * rng.standard_normal(n))
    return compute, loss


@pytest.mark.parametrize("noise", [0.01, 0.02])
def test_power_law_recovers_a_b_c_and_its_intervals_cover_them(noise):
    compute, loss = _power_law_points(noise, seed=1)
    fit = scaling.fit_power_law(compute, loss, n_bootstrap=400, seed=0)
    assert fit.b < 0 and fit.c >= 0
    assert fit.a == pytest.approx(A_TRUE, rel=0.25)
    assert fit.b == pytest.approx(B_TRUE, abs=0.012)
    assert fit.c == pytest.approx(C_TRUE, abs=0.06)
    for (lo, hi), true, widest in [(fit.a_interval, A_TRUE, 1.2 * A_TRUE),
                                   (fit.b_interval, B_TRUE, 0.04),
                                   (fit.c_interval, C_TRUE, 0.25)]:
        assert lo <= true <= hi
        assert hi - lo < widest  # informative, not merely covering
    assert fit.n_failed == 0


def test_power_law_intervals_cover_the_truth_across_seeds():
    """Calibration: nominal 90% intervals from ten-point ladders, over 20 draws.

    A residual bootstrap on few points runs somewhat narrow, so the floor is
    below 18 of 20; intervals that collapsed or ignored the noise would cover
    far fewer.
    """
    target = 30 * 1e20
    truth = [A_TRUE, B_TRUE, C_TRUE, A_TRUE * target**B_TRUE + C_TRUE]
    covered = np.zeros(4, int)
    for seed in range(20):
        compute, loss = _power_law_points(0.015, seed=100 + seed, n=10)
        fit = scaling.fit_power_law(compute, loss, n_bootstrap=100, seed=seed)
        intervals = [fit.a_interval, fit.b_interval, fit.c_interval, fit.interval(target)]
        covered += [lo <= t <= hi for (lo, hi), t in zip(intervals, truth)]
    assert np.all(covered >= 14), covered


def test_power_law_extrapolates_30x_beyond_the_largest_run():
    compute, loss = _power_law_points(0.015, seed=2)
    fit = scaling.fit_power_law(compute, loss, n_bootstrap=400, seed=0)
    target = 30 * compute.max()
    true = A_TRUE * target**B_TRUE + C_TRUE
    predicted = fit.predict(target)
    assert isinstance(predicted, float)
    assert predicted == pytest.approx(true, rel=0.02)
    lo, hi = fit.interval(target)
    assert lo <= true <= hi and (hi - lo) < 0.08 * true
    run_lo, run_hi = fit.interval(target, new_run=True)  # plus a run's own scatter
    assert run_lo <= lo and run_hi >= hi


def test_power_law_is_unit_free():
    """The fit runs in normalised units, so FLOPs and PF-days give the same law."""
    compute, loss = _power_law_points(0.01, seed=3, n=10)
    flops = scaling.fit_power_law(compute, loss, n_bootstrap=50)
    pf_days = scaling.fit_power_law(compute / 8.64e19, loss, n_bootstrap=50)
    assert pf_days.b == pytest.approx(flops.b, rel=1e-4)
    assert pf_days.c == pytest.approx(flops.c, rel=1e-4)
    assert pf_days.a == pytest.approx(flops.a * 8.64e19**flops.b, rel=1e-3)
    assert pf_days.predict(1e-3) == pytest.approx(flops.predict(8.64e16), rel=1e-6)


def test_power_law_predict_shapes_and_json():
    compute, loss = _power_law_points(0.01, seed=4, n=8)
    fit = scaling.fit_power_law(compute, loss, n_bootstrap=50)
    grid = np.logspace(12, 22, 6).reshape(2, 3)
    out = fit.predict(grid)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    np.testing.assert_allclose(out, fit.a * grid**fit.b + fit.c, rtol=1e-9)
    assert np.all(np.diff(out.reshape(-1)) < 0)  # b < 0: more compute, less loss
    lo, hi = fit.interval(grid)
    assert lo.shape == hi.shape == (2, 3) and np.all(lo <= hi)
    assert fit.bootstrap_predictions(grid).shape == (50, 2, 3)
    record = json.loads(json.dumps(fit.to_dict()))
    assert record["b"] == fit.b and len(record["loss"]) == 8
    assert record["n_bootstrap"] == 50


def test_power_law_bootstrap_is_deterministic_in_its_seed():
    compute, loss = _power_law_points(0.02, seed=5, n=8)
    one = scaling.fit_power_law(compute, loss, n_bootstrap=60, seed=7)
    two = scaling.fit_power_law(compute, loss, n_bootstrap=60, seed=7)
    other = scaling.fit_power_law(compute, loss, n_bootstrap=60, seed=8)
    assert one.b_interval == two.b_interval
    assert one.b_interval != other.b_interval


def test_power_law_drops_and_counts_failed_resamples(monkeypatch):
    compute, loss = _power_law_points(0.01, seed=6, n=8)
    real = fits._fit_power_law_once
    state = {"refits": 0, "failing": False}

    def every_third_fails(x, y, starts):
        # a refit first tries one start (the fit's), then falls back to the grid:
        # make both attempts fail for every third resample
        if len(starts) == 1:
            state["refits"] += 1
            state["failing"] = state["refits"] % 3 == 0
        return None if state["failing"] else real(x, y, starts)

    monkeypatch.setattr(fits, "_fit_power_law_once", every_third_fails)
    with pytest.warns(RuntimeWarning, match=r"of 60 bootstrap refits failed"):
        fit = scaling.fit_power_law(compute, loss, n_bootstrap=60)
    assert fit.n_failed == 20 and len(fit.replicates) == 40
    assert fit.to_dict()["n_bootstrap_failed"] == fit.n_failed
    lo, hi = fit.interval(1e21)
    assert np.isfinite(lo) and lo < hi

    first = iter([True])
    monkeypatch.setattr(fits, "_fit_power_law_once",
                        lambda x, y, s: real(x, y, s) if next(first, False) else None)
    with pytest.raises(RuntimeError, match="all 10 bootstrap refits failed"):
        scaling.fit_power_law(compute, loss, n_bootstrap=10)


def test_power_law_without_c_is_kaplans_straight_line():
    """irreducible=False: L(C) = a C^b, c held at 0 (Kaplan et al. 2020), 2 parameters."""
    rng = np.random.default_rng(0)
    compute = np.logspace(15, 19, 8)
    loss = 40.0 * compute**-0.08 * (1 + 0.01 * rng.standard_normal(8))
    fit = scaling.fit_power_law(compute, loss, irreducible=False, n_bootstrap=200)
    assert fit.c == 0 and fit.c_interval == (0.0, 0.0) and not fit.irreducible
    assert fit.b == pytest.approx(-0.08, abs=0.005) and fit.a == pytest.approx(40, rel=0.2)
    assert fit.b_interval[0] <= -0.08 <= fit.b_interval[1]
    assert np.all(fit.replicates[:, 2] == 0)
    assert fit.to_dict()["form"] == "L(C) = a * C**b"
    slope, intercept = np.polyfit(np.log(compute), np.log(loss), 1)
    assert fit.b == pytest.approx(slope, abs=0.002)  # close to the log-log line
    three = scaling.fit_power_law(compute[:3], loss[:3], irreducible=False, n_bootstrap=20)
    assert np.isfinite(three.b)
    with pytest.raises(ValueError, match="2 points; fitting 2 .* at least 3"):
        scaling.fit_power_law(compute[:2], loss[:2], irreducible=False)


def test_power_law_on_an_exact_law_is_exact():
    compute = np.logspace(15, 19, 6)
    loss = 30.0 * compute**-0.1 + 1.5
    fit = scaling.fit_power_law(compute, loss, n_bootstrap=20)
    assert (fit.a, fit.b, fit.c) == pytest.approx((30.0, -0.1, 1.5), rel=1e-5)


# ----------------------------------------------------------------------------- Chinchilla

# Hoffmann et al. 2022's own fitted values (their eq. 10).
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _chinchilla_points(noise: float, seed: int):
    rng = np.random.default_rng(seed)
    n, d = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6)))
    t = CHINCHILLA
    loss = t["E"] + t["A"] / n ** t["alpha"] + t["B"] / d ** t["beta"]
    return n, d, loss * (1 + noise * rng.standard_normal(n.size))


@pytest.fixture(scope="module")
def chinchilla_fit():
    n, d, loss = _chinchilla_points(0.01, seed=1)
    return scaling.fit_chinchilla(n, d, loss, n_bootstrap=100, seed=0)


def test_chinchilla_recovers_its_parameters(chinchilla_fit):
    fit = chinchilla_fit
    assert fit.E == pytest.approx(CHINCHILLA["E"], rel=0.05)
    assert fit.A == pytest.approx(CHINCHILLA["A"], rel=0.2)
    assert fit.B == pytest.approx(CHINCHILLA["B"], rel=0.3)
    assert fit.alpha == pytest.approx(CHINCHILLA["alpha"], abs=0.02)
    assert fit.beta == pytest.approx(CHINCHILLA["beta"], abs=0.02)
    for name, widest in [("E", 0.2), ("A", 200), ("B", 400), ("alpha", 0.05), ("beta", 0.05)]:
        lo, hi = fit.intervals[name]
        assert lo <= getattr(fit, name) <= hi and hi - lo < widest, name
    n_big, d_big = 7e10, 1.4e12  # Chinchilla itself, far beyond the points
    t = CHINCHILLA
    true = t["E"] + t["A"] / n_big ** t["alpha"] + t["B"] / d_big ** t["beta"]
    assert fit.predict(n_big, d_big) == pytest.approx(true, rel=0.02)
    lo, hi = fit.interval(n_big, d_big)
    assert lo < fit.predict(n_big, d_big) < hi
    assert json.loads(json.dumps(fit.to_dict()))["alpha"] == fit.alpha


def test_chinchilla_intervals_cover_the_truth_across_seeds():
    covered = dict.fromkeys(CHINCHILLA, 0)
    for seed in range(8):
        n, d, loss = _chinchilla_points(0.01, seed=10 + seed)
        fit = scaling.fit_chinchilla(n, d, loss, n_bootstrap=40, seed=seed)
        for name, true in CHINCHILLA.items():
            lo, hi = fit.intervals[name]
            covered[name] += lo <= true <= hi
    assert min(covered.values()) >= 5, covered


@pytest.mark.parametrize("compute", [1e18, 5.76e23])
def test_chinchilla_compute_optimal_matches_brute_force(chinchilla_fit, compute):
    fit = chinchilla_fit
    n_opt, d_opt = fit.compute_optimal(compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute, rel=1e-9)
    res = optimize.minimize_scalar(
        lambda log_n: fit.predict(math.exp(log_n), compute / (6 * math.exp(log_n))),
        bounds=(math.log(1e3), math.log(1e15)), method="bounded", options={"xatol": 1e-9})
    assert n_opt == pytest.approx(math.exp(res.x), rel=1e-4)
    assert fit.predict(n_opt, d_opt) <= res.fun + 1e-12
    (n_lo, n_hi), (d_lo, d_hi) = fit.compute_optimal_interval(compute)
    assert n_lo <= n_opt <= n_hi and d_lo <= d_opt <= d_hi
    many_n, many_d = fit.compute_optimal(np.array([compute, 10 * compute]))
    assert many_n.shape == (2,) and many_n[1] > many_n[0] and many_d[1] > many_d[0]


def test_chinchilla_refuses_a_fixed_tokens_per_parameter_ladder():
    n = np.logspace(6, 9, 8)
    with pytest.raises(ValueError, match="do not vary independently"):
        scaling.fit_chinchilla(n, 20 * n, 2 + 1 / n**0.3, n_bootstrap=5)


# ----------------------------------------------------------------------------- loss -> accuracy

SIGMOID = dict(lo=0.25, hi=0.85, k=3.0, L0=3.2)


def _accuracy(loss):
    s = SIGMOID
    return s["lo"] + (s["hi"] - s["lo"]) / (1 + np.exp(s["k"] * (loss - s["L0"])))


@pytest.mark.parametrize("chance", [None, 0.25])
def test_sigmoid_recovers_its_parameters(chance):
    rng = np.random.default_rng(0)
    loss = np.linspace(2.0, 5.0, 16)
    acc = _accuracy(loss) + 0.01 * rng.standard_normal(loss.size)
    fit = scaling.fit_sigmoid(loss, acc, chance=chance, n_bootstrap=150, seed=0)
    assert fit.lo == pytest.approx(0.25, abs=0.015)
    if chance is not None:
        assert fit.lo == chance and fit.intervals["lo"] == (chance, chance)
    assert fit.hi == pytest.approx(0.85, abs=0.02)
    assert fit.k == pytest.approx(3.0, rel=0.1)
    assert fit.L0 == pytest.approx(3.2, abs=0.05)
    for name, widest in [("hi", 0.05), ("k", 1.0), ("L0", 0.15)]:
        lo, hi = fit.intervals[name]
        assert lo <= getattr(fit, name) <= hi and hi - lo < widest, name
    assert fit.predict(3.2) == pytest.approx(_accuracy(3.2), abs=0.02)


def test_sigmoid_intervals_cover_the_truth_across_seeds():
    covered = dict.fromkeys(("hi", "k", "L0"), 0)
    loss = np.linspace(2.0, 5.0, 16)
    for seed in range(10):
        acc = _accuracy(loss) + 0.01 * np.random.default_rng(10 + seed).standard_normal(16)
        fit = scaling.fit_sigmoid(loss, acc, chance=0.25, n_bootstrap=60, seed=seed)
        for name in covered:
            lo, hi = fit.intervals[name]
            covered[name] += lo <= SIGMOID[name] <= hi
    assert min(covered.values()) >= 7, covered


def test_capability_composes_loss_fit_and_sigmoid():
    """Two steps (Bhagia et al.): compute -> task loss -> accuracy."""
    compute, loss = _power_law_points(0.01, seed=6, n=12)
    rng = np.random.default_rng(1)
    acc = _accuracy(loss) + 0.01 * rng.standard_normal(loss.size)
    capability = scaling.CapabilityFit(
        scaling.fit_power_law(compute, loss, n_bootstrap=150),
        scaling.fit_sigmoid(loss, acc, chance=0.25, n_bootstrap=150))
    target = 30 * compute.max()
    predicted = capability.predict(target)
    assert predicted == capability.accuracy_fit.predict(capability.loss_fit.predict(target))
    true = _accuracy(A_TRUE * target**B_TRUE + C_TRUE)
    assert predicted == pytest.approx(true, abs=0.03)
    lo, hi = capability.interval(target)
    assert lo <= true <= hi and hi - lo < 0.1
    wide = capability.interval(np.array([target, 2 * target]), new_run=True)
    assert wide[0].shape == (2,)
    assert json.dumps(capability.to_dict())
    with pytest.raises(ValueError, match="accuracy_fit must be a SigmoidFit"):
        scaling.CapabilityFit(capability.loss_fit, capability.loss_fit)


def test_pass_rate_fit_gpt4_form():
    """-E[log pass_rate] = alpha C^-k, from per-problem pass rates (GPT-4 report, 3.1)."""
    rng = np.random.default_rng(0)
    compute = np.logspace(18, 22, 8)
    # 20 problems whose difficulty differs; the mean of -log pass rate follows the law
    difficulty = rng.uniform(0.5, 1.5, size=20)
    neg_log = 30.0 * compute[:, None] ** -0.3 * difficulty / difficulty.mean()
    neg_log *= np.exp(0.03 * rng.standard_normal((8, 1)))
    fit = scaling.fit_pass_rate(compute, np.exp(-neg_log), n_bootstrap=200)
    assert fit.k == pytest.approx(0.3, abs=0.01)
    assert fit.alpha == pytest.approx(30.0, rel=0.3)
    assert fit.k_interval[0] <= 0.3 <= fit.k_interval[1]
    assert fit.pass_rate(1e23) == pytest.approx(math.exp(-30.0 * 1e23**-0.3), abs=1e-3)


# ----------------------------------------------------------------------------- compute


@pytest.mark.parametrize("name", ["tiny", "cpu-small", "gpt1", "gpt2-medium"])
def test_training_flops_is_the_mfu_formula(name):
    """6 N + 6 L T D per token with N the model's matmul weights, the MFU's own count."""
    cfg = PRESETS[name]
    n = scaling.matmul_params(cfg)
    tokens = 3e9
    expected = tokens * (6 * n + 6 * cfg.n_layer * cfg.n_ctx * cfg.n_embd)
    assert scaling.training_flops(cfg, tokens) == pytest.approx(expected, rel=1e-12)
    assert scaling.training_flops(cfg, tokens) == tokens * flops_per_token(cfg)
    np.testing.assert_allclose(scaling.training_flops(cfg, np.array([1.0, 2.0])),
                               [expected / tokens, 2 * expected / tokens])


def test_matmul_params_by_hand():
    # tiny: L=2, D=64, F=4D=256, V=512: L (4 D^2 + 2 D F) + V D
    assert scaling.matmul_params(PRESETS["tiny"]) == 2 * (4 * 64**2 + 2 * 64 * 256) + 512 * 64
    cfg = GPTConfig(vocab_size=100, n_ctx=16, n_layer=3, n_head=2, n_embd=32, n_inner=48)
    assert scaling.matmul_params(cfg) == 3 * (4 * 32**2 + 2 * 32 * 48) + 100 * 32


# ----------------------------------------------------------------------------- bad inputs

GOOD_C = np.logspace(15, 19, 6)
GOOD_L = 30.0 * GOOD_C**-0.1 + 1.5


@pytest.mark.parametrize("call, message", [
    (lambda: scaling.fit_power_law(GOOD_C[:3], GOOD_L[:3]), r"3 points; fitting 3 .* at least 4"),
    (lambda: scaling.fit_power_law(GOOD_C, GOOD_L[:5]), "compute has 6 values but loss has 5"),
    (lambda: scaling.fit_power_law(GOOD_C, np.r_[GOOD_L[:4], np.nan, GOOD_L[5]]),
     r"loss\[4\] is nan"),
    (lambda: scaling.fit_power_law(GOOD_C, np.r_[GOOD_L[:2], np.inf, GOOD_L[3:]]),
     r"loss\[2\] is inf"),
    (lambda: scaling.fit_power_law(np.r_[GOOD_C[:5], 0.0], GOOD_L), r"compute\[5\] = 0"),
    (lambda: scaling.fit_power_law(-GOOD_C, GOOD_L), r"compute\[0\] = -1e\+15; .* > 0"),
    (lambda: scaling.fit_power_law(GOOD_C, GOOD_L, n_bootstrap=0), "n_bootstrap must be"),
    (lambda: scaling.fit_power_law(GOOD_C, GOOD_L, confidence=1.5), "confidence must be"),
    (lambda: scaling.fit_power_law(np.r_[GOOD_C[:3], GOOD_C[:3]] * 0 + 1e18, GOOD_L),
     "1 distinct values"),
    (lambda: scaling.fit_power_law(GOOD_C.reshape(2, 3), GOOD_L), "one-dimensional"),
    (lambda: scaling.fit_power_law(GOOD_C, ["a"] * 6), "loss must be numbers"),
    (lambda: scaling.fit_chinchilla(GOOD_C[:5], GOOD_C[:5], GOOD_L[:5]), "at least 6"),
    (lambda: scaling.fit_chinchilla(GOOD_C, np.r_[GOOD_C[:5], -1.0], GOOD_L),
     r"n_tokens\[5\] = -1"),
    (lambda: scaling.fit_chinchilla(np.r_[np.nan, GOOD_C[1:]], GOOD_C, GOOD_L),
     r"n_params\[0\] is nan"),
    (lambda: scaling.fit_chinchilla(GOOD_C, GOOD_C[::-1], GOOD_L, huber_delta=0),
     "huber_delta must be > 0"),
    (lambda: scaling.fit_sigmoid([1.0, 2.0, 3.0, 4.0], [0.9, 0.5, 0.3, 0.2]), "at least 5"),
    (lambda: scaling.fit_sigmoid(GOOD_L, [0.9, 0.8, 0.5, 0.3, 0.2, 1.5]),
     r"accuracy\[5\] = 1.5; .* \[0, 1\]"),
    (lambda: scaling.fit_sigmoid(GOOD_L, np.full(6, 0.5), chance=1.0), "chance must be"),
    (lambda: scaling.fit_pass_rate(GOOD_C, np.r_[0.1, 0.2, 0.0, 0.5, 0.6, 0.7]),
     r"pass_rate\[2\] = 0"),
    (lambda: scaling.fit_pass_rate(GOOD_C, np.full(6, 1.0)), "passes every problem"),
    (lambda: scaling.training_flops(PRESETS["tiny"], 0), r"training_flops: tokens = 0; .* > 0"),
])
def test_bad_inputs_raise_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_prediction_inputs_raise():
    fit = scaling.fit_power_law(GOOD_C, GOOD_L, n_bootstrap=5)
    with pytest.raises(ValueError, match=r"PowerLawFit.predict: compute\[1\] = -5"):
        fit.predict([1e20, -5.0])
    with pytest.raises(ValueError, match=r"compute\[0\] is nan"):
        fit.interval([np.nan])
