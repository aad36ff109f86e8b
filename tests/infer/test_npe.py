"""Amortized posteriors (NPE with zuko flows) on a user's own Pyro model, trained in CI.

The model and its posterior are the session fixtures ``small_model`` and
``small_posterior`` (tests/conftest.py, tests/models.py).
"""

import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from sedppl.data import Observation
from sedppl.infer import autoregressive
from sedppl.infer.conditions import ObservingConditions
from sedppl.infer.npe import NeuralPosterior
from sedppl.infer.npe_calibration import calibrate, fit_base_scale
from sedppl.infer.parameters import ParameterSpace
from sedppl.infer.simulations import bin_spectrum
from sedppl.infer.splines import use_fast_splines
from sedppl.mocks import make_mocks
from sedppl.noise import photometry_sigma
from tests.models import BANDS


def test_parameter_space_round_trip(small_model):
    space = ParameterSpace.from_model(small_model, redshift=0.1)
    assert space.names == ["log_mass", "av"] and space.dim == 2
    u = torch.randn(50, 2) * 3
    values, logdet = space.to_constrained(u)
    assert torch.all((values["log_mass"] > 8) & (values["log_mass"] < 12))
    assert torch.allclose(space.to_unconstrained(values), u, atol=1e-4)
    # log|dx/du| of the interval maps, against autograd, to 1e-5
    uu = u[:1].clone().requires_grad_(True)
    v, ld = space.to_constrained(uu)
    g0 = torch.autograd.grad(v["log_mass"].sum(), uu, retain_graph=True)[0][0, 0]
    g1 = torch.autograd.grad(v["av"].sum(), uu)[0][0, 1]
    assert abs(float(torch.log(g0 * g1)) - float(ld[0].detach())) < 1e-5


@pytest.mark.parametrize("kind,params", [("uniform", (7.0, 12.5)), ("normal", (0.0, 1.6)), ("studentt", (2.0, 0.0, 0.3)),
                                         ("studentt", (3.0, 0.5, 1.0))])
def test_prior_whitening(kind, params):
    """Prior draws become N(0, 1) (20,000 draws: mean within 0.03, sd within 0.03), the map inverts to
    1e-6 relative, and log|dx/dw| equals finite differences to 1e-4."""
    from sedppl.infer.whitening import Whitener

    wh = Whitener(kind, params)
    rng = np.random.default_rng(0)
    x = {"uniform": lambda: rng.uniform(*params, 20000), "normal": lambda: rng.normal(*params, 20000),
         "studentt": lambda: params[1] + params[2] * rng.standard_t(params[0], 20000)}[kind]()
    w = wh.to_white(x)
    assert abs(w.mean()) < 0.03 and abs(w.std() - 1) < 0.03
    inside = np.abs(w) < 5
    back, logdet = wh.from_white(w)
    assert np.allclose(back[inside], x[inside], rtol=1e-6, atol=1e-6)
    grid = np.linspace(-4, 4, 9)
    x0, ld = wh.from_white(grid)
    x1, _ = wh.from_white(grid + 1e-6)
    assert np.allclose(np.log((x1 - x0) / 1e-6), ld, atol=1e-4)


@pytest.mark.parametrize("kind,params", [("uniform", (7.0, 12.5)), ("normal", (0.0, 1.6)), ("studentt", (2.0, 0.0, 0.3)),
                                         ("studentt", (3.0, 0.5, 1.0))])
def test_prior_whitening_in_torch(kind, params):
    """The torch map equals the numpy one (values 1e-10, log-Jacobians 1e-7 on |w| <= 5), and autograd's dx/dw equals exp(log|dx/dw|)
    (1e-8 relative): the change of variables HMC uses in the flow's coordinates is consistent."""
    from sedppl.infer.whitening import Whitener

    wh = Whitener(kind, params)
    w = torch.linspace(-5, 5, 41, dtype=torch.float64, requires_grad=True)
    x, ld = wh.from_white_torch(w)
    xn, ldn = wh.from_white(w.detach().numpy())
    assert np.allclose(x.detach().numpy(), xn, rtol=1e-10, atol=1e-10)
    assert np.allclose(ld.detach().numpy(), ldn, rtol=1e-7, atol=1e-7)  # lgamma of torch vs scipy
    (dx,) = torch.autograd.grad(x.sum(), w)
    assert torch.allclose(torch.log(dx), ld.detach().expand_as(dx), rtol=1e-8, atol=1e-8)


def test_whitened_columns_at_once_equal_site_by_site():
    """``to_constrained`` maps every whitened column in one pass (:class:`WhitenedColumns`); on a space that
    mixes every kind of prior (two Student-t dfs), event shapes and a site without a whitener, it equals the
    site-by-site torch map (float64: values 1e-10, log-Jacobians 1e-7, torch's lgamma against scipy's)."""
    from pyro.distributions import constraints

    from sedppl.infer.parameters import Site
    from sedppl.infer.whitening import Whitener

    sites = [Site("m", (), constraints.interval(7.0, 12.5), Whitener("uniform", (7.0, 12.5))),
             Site("r", (3,), constraints.real, Whitener("studentt", (2.0, 0.0, 0.3))),
             Site("free", (), constraints.positive),
             Site("z", (2,), constraints.real, Whitener("normal", (0.0, 1.6))),
             Site("s", (), constraints.real, Whitener("studentt", (5.0, 0.5, 1.0)))]
    space = ParameterSpace(sites, whiten=True)
    u = torch.randn(40, 3, space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1.5
    values, logdet = space.to_constrained(u)
    ref, ref_logdet = space.to_constrained(u, differentiable=True)  # site by site, in torch
    for name in space.names:
        assert values[name].shape == ref[name].shape == (40, 3, *dict((s.name, s.event_shape) for s in sites)[name])
        torch.testing.assert_close(values[name], ref[name].detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logdet, ref_logdet.detach(), atol=1e-7, rtol=0)


def test_student_t_closed_forms_equal_scipy():
    """df = 2 (the continuity prior) in closed form: F_t^-1(Phi(w)) equal to scipy's quantiles to 1e-12
    relative for |w| <= 35 (both tails), its inverse to 1e-12, the log density to 1e-12."""
    from scipy import special, stats

    from sedppl.infer.whitening import normal_from_t, t_from_normal, t_logpdf

    w = np.linspace(-35, 35, 1401)
    t = t_from_normal(w, 2.0)
    ref = np.where(w < 0, stats.t.ppf(special.ndtr(w), 2), stats.t.isf(special.ndtr(-w), 2))
    np.testing.assert_allclose(t, ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(normal_from_t(t, 2.0), w, rtol=0, atol=1e-12)
    # beyond |w| = 37, where Phi(-|w|) leaves float64's normal range: from logarithms. Check against
    # the t distribution's tail, 1 / (s (s + t)) with s = sqrt(t^2 + 2), taken in logarithms
    wf = np.array([-45.0, -38.0, 36.9, 37.1, 38.0, 45.0])
    tf = t_from_normal(wf, 2.0)
    assert np.all(np.isfinite(tf)) and np.all(np.sign(tf) == np.sign(wf))
    a = np.abs(tf)
    r = 2 / a / a  # 2 / t^2, without overflow
    log_tail = -2 * np.log(a) - 0.5 * np.log1p(r) - np.log1p(np.sqrt(1 + r))
    np.testing.assert_allclose(log_tail, special.log_ndtr(-np.abs(wf)), rtol=1e-12)
    tt = np.concatenate([-np.logspace(-6, 8, 50), [0.0], np.logspace(-6, 8, 50)])
    np.testing.assert_allclose(t_logpdf(tt, 2.0), stats.t.logpdf(tt, 2), rtol=1e-12, atol=1e-12)


def test_zoo_sites_are_whitened():
    from sedppl.zoo import PhotometryModel

    space = ParameterSpace.from_model(PhotometryModel(), whiten=True, redshift=0.1)
    kinds = {s.name: s.whitener.kind for s in space.sites}
    assert kinds == {"log_mass": "uniform", "log_sfr_ratio": "studentt", "zh_logit_now": "normal",
                     "zh_logit_step": "normal", "tau_bc": "uniform", "tau_ism": "uniform", "dust_index": "uniform"}


def test_bin_spectrum_noise_matches_binned_ivar():
    gen = torch.Generator().manual_seed(0)
    ivar = 1 + torch.rand(4000, 16, generator=gen) * 3
    noise = torch.randn(4000, 16, generator=gen) / torch.sqrt(ivar)
    f, iv = bin_spectrum(noise, ivar, 8)
    pulls = (f * torch.sqrt(iv)).flatten()
    assert abs(float(pulls.std()) - 1) < 0.02 and abs(float(pulls.mean())) < 0.02  # 8000 pulls: sd 0.008
    masked = ivar.clone()
    masked[:, :8] = 0
    f2, iv2 = bin_spectrum(noise, masked, 8)
    assert torch.all(iv2[:, 0] == 0) and torch.all(f2[:, 0] == 0)


def test_conditions_noise_is_the_models_noise():
    gen = torch.Generator().manual_seed(1)
    cond = ObservingConditions(photometry_floor=0.05, missing_band_probability=0.2)
    flux = 10 ** (torch.rand(5000, 5, generator=gen) * 3)
    noisy, ivar = cond.photometry(flux, gen)
    ok = ivar > 0
    pulls = ((noisy - flux) / photometry_sigma(flux, ivar.clamp(min=1e-30), 0.05))[ok]
    assert abs(float(pulls.std()) - 1) < 0.02
    assert abs(float((~ok).float().mean()) - 0.2 * (1 - 1 / 5) - 0.0) < 0.02  # one band always kept
    assert torch.all(ok.any(-1))
    spec = 1 + torch.rand(3000, 400, generator=gen)
    sn, siv = cond.spectrum(spec, gen)
    good = siv > 0
    pulls = ((sn - spec) * torch.sqrt(siv))[good]
    assert abs(float(pulls.std()) - 1) < 0.01
    snr_pix = (spec.median(-1).values / torch.sqrt(cond.bin_factor / siv.max(-1).values))
    assert 0.5 * cond.snr_spectrum[0] < float(snr_pix.min()) and float(snr_pix.max()) < 2 * cond.snr_spectrum[1]


def test_posterior_is_calibrated_and_informative(small_posterior):
    """Coverage on 400 held-out simulations within 0.1 of nominal at every level 0.05-0.95 (3 binomial
    sd at 400 sims is <= 0.075, plus a small allowance for two minutes of training; measured 0.035 on
    the highest-density regions and with TARP, SBC p 0.84 and 0.78, for the posterior CI trains on one
    thread, 2026-12-06) and SBC rank-uniformity p-values > 1e-3."""
    cal = calibrate(small_posterior, n_sims=400, n_draws=200, seed=11)
    assert cal["max_coverage_error"] < 0.1, cal
    assert cal["min_sbc_pvalue"] > 1e-3, cal["sbc_pvalue"]


def test_base_scale_restores_the_calibration_of_an_overconfident_posterior(small_posterior, small_model, tmp_path):
    """A posterior made overconfident (base N(0, 0.6^2 I): every galaxy's posterior 0.6x as wide in base
    space) misses its coverage by more than 0.15 on 400 held-out simulations (measured 0.38).
    ``fit_base_scale`` on 1,000 fresh simulations refits s by maximum likelihood, whatever base it starts
    from: close to 1 for this trained flow (|s - 1| < 0.1; measured 1.020), and the coverage is back within
    0.1, the tolerance of the test above (measured 0.035). The scale survives a save and load, and a card
    that disagrees with the weights is refused."""
    post = small_posterior
    try:
        post.set_base_scale(0.6)
        assert calibrate(post, n_sims=400, n_draws=200, seed=11)["max_coverage_error"] > 0.15
        s = fit_base_scale(post, n_sims=1000, seed=21)
        assert abs(s - 1.0) < 0.1 and post.card.base_scale == s and post.card.base_scale_sims == 1000
        assert torch.allclose(post.flow.base.scale, torch.full_like(post.flow.base.scale, s))
        assert calibrate(post, n_sims=400, n_draws=200, seed=11)["max_coverage_error"] < 0.1
        path = post.save(tmp_path / "p")
        assert float(NeuralPosterior.load(path, small_model).flow.base.scale[0]) == pytest.approx(s, rel=1e-6)
        card = path.with_suffix(".json")
        card.write_text(card.read_text().replace(f'"base_scale": {s}', '"base_scale": 2.0'))
        with pytest.raises(ValueError, match="base scale"):
            NeuralPosterior.load(path, small_model)
        with pytest.raises(ValueError, match="finite and > 0"):
            post.set_base_scale(-1.0)
    finally:
        post.set_base_scale(1.0, 0)


def test_posterior_api(small_posterior, small_model):
    mock = make_mocks(small_model, 4, seed=5, redshift=0.1, snr_photometry=30)
    idata = small_posterior.sample(mock.obs, num_samples=500, seed=0)
    post = idata.posterior
    assert post["log_mass"].shape == (1, 500, 4) and post["log_stellar_mass"].shape == (1, 500, 4)
    assert float(post["av"].min()) >= 0 and float(post["av"].max()) <= 2
    sd = post["log_mass"].std(("chain", "draw")).values
    assert np.all(sd < 4.0 / np.sqrt(12) / 4), sd  # prior sd of U(8, 12) is 1.15
    # surviving mass below mass formed, by the fraction BC03 predicts for a ~few Gyr population (0.55-0.8)
    frac = 10 ** (post["log_stellar_mass"] - post["log_mass"]).values
    assert np.all((frac > 0.5) & (frac < 0.85))
    # log densities: log_prob of the draws equals the log_q recorded while sampling
    draws = {k: torch.as_tensor(post[k].values[0, :3]) for k in ("log_mass", "av")}
    one = Observation(redshift=0.1, bands=BANDS, band_flux=mock.obs.band_flux[:1].expand(3, 5),
                      band_ivar=mock.obs.band_ivar[:1].expand(3, 5))
    lp = small_posterior.log_prob({k: v[:, 0] for k, v in draws.items()}, one)
    assert torch.allclose(lp, torch.as_tensor(idata.sample_stats["log_q"].values[0, :3, 0]), atol=1e-3)
    # without log densities: the same draws for the same seed (1e-5), and no log_q
    quick = small_posterior.sample(mock.obs, num_samples=500, seed=0, log_q=False, derived=False)
    np.testing.assert_allclose(quick.posterior["log_mass"].values, post["log_mass"].values, atol=1e-5)
    assert "sample_stats" not in quick.groups()


def test_features_first_draws_have_the_flows_density(small_posterior, small_model, monkeypatch):
    """The draws that ``torch.compile`` takes (base draws made features first and kept so through the
    group-wise inverses), run eagerly here: the recorded log q equals the flow's density of the draws
    (float32: 1e-3 nats), and the draws follow the default path's distribution."""
    mock = make_mocks(small_model, 6, seed=5, redshift=0.1, snr_photometry=30)
    with torch.no_grad():
        ctx = small_posterior.context(small_posterior.inputs(mock.obs, warn=False))
        torch.manual_seed(1)
        ref = small_posterior._flow_draws(ctx, 1000, False)[0]
        monkeypatch.setattr(autoregressive, "_parameter_major", lambda: True)
        start = small_posterior._draws_features_first(ctx, 3, True)
        assert start is not None and len(start[2]) < len(small_posterior.flow.transform.transforms)
        torch.manual_seed(2)
        x, lq = small_posterior._flow_draws(ctx, 1000, True)
        assert x.shape == ref.shape == (1000, 6, 2) and lq.shape == (1000, 6)
        torch.testing.assert_close(lq, small_posterior.flow(ctx).log_prob(x), atol=1e-3, rtol=0)
    # every marginal (6 galaxies x 2) against the default path's draws: two-sample Kolmogorov-Smirnov
    # statistic below its 1e-3 critical value, 1.95 sqrt(2 / 1000) = 0.087 (fixed seeds)
    d = [ks_2samp(x[:, g, k].numpy(), ref[:, g, k].numpy()).statistic for g in range(6) for k in range(2)]
    assert max(d) < 0.087, max(d)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_draws_have_the_eager_density(small_posterior, small_model, monkeypatch):
    """``compile()`` changes how the encoder and flow run, not what they draw: the log q recorded by the
    compiled inverse passes equals the eager flow's density of the same draws (float32: 1e-3 nats), over a
    batch whose last call is padded (25 galaxies, 20 a call), and the draws follow the eager draws'
    distribution; with the same seed, the compiled encoder and flow make the eager features-first draws (1e-4)."""
    mock = make_mocks(small_model, 25, seed=5, redshift=0.1, snr_photometry=30)
    x = small_posterior.inputs(mock.obs, warn=False)
    eager = small_posterior.draw(x, 500, log_q=False)[0]
    try:
        torch.manual_seed(0)
        u, lq = small_posterior.compile().draw(x, 500)
        assert pickle.loads(pickle.dumps(small_posterior))._compiled is None  # a copy (a Dask worker) draws eagerly
        with torch.no_grad():
            x20 = {k: None if v is None else v[:20] for k, v in x.items()}  # the shape compiled above
            torch.manual_seed(7)
            compiled = small_posterior._compiled(x20, 500, True)  # encoder and flow in one graph
            monkeypatch.setattr(autoregressive, "_parameter_major", lambda: True)
            torch.manual_seed(7)
            same = small_posterior._flow_draws(small_posterior.context(x20), 500, True)
        torch.testing.assert_close(compiled, same, atol=1e-4, rtol=0)
    finally:
        small_posterior.compile(False)
    assert u.shape == eager.shape == (500, 25, 2) and lq.shape == (500, 25)
    assert torch.isfinite(u).all() and torch.isfinite(lq).all()
    ref = small_posterior.log_prob_unconstrained(u, x)
    torch.testing.assert_close(lq, ref, atol=1e-3, rtol=0)
    # every marginal (25 galaxies x 2) of 500 compiled draws against 500 eager ones: two-sample
    # Kolmogorov-Smirnov statistic below its 1e-4 critical value, 2.23 sqrt(2 / 500) = 0.141
    # (family-wise false alarm rate 0.5% for 50 tests; fixed seeds)
    d = [ks_2samp(u[:, g, k].numpy(), eager[:, g, k].numpy()).statistic for g in range(25) for k in range(2)]
    assert max(d) < 0.141, max(d)


def test_save_load_and_errors(small_posterior, small_model, tmp_path):
    path = small_posterior.save(tmp_path / "p")
    again = NeuralPosterior.load(path, small_model)
    mock = make_mocks(small_model, 2, seed=6, redshift=0.15)
    truth = {k: mock.truth[k] for k in ("log_mass", "av")}
    assert torch.allclose(again.log_prob(truth, mock.obs), small_posterior.log_prob(truth, mock.obs), atol=1e-5)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        NeuralPosterior.load(path, small_model)
    # a redshift outside the training range, a missing redshift, wrong bands
    with pytest.raises(ValueError, match="outside the posterior's range"):
        small_posterior.sample(Observation(redshift=0.5, bands=BANDS, band_flux=mock.obs.band_flux[0],
                                     band_ivar=mock.obs.band_ivar[0]), 10)
    with pytest.raises(ValueError, match="known redshift"):
        small_posterior.sample(Observation(bands=BANDS, band_flux=mock.obs.band_flux[0], band_ivar=mock.obs.band_ivar[0]), 10)
    with pytest.raises(ValueError, match="bands"):
        small_posterior.sample(Observation(redshift=0.1, bands=BANDS[::-1], band_flux=mock.obs.band_flux[0],
                                     band_ivar=mock.obs.band_ivar[0]), 10)
    # no valid band: named by the input checks, with or without the distribution check (the compiled
    # encoder does not check)
    blank = Observation(redshift=0.1, bands=BANDS, band_flux=mock.obs.band_flux, band_ivar=mock.obs.band_ivar.clone())
    blank.band_ivar[1] = 0
    for check in (True, False):
        with pytest.raises(ValueError, match="no valid bands"):
            small_posterior.sample(blank, 10, check=check)


def test_interleaved_transforms_added_in_a_warm_start(small_posterior, small_model, tmp_path):
    """Coupling transforms over interleaved groups added to a trained posterior (a warm start)
    leave its density as it was (log q within 1e-4 nats, float32) until trained; the grown
    posterior saves and loads with the same density (1e-5)."""
    import dataclasses

    from sedppl.infer.npe_training import _warm_start

    path = small_posterior.save(tmp_path / "p")
    grown = NeuralPosterior(dataclasses.replace(small_posterior.card, interleaved_transforms=2), small_model)
    _warm_start(grown, path)
    use_fast_splines(grown.flow)  # as a loaded posterior draws (zuko's spline agrees only to rounding, ~1e-4)
    grown.flow.base.scale.fill_(small_posterior.card.base_scale)
    grown.eval()
    assert len(grown.flow.transform.transforms) == len(small_posterior.flow.transform.transforms) + 2
    mock = make_mocks(small_model, 3, seed=8, redshift=0.15)
    truth = {k: mock.truth[k] for k in ("log_mass", "av")}
    with torch.no_grad():
        ref = small_posterior.log_prob(truth, mock.obs)
        assert torch.allclose(grown.log_prob(truth, mock.obs), ref, atol=1e-4)
        again = NeuralPosterior.load(grown.save(tmp_path / "grown"), small_model)
        assert again.card.interleaved_transforms == 2
        assert torch.allclose(again.log_prob(truth, mock.obs), grown.log_prob(truth, mock.obs), atol=1e-5)
    # the other way round, the grown posterior's two transforms would be lost: an error
    with pytest.raises(ValueError, match="no place in this posterior.*--interleaved"):
        _warm_start(NeuralPosterior(small_posterior.card, small_model), tmp_path / "grown.safetensors")


def test_out_of_distribution_warning(small_posterior, small_model):
    mock = make_mocks(small_model, 1, seed=8, redshift=0.1)
    flux = mock.obs.band_flux.clone()
    flux[0, 0] *= 300  # a u band 6 mag brighter than any galaxy of the prior
    obs = Observation(redshift=0.1, bands=BANDS, band_flux=flux, band_ivar=mock.obs.band_ivar)
    with pytest.warns(UserWarning, match="outside the training distribution.*sdss_u"):
        small_posterior.sample(obs, 10, derived=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_posterior.sample(mock.obs, 10, derived=False)  # an ordinary galaxy: no warning

