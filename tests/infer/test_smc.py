"""Tempered SMC against posteriors and evidences known in closed form or by quadrature."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from sedppl.infer.potential import BatchedPotential
from sedppl.infer.smc import _next_beta, _systematic_resample, sample_smc


def _linear_gaussian(a, sigma):
    def model(y):
        with pyro.plate("galaxies", y.shape[0]):
            theta = pyro.sample("theta", dist.Normal(torch.zeros(a.shape[1], dtype=a.dtype), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(theta @ a.T, sigma).to_event(1), obs=y)
    return model


def test_smc_recovers_a_linear_gaussian_posterior_and_its_evidence():
    """theta ~ N(0, I_3), y = A theta + N(0, 0.05^2 I_6): posterior and evidence in closed form. 10 targets x
    500 particles: every mean within 0.2 posterior sd, every sd within 15%, log Z within 0.5 nats for each
    target and within 0.15 on average (the prior-to-posterior volume ratio is e^11.4; seen: 0.09 sd, 9%, 0.22
    and -0.08)."""
    gen = torch.Generator().manual_seed(0)
    d, k, sigma, g, p = 3, 6, 0.05, 10, 500
    a = torch.randn(k, d, generator=gen, dtype=torch.float64)
    y = torch.randn(g, d, generator=gen, dtype=torch.float64) @ a.T + \
        sigma * torch.randn(g, k, generator=gen, dtype=torch.float64)
    pyro.set_rng_seed(1)
    pot = BatchedPotential(_linear_gaussian(a, sigma), (y.repeat(p, 1),), dtype=torch.float64)
    res = sample_smc(pot, p, generator=torch.Generator().manual_seed(2), progress=False)
    cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + a.T @ a / sigma**2)
    sd = cov.diag().sqrt()
    mean = y @ a @ cov / sigma**2  # (g, d)
    u = res["u"]
    assert torch.all(((u.mean(0) - mean) / sd).abs() < 0.2)
    assert torch.all((u.std(0) / sd - 1).abs() < 0.15)
    exact = dist.MultivariateNormal(torch.zeros(k, dtype=torch.float64),
                                    a @ a.T + sigma**2 * torch.eye(k, dtype=torch.float64)).log_prob(y)
    err = res["log_evidence"] - exact
    assert torch.all(err.abs() < 0.5) and abs(float(err.mean())) < 0.15
    assert res["u"].shape == (p, g, d) and torch.all(res["stages"] >= 3)


def test_smc_weighs_two_modes_by_their_posterior_mass():
    """theta ~ N(0.25, 1), y = theta^2 + N(0, 0.1^2), y = 1: modes at theta = -1 and +1 holding 37.8% and
    62.2% of the posterior (quadrature); MCMC chains would stay in the mode they start in. 20 targets x 400
    particles: the mean fraction at theta > 0 within 0.03 of the exact one and each target's within 0.15
    (one target's spread: 0.04); the mean log Z within 0.05 nats of quadrature."""
    sigma, mu = 0.1, 0.25

    def model(y):
        with pyro.plate("galaxies", y.shape[0]):
            theta = pyro.sample("theta", dist.Normal(torch.tensor(mu, dtype=torch.float64), 1.0))
            pyro.sample("y", dist.Normal(theta**2, sigma), obs=y)

    x = torch.linspace(-4, 4, 200_001, dtype=torch.float64)
    lp = dist.Normal(mu, 1.0).log_prob(x) + dist.Normal(x**2, sigma).log_prob(torch.tensor(1.0, dtype=torch.float64))
    log_z = float(torch.logsumexp(lp, 0)) + math.log(float(x[1] - x[0]))
    frac = float(torch.exp(torch.logsumexp(lp[x > 0], 0) - torch.logsumexp(lp, 0)))
    assert frac == pytest.approx(0.622, abs=0.001)
    g, p = 20, 400
    pyro.set_rng_seed(3)
    pot = BatchedPotential(model, (torch.ones(g * p, dtype=torch.float64),), dtype=torch.float64)
    res = sample_smc(pot, p, generator=torch.Generator().manual_seed(1), progress=False)
    got = (res["u"][..., 0] > 0).double().mean(0)
    assert abs(float(got.mean()) - frac) < 0.03
    assert torch.all((got - frac).abs() < 0.15)
    assert abs(float(res["log_evidence"].mean()) - log_z) < 0.05


def test_next_beta_keeps_the_effective_sample_size():
    """The chosen step leaves the incremental weights an ESS of half the particles (to 1e-6), or goes to
    beta = 1 when that is allowed; systematic resampling keeps each particle's count within 1 of P w."""
    gen = torch.Generator().manual_seed(0)
    ll = -50 * torch.rand(1000, 3, generator=gen, dtype=torch.float64)
    ll[:, 2] = -1e-3 * torch.rand(1000, generator=gen, dtype=torch.float64)  # a nearly flat likelihood
    beta = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    new = _next_beta(ll, beta, 0.5)
    w = torch.exp((new - beta) * ll - ((new - beta) * ll).max(0).values)
    ess = w.sum(0) ** 2 / (w * w).sum(0) / 1000
    assert torch.allclose(ess[:2], torch.full((2,), 0.5, dtype=torch.float64), atol=1e-6)
    assert float(new[2]) == 1.0 and torch.all(new[:2] > beta[:2])
    logw = torch.log(torch.rand(1000, 3, generator=gen, dtype=torch.float64))
    idx = _systematic_resample(logw, gen)
    for t in range(3):
        counts = torch.bincount(idx[:, t], minlength=1000).double()
        assert torch.all((counts - 1000 * torch.softmax(logw[:, t], 0)).abs() < 1 + 1e-9)


def test_run_smc_on_a_heavy_tailed_model_gives_arviz_and_evidence():
    """``run_smc`` on the continuity prior's heavy tails (tests/models.py::ratio_model: three StudentT(2, 0, 0.3)
    ratios, the first measured with sd 0.1): 4 galaxies x 2 runs x 1000 particles. The two free ratios keep
    their prior (fractions beyond the prior's 80% and 95% central quantiles within 4 binomial sd of 0.2 and
    0.05 over all particles), R-hat across runs <= 1.05, the measured ratio's posterior sd within 15% of
    quadrature's, and log Z within 0.2 nats of quadrature's for every galaxy and run and within 0.05 on average
    (seen with seeds 4 and 5: at most 0.09; with 300 particles up to 0.23)."""
    from scipy import stats

    import arviz as az

    from sedppl.data import Observation
    from sedppl.infer.smc import run_smc
    from tests.models import ratio_model

    y = torch.tensor([[0.0], [0.5], [-1.2], [3.0]])
    obs = Observation(band_flux=y, band_ivar=torch.full_like(y, 100.0), bands=["x"])
    idata = run_smc(ratio_model, obs=obs, num_particles=1000, num_runs=2, seed=4, progress=False)
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data", "smc"} <= set(idata.groups())
    r = idata.posterior["log_sfr_ratio"].values  # (run, particle, galaxy, 3)
    assert r.shape == (2, 1000, 4, 3)
    assert float(az.rhat(idata.posterior).log_sfr_ratio.max()) <= 1.05
    free = r[..., 1:].ravel()
    n = free.size
    for central in (0.8, 0.95):
        q = stats.t(2, scale=0.3).ppf(0.5 + central / 2)
        frac, expect = float((abs(free) > q).mean()), 1 - central
        assert abs(frac - expect) < 4 * (expect * (1 - expect) / n) ** 0.5
    x = torch.linspace(-60, 60, 1_200_001, dtype=torch.float64)
    prior = torch.tensor(stats.t(2, scale=0.3).logpdf(x.numpy()))
    errors = []
    for j in range(4):
        lp = prior + dist.Normal(x, 0.1).log_prob(y[j].double())
        post = torch.softmax(lp, 0)
        sd = float(((x**2 * post).sum() - (x * post).sum() ** 2).sqrt())
        assert abs(r[..., j, 0].std() / sd - 1) < 0.15
        log_z = float(torch.logsumexp(lp, 0)) + math.log(float(x[1] - x[0]))
        errors.append(idata.smc.log_evidence.values[:, j] - log_z)
    assert abs(np.array(errors)).max() < 0.2 and abs(np.mean(errors)) < 0.05


def test_smc_from_the_amortized_posterior_matches_smc_from_the_prior():
    """Two ugriz mocks (the shipped posterior's model, S/N 20, z = 0.1), 2 runs x 128 particles each way:
    tempering from the flow (``posterior=``, its base space) needs at most 3 steps where the prior needs at
    least 5, and both give the same exact posterior: log Z within 0.6 nats (the prior runs' own spread
    reaches 0.5), posterior means of log M* and tau_ism within 0.3 pooled sd, and R-hat across the flow
    runs <= 1.05."""
    import warnings

    import arviz as az

    from sedppl.infer.smc import run_smc
    from sedppl.mocks import make_mocks
    from sedppl.posteriors import load_shipped

    post = load_shipped("phot")
    mock = make_mocks(post.model, 2, seed=11, redshift=0.1, snr_photometry=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow = run_smc(post.model, obs=mock.obs, num_particles=128, num_runs=2, seed=0, posterior=post,
                       progress=False)
        prior = run_smc(post.model, obs=mock.obs, num_particles=128, num_runs=2, seed=1, progress=False)
    assert int(flow.smc.stages.max()) <= 3 and int(prior.smc.stages.min()) >= 5
    dz = flow.smc.log_evidence.values.mean(0) - prior.smc.log_evidence.values.mean(0)
    assert np.all(np.abs(dz) < 0.6), dz
    for k in ("log_stellar_mass", "tau_ism"):
        a, b = flow.posterior[k], prior.posterior[k]
        sd = np.sqrt(0.5 * (a.var(("chain", "draw")) + b.var(("chain", "draw")))).values
        shift = (a.mean(("chain", "draw")) - b.mean(("chain", "draw"))).values / sd
        assert np.all(np.abs(shift) < 0.3), (k, shift)
        assert float(az.rhat(flow.posterior[[k]])[k].max()) <= 1.05
