"""Calibration diagnostics on a conjugate Gaussian problem with a known posterior."""

import numpy as np
import pytest

from sedppl.diagnostics import (central_interval_coverage, coverage_tolerance, rank_uniformity_pvalue,
                                sbc_rank_fractions, sbc_ranks, thin_to_independent, uniformity_pvalue)

N, L = 400, 99


def gaussian_problem(seed, posterior_sd=np.sqrt(0.5), shift=0.0):
    """theta ~ N(0, 1), x ~ N(theta, 1): the posterior is N(x / 2, 1 / 2)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=N)
    x = theta + rng.normal(size=N)
    draws = x[:, None] / 2 + shift + posterior_sd * rng.normal(size=(N, L))
    return theta, draws


def test_exact_posterior_is_calibrated():
    theta, draws = gaussian_problem(0)
    assert rank_uniformity_pvalue(sbc_ranks(theta, draws), L) > 0.01
    cov = central_interval_coverage(theta, draws, [0.5, 0.68, 0.95])
    for level, c in zip((0.5, 0.68, 0.95), cov):
        assert abs(c - level) < coverage_tolerance(level, N), (level, c)


def test_false_positive_rate_near_nominal():
    # 200 calibrated experiments: the 5% test rejects 5% +- 3 sigma of them
    p = np.array([rank_uniformity_pvalue(sbc_ranks(*gaussian_problem(s)), L) for s in range(200)])
    rate = np.mean(p < 0.05)
    assert abs(rate - 0.05) < 3 * np.sqrt(0.05 * 0.95 / 200), rate


@pytest.mark.parametrize("kind", ["overconfident", "biased"])
def test_miscalibration_detected(kind):
    kw = {"posterior_sd": 0.3} if kind == "overconfident" else {"shift": 0.5}
    theta, draws = gaussian_problem(1, **kw)
    assert rank_uniformity_pvalue(sbc_ranks(theta, draws), L) < 1e-4
    assert central_interval_coverage(theta, draws, [0.68])[0] < 0.68 - coverage_tolerance(0.68, N)


def test_ranks_and_errors():
    assert list(sbc_ranks(np.array([0.5, -1.0, 2.0]), np.array([[0.0, 1.0]] * 3))) == [1, 0, 2]
    with pytest.raises(ValueError, match="draws"):
        sbc_ranks(np.zeros(3), np.zeros(3))
    assert thin_to_independent(np.zeros((2, 100)), 25).shape == (2, 25)


def ar1_chains(seed, posterior_sd=np.sqrt(0.5), chains=2, length=400):
    """The Gaussian problem above sampled by AR(1) chains (exact marginals, autocorrelation rho
    uniform in 0-0.95 per simulation); returns truth, draws (N, chains, length), the AR(1) ESS."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=N)
    x = theta + rng.normal(size=N)
    rho = rng.uniform(0.0, 0.95, size=N)
    z = np.empty((N, chains, length))
    z[..., 0] = rng.normal(size=(N, chains))
    for t in range(1, length):
        z[..., t] = rho[:, None] * z[..., t - 1] + np.sqrt(1 - rho[:, None] ** 2) * rng.normal(size=(N, chains))
    ess = chains * length * (1 - rho) / (1 + rho)
    return theta, x[:, None, None] / 2 + posterior_sd * z, ess


def test_sbc_rank_fractions_of_autocorrelated_chains():
    """Exact but autocorrelated chains (ESS 10-800 per simulation), thinned per simulation: fractions
    uniform (chi-square p > 0.01, 400 simulations, seed 0); the same chains of a posterior 0.6x too
    narrow fail it (p < 1e-4)."""
    theta, draws, ess = ar1_chains(0)
    u = sbc_rank_fractions(theta, draws, ess)
    assert u.shape == (N,) and np.all((u > 0) & (u < 1))
    assert uniformity_pvalue(u) > 0.01
    theta, draws, ess = ar1_chains(0, posterior_sd=0.6 * np.sqrt(0.5))
    assert uniformity_pvalue(sbc_rank_fractions(theta, draws, ess)) < 1e-4
    with pytest.raises(ValueError, match="chains"):
        sbc_rank_fractions(np.zeros(3), np.zeros((3, 10)))
    with pytest.raises(ValueError, match="ESS"):
        sbc_rank_fractions(np.zeros(3), np.zeros((3, 2, 10)), ess=np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="inside"):
        uniformity_pvalue(np.array([0.2, 1.0]))


def test_compare_posteriors_detects_shift_and_width():
    from sedppl.diagnostics import compare_posteriors

    rng = np.random.default_rng(0)
    ref = {"x": rng.normal(0, 1, 4000), "y": rng.normal(0, 1, 4000)}
    same = compare_posteriors({"x": rng.normal(0, 1, 4000), "y": rng.normal(0, 1, 4000)}, ref)
    # 4000 draws: shift sd ~0.022, width-ratio sd ~0.016; classifier at chance within 3 null sd
    assert max(abs(v) for v in same["shift"].values()) < 0.1
    assert max(abs(v - 1) for v in same["width_ratio"].values()) < 0.07
    assert abs(same["c2st_z"]) < 3
    other = compare_posteriors({"x": rng.normal(0.3, 1, 4000), "y": rng.normal(0, 0.7, 4000)}, ref)
    assert abs(other["shift"]["x"] - 0.3) < 0.1 and abs(other["width_ratio"]["y"] - 0.7) < 0.05
    assert other["c2st_z"] > 5
