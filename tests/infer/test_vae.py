"""The spectrum VAE (sedppl.infer.vae): the model and guide as Pyro programs, files, and training."""

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from sedppl.data import Observation
from sedppl.infer.vae import AUX_SITE, SpectrumVAE, build_vae
from sedppl.noise import site_mean
from sedppl.zoo import SpecPhotModel

WAVE = np.arange(3800.0, 7000.0, 4.0)
BANDS = ["sdss_g", "sdss_r", "sdss_i"]


@pytest.fixture(scope="module")
def base():
    return SpecPhotModel(wave=WAVE, bands=BANDS, z_range=(0.01, 0.3))


def defect(wave):
    """A broad rest-frame feature the SPS lacks: +15% around 4600 A (sigma 250 A)."""
    return 1 + 0.15 * torch.exp(-0.5 * ((wave - 4600.0) / 250.0) ** 2)


def mocks(model, n, seed, inject=False, snr=20.0):
    """``n`` spectra from ``model``'s prior at z in 0.05-0.15, S/N ``snr`` per pixel, optionally
    with :func:`defect`; returns the Observation and the truths."""
    pyro.set_rng_seed(seed)
    z = 0.05 + 0.1 * torch.rand(n)
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(n_galaxies=n, redshift=z,
                                            residual=(lambda: defect) if inject else None)
    mean = site_mean(tr.nodes["spectrum"])
    sigma = mean.median(-1).values.abs()[:, None] / snr
    flux = mean + sigma * torch.randn(mean.shape)
    truth = {k: tr.nodes[k]["value"] for k in ("log_mass", "tau_ism", "tau_bc", "log_stellar_mass")}
    return Observation(redshift=z, wave=WAVE, flux=flux, ivar=(1 / sigma**2).expand_as(flux).clone()), truth


def card(**kw):
    c = {"residual": True, "n_latent": 1, "n_knots": 12, "residual_scale": 0.05, "residual_hidden": [16],
         "residual_wave_range": [3300.0, 6700.0], "remove_trend": True, "context": 16, "transforms": 2,
         "hidden": [32, 32], "bin_factor": 4, "spectrum_bins": len(WAVE) // 4, "bands": [],
         "redshift_range": [0.05, 0.15]}
    c.update(kw)
    return c


def test_select_takes_rows(base):
    obs, _ = mocks(base, 5, seed=0)
    part = obs.select([3, 1])
    assert part.n_galaxies == 2
    assert torch.equal(part.flux, obs.flux[[3, 1]]) and torch.equal(part.redshift, obs.redshift[[3, 1]])
    with pytest.raises(IndexError, match="out of range"):
        obs.select([5])


def test_guide_density_is_the_flows_moved_to_the_constrained_space(base):
    """The guide's trace log-density of its sample sites equals log q(u) - log|dx/du| computed from the
    flow and the bijections directly, for every galaxy (1e-4): no Jacobian lost or counted twice."""
    vae = build_vae(base, card())
    obs, _ = mocks(base, 4, seed=1)
    torch.manual_seed(0)
    tr = poutine.trace(vae.guide).get_trace(obs)
    tr.compute_log_prob()
    total = sum(site["log_prob"] for site in tr.nodes.values() if site["type"] == "sample"
                and site["name"] != "galaxies")
    u = tr.nodes[AUX_SITE]["value"]
    g = vae.guide
    q, _ = g.distribution(obs)
    z = (u - g.theta_shift) / g.theta_scale
    values, logdet = g.space.to_constrained(u)
    expected = q.log_prob(z) - torch.log(g.theta_scale).sum() - logdet
    assert torch.allclose(total, expected, atol=1e-4)
    for s in g.space.sites:  # the draws lie in their priors' supports
        assert s.support.check(tr.nodes[s.name]["value"]).all()


def test_elbo_and_gradients_are_finite(base):
    vae = build_vae(base, card())
    with torch.no_grad():
        vae.model.residual.net[-1].weight.normal_(0, 0.1)  # a residual that is not the identity
    obs, _ = mocks(base, 3, seed=2)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, obs)
    loss.backward()
    assert torch.isfinite(loss)
    params = list(vae.guide.parameters()) + list(vae.model.residual.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert vae.model.residual.net[0].weight.grad.abs().sum() > 0  # the decoder's free part learns


def test_saved_vae_loads_and_encodes_the_same(base, tmp_path):
    vae = build_vae(base, card())
    with torch.no_grad():
        vae.model.residual.net[-1].weight.normal_(0, 0.1)
    vae.card["sites"] = vae.guide.space.names
    path = vae.save(tmp_path / "vae")
    again = SpectrumVAE.load(path, base)
    obs, _ = mocks(base, 2, seed=3)
    a = vae.encode(obs, 50, seed=4).posterior
    b = again.encode(obs, 50, seed=4).posterior
    for k in ("log_mass", "residual_latent", "log_stellar_mass"):
        assert np.allclose(a[k].values, b[k].values, atol=1e-5)
    w = torch.linspace(3500.0, 6500.0, 50)
    assert torch.allclose(vae.residual_curve(w)["p50"], again.residual_curve(w)["p50"])
    with pytest.raises(ValueError, match="latent sites"):
        SpectrumVAE.load.__func__(SpectrumVAE, path, SpecPhotModel(wave=WAVE, bands=BANDS, n_calibration=2))


def test_generate_gives_spectra_at_the_requested_snr(base):
    vae = build_vae(base, card())
    obs = vae.generate(20, redshift=0.1, snr=15.0, seed=5)
    assert obs.flux.shape == (20, len(WAVE)) and obs.n_galaxies == 20
    snr = (obs.flux * obs.ivar.sqrt()).median(-1).values
    assert torch.allclose(snr, torch.full_like(snr, 15.0), rtol=0.1)  # median of noisy flux: within 10%
