"""Importance sampling with the amortized posterior as the proposal, against a grid posterior."""

import copy
import warnings

import numpy as np
import pytest
import torch

from sedppl.infer.ensemble import PosteriorEnsemble
from sedppl.infer.importance import importance_sample, log_joint, psis_weights
from sedppl.mocks import make_mocks


def _grid_posterior(model, obs, lo, hi, n=160):
    """Mean and sd of log_mass and av under the exact posterior, by quadrature on an n x n grid."""
    lm = torch.linspace(lo[0], hi[0], n)
    av = torch.linspace(lo[1], hi[1], n)
    a, b = torch.meshgrid(lm, av, indexing="ij")
    values = {"log_mass": a.reshape(-1, 1), "av": b.reshape(-1, 1)}
    lp = log_joint(model, values, obs)[:, 0]
    w = torch.softmax(lp, 0)
    out = {}
    for k, v in values.items():
        v = v[:, 0].double()
        m = (w * v).sum()
        out[k] = (float(m), float((w * (v - m) ** 2).sum().sqrt()))
    return out


def test_importance_sampling_recovers_the_grid_posterior(small_posterior, small_model):
    """For two S/N 30 mocks of the CI model (log mass formed, A_V), the importance-sampled posterior
    (4,000 proposal draws, 4,000 resampled) has the mean of the exact posterior, computed by quadrature on
    a 160 x 160 grid over +-8 amortized sd, within 0.1 exact sd, and its sd within 10%; the weights are
    reliable (Pareto k-hat < 0.7, ESS > 500)."""
    mock = make_mocks(small_model, 2, seed=31, redshift=0.1, snr_photometry=30)
    idata = importance_sample(small_posterior, mock.obs, num_samples=4000, num_draws=4000, seed=0, derived=False)
    assert np.all(idata.sample_stats["pareto_k"].values[0, 0] < 0.7)
    assert np.all(idata.sample_stats["importance_ess"].values[0, 0] > 500)
    amortized = small_posterior.sample(mock.obs, 2000, seed=1, derived=False).posterior
    for g in range(2):
        one = type(mock.obs)(redshift=mock.obs.redshift[g:g + 1], bands=mock.obs.bands,
                             band_flux=mock.obs.band_flux[g:g + 1], band_ivar=mock.obs.band_ivar[g:g + 1])
        m = {k: float(amortized[k].values[0, :, g].mean()) for k in ("log_mass", "av")}
        s = {k: float(amortized[k].values[0, :, g].std()) for k in ("log_mass", "av")}
        lo = [max(8.0, m["log_mass"] - 8 * s["log_mass"]), max(0.0, m["av"] - 8 * s["av"])]
        hi = [min(12.0, m["log_mass"] + 8 * s["log_mass"]), min(2.0, m["av"] + 8 * s["av"])]
        exact = _grid_posterior(small_model, one, lo, hi)
        for k, (mean, sd) in exact.items():
            v = idata.posterior[k].values[0, :, g]
            assert abs(v.mean() - mean) < 0.1 * sd, (g, k, v.mean(), mean, sd)
            assert abs(v.std() / sd - 1) < 0.1, (g, k, v.std(), sd)


def test_unreliable_weights_warn_and_bad_settings_fail(small_posterior, small_model):
    """A proposal shifted far from the posterior (the flow's affine layer moved by 4 standardised units),
    without the defensive part, gives Pareto k-hat > 0.7 and a warning that says so; a defensive
    fraction of 1, a narrower 'wide' base and an ensemble as the proposal are errors."""
    bad = copy.deepcopy(small_posterior)
    with torch.no_grad():
        bad.flow.transform.transforms[0].net[-1].bias[:bad.space.dim] += 4.0
    mock = make_mocks(small_model, 1, seed=32, redshift=0.1, snr_photometry=30)
    with pytest.warns(UserWarning, match="importance sampling unreliable"):
        idata = importance_sample(bad, mock.obs, num_samples=500, num_draws=100, defensive=0.0, seed=0,
                                  derived=False)
    assert idata.sample_stats["pareto_k"].values[0, 0, 0] > 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in ({"defensive": 1.0}, {"wide": 0.5}):
            with pytest.raises(ValueError, match="defensive"):
                importance_sample(small_posterior, mock.obs, num_samples=100, **kw)
        with pytest.raises(ValueError, match="ensemble is a mixture"):
            importance_sample(PosteriorEnsemble([small_posterior, bad]), mock.obs, num_samples=100)


def test_psis_weights_move_a_normal_proposal_to_a_shifted_target():
    """Draws of N(0, 1.5^2) weighted towards N(0.5, 1): the weighted mean and sd match the target to
    4 Monte Carlo errors; a good proposal has k-hat < 0.7; one row of a single finite weight has ESS 1."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.5, (3, 4000))
    log_w = -0.5 * (x - 0.5) ** 2 + 0.5 * (x / 1.5) ** 2
    log_w[2] = -np.inf
    log_w[2, 7] = 0.0
    log_w[1, :10] = np.nan  # count as zero weight
    w, k_hat, ess = psis_weights(log_w)
    assert np.allclose(w.sum(-1), 1.0)
    for row in (0, 1):
        mean = (w[row] * x[row]).sum()
        sd = np.sqrt((w[row] * (x[row] - mean) ** 2).sum())
        err = 1 / np.sqrt(ess[row])
        assert abs(mean - 0.5) < 4 * err and abs(sd - 1.0) < 4 * err
        assert k_hat[row] < 0.7 and ess[row] > 2000
    assert w[1, :10].sum() == 0
    assert ess[2] == pytest.approx(1.0)
