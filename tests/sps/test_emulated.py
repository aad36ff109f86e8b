"""The emulated SPS as a drop-in: the shipped emulator meets its card, the emulated zoo model agrees
with the exact one, batches equal loops, gradients flow, engines run, bad uses are refused."""

import json
import warnings

import numpy as np
import pytest
import torch
from pyro import poutine

from sedppl.emulator import SpectrumEmulator, fractional_errors
from sedppl.emulators import PHOT_REST_RANGE, SHIPPED, shipped_emulators
from sedppl.sfh import continuity_edges
from sedppl.sps.emulated import (
    EmulatedSynthesis,
    _model_bins,
    emulator_inputs,
    exact_simulator,
    prior_histories,
    train_branch_emulator,
)
from sedppl.zoo import SDSS_BANDS, PhotometryModel, SpecPhotModel


@pytest.fixture(scope="module")
def models():
    return PhotometryModel(), PhotometryModel(sps="emulated")


def _histories(model, n, seed):
    """(mass, edges, logz, z) of ``n`` prior draws of ``model`` (and the trace to replay them)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(n_galaxies=n)
    edges = tr.nodes["sfh_edges"]["value"]
    mass = tr.nodes["sfh_sfr"]["value"] * torch.diff(edges, dim=-1) * 1e9
    return mass, edges, tr.nodes["zh_log_z"]["value"], tr


@pytest.mark.parametrize("key,branch", [(k, b) for k, branches in SHIPPED.items() for b in branches])
def test_shipped_emulator_meets_its_card(key, branch):
    """Every shipped emulator, on 1,500 prior draws of its model never used in training (seed 123):
    per-pixel |df/f| of the older stars' light, median and 99th percentile within 25% of the card's
    validation figures (5,000 draws), and the surviving-fraction output within 2x its card's maximum
    error. The draws are its model's own prior; the exact synthesis runs in float64. Photometry grids
    are checked over the whole grid they were trained on: the model's own, or one widened to 2000 A - 6 um
    (``PHOT_REST_RANGE``)."""
    cls = {"phot": PhotometryModel, "specphot": SpecPhotModel}[key]
    path = shipped_emulators(key)[branch]
    emu = SpectrumEmulator.load(path)
    card = json.loads(path.with_suffix(".json").read_text())
    model = cls()
    if len(card["wave"]) > len(getattr(model.forward_model, branch).wave):
        model = cls(phot_rest_range=PHOT_REST_RANGE)
    np.testing.assert_allclose(card["wave"], getattr(model.forward_model, branch).wave.double().numpy(), rtol=1e-6)
    n_bins = _model_bins(model)
    theta = prior_histories(model, n_bins)(1500, torch.Generator().manual_seed(123))
    log_flux, scalars = exact_simulator(getattr(model.forward_model, branch).stars, n_bins)(theta)
    with torch.no_grad():
        pred, sc = emu(theta.float())
    err = fractional_errors(pred, log_flux)
    acc = card["accuracy"]
    assert np.median(err) < 1.25 * acc["median_abs_frac"], (np.median(err), acc["median_abs_frac"])
    assert np.percentile(err, 99) < 1.25 * acc["p99_abs_frac"], (np.percentile(err, 99), acc["p99_abs_frac"])
    assert float((sc.double() - scalars).abs().max()) < 2 * acc["scalars_max_abs"]
    # issue 4's goal over 2000-10000 A, met by every shipped emulator (10,000 draws: ugriz to 6 um
    # 0.057% / 0.67%, g-W2 to 6 um 0.053% / 0.67%, DESI spectrum grid (two blended wavelength chunks)
    # 0.060% / 0.76%; 2026-11-28)
    wave = np.asarray(card["wave"])
    goal = err[:, (wave >= 2000) & (wave <= 10000)]
    print(f"{key}/{branch}: 2000-10000 A median {np.median(goal):.2e}, 99th percentile {np.percentile(goal, 99):.2e}")
    assert np.median(goal) < 1e-3 and np.percentile(goal, 99) < 1e-2, (np.median(goal), np.percentile(goal, 99))


def test_wider_emulator_serves_a_run_of_its_pixels(models):
    """The shipped ugriz emulator spans 2000 A - 6 um; the model's own grid (2425-11143 A) is a run of
    its pixels, and the emulated synthesis rebuilds that run alone: equal (float32, 1e-6) to the whole
    emulated spectrum cut to it. A model with WISE W1 added (same first pixel, longer grid) takes the
    same file; a grid that starts between its pixels is refused."""
    _, emulated = models
    synth = emulated.forward_model.phot.stars
    wave = synth.emulator.wave.numpy()
    assert wave[0] <= PHOT_REST_RANGE[0] < wave[1] and wave[-1] >= PHOT_REST_RANGE[1]  # issue 4: 2000 A - 6 um
    pixels = synth.pixels
    assert pixels is not None and pixels.start > 0 and pixels.stop < len(wave)
    np.testing.assert_allclose(wave[pixels], synth.wave.double().numpy(), rtol=1e-6)
    mass, edges, logz, _ = _histories(emulated, 3, seed=9)
    with torch.no_grad():
        old = synth(mass, edges, logz, edges[:, -1]).old
        full, _ = synth.emulator(emulator_inputs(mass, edges, logz))
    torch.testing.assert_close(old, torch.exp(full[:, pixels]) * mass.sum(-1, keepdim=True), rtol=1e-5, atol=0)
    w1 = PhotometryModel(bands=[*SDSS_BANDS, "wise_w1"], sps="emulated")
    w1_synth = w1.forward_model.phot.stars
    assert w1_synth.pixels.start == pixels.start and w1_synth.pixels.stop > pixels.stop
    with pytest.raises(ValueError, match="run of its pixels"):
        PhotometryModel(bands=SDSS_BANDS[1:], sps="emulated")  # starts at g's blue edge


def test_emulated_model_photometry_matches_exact(models):
    """The same 500 prior draws through the exact and the emulated PhotometryModel: ugriz fluxes agree to
    0.2% in the median and 1.2% at the 99th percentile (measured with the shipped emulator: 0.09% and
    0.60%; the photometry model's own error floor is 2%); masses are exact in both."""
    exact, emulated = models
    _, _, _, tr = _histories(exact, 500, seed=7)
    with torch.no_grad():
        out_ex = poutine.replay(exact, trace=tr)(n_galaxies=500)
        out_em = poutine.replay(emulated, trace=tr)(n_galaxies=500)
    rel = (out_em.photometry / out_ex.photometry - 1).abs().numpy()
    assert np.median(rel) < 0.002, np.median(rel)
    assert np.percentile(rel, 99) < 0.012, np.percentile(rel, 99)
    torch.testing.assert_close(out_em.surviving_mass, out_ex.surviving_mass, rtol=1e-6, atol=0)


def test_emulated_specphot_model_matches_exact():
    """SpecPhotModel with both shipped emulators (spectrum grid 1711-9826 A, photometry grid 1792 A -
    5.6 um) against the exact model on the same 200 prior draws (0.002 <= z <= 1.1): band fluxes
    (g, r, z, W1, W2) agree to 0.2% in the median and 1.5% at the 99th percentile, spectrum pixels to
    0.2% / 2% (measured 2026-11-27 with the two-chunk spectrum emulator: 0.049% / 0.54% and 0.062% /
    0.61% on 100 draws of the benchmark; 0.094% / 0.84% with the one-chunk emulator before it); masses
    are exact in both."""
    exact, emulated = SpecPhotModel(), SpecPhotModel(sps="emulated")
    assert emulated.forward_model.emulated == ["spec", "phot"]
    _, _, _, tr = _histories(exact, 200, seed=8)
    with torch.no_grad():
        out_ex = poutine.replay(exact, trace=tr)(n_galaxies=200)
        out_em = poutine.replay(emulated, trace=tr)(n_galaxies=200)
    rel = (out_em.photometry / out_ex.photometry - 1).abs().numpy()
    assert np.median(rel) < 0.002 and np.percentile(rel, 99) < 0.015, (np.median(rel), np.percentile(rel, 99))
    # pixels attenuated to ~0 (tau up to 3 on a blue rest frame) hold float32 rounding of either sign
    ok = out_ex.spectrum > 1e-3 * out_ex.spectrum.abs().median(-1, keepdim=True).values
    rel = (out_em.spectrum[ok] / out_ex.spectrum[ok] - 1).abs().numpy()
    assert np.median(rel) < 0.002 and np.percentile(rel, 99) < 0.02, (np.median(rel), np.percentile(rel, 99))
    torch.testing.assert_close(out_em.surviving_mass, out_ex.surviving_mass, rtol=1e-6, atol=0)


def test_emulated_synthesis_batch_equals_loop_and_gradients(models):
    exact, emulated = models
    synth = emulated.forward_model.phot.stars
    assert isinstance(synth, EmulatedSynthesis) and emulated.forward_model.emulated == ["phot"]
    mass, edges, logz, _ = _histories(exact, 4, seed=3)
    t_univ = edges[:, -1]
    batch = synth(mass, edges, logz, t_univ)
    for i in range(4):
        one = synth(mass[i], edges[i], logz[i], t_univ[i])
        torch.testing.assert_close(one.old, batch.old[i], rtol=1e-5, atol=0)
        torch.testing.assert_close(one.young, batch.young[i], rtol=1e-5, atol=0)
    m = mass.clone().requires_grad_(True)
    z = logz.clone().requires_grad_(True)
    pop = synth(m, edges, z, t_univ)
    torch.log(pop.old + pop.young).sum().backward()
    for g in (m.grad, z.grad):
        assert torch.isfinite(g).all() and (g != 0).any()


def test_young_light_is_exact(models):
    """The young stars' light of the emulated synthesis is the exact synthesis' (1e-5)."""
    exact, emulated = models
    mass, edges, logz, _ = _histories(exact, 8, seed=4)
    ex = exact.forward_model.phot.stars(mass, edges, logz, edges[:, -1])
    em = emulated.forward_model.phot.stars(mass, edges, logz, edges[:, -1])
    torch.testing.assert_close(em.young, ex.young, rtol=1e-5, atol=1e-12)


def test_bad_uses_are_refused(models):
    exact, emulated = models
    synth = emulated.forward_model.phot.stars
    mass, edges, logz, _ = _histories(exact, 2, seed=5)
    other = edges.clone()
    other[:, 3] *= 1.2  # not the continuity bins
    with pytest.raises(ValueError, match="continuity"):
        synth(mass, other, logz, edges[:, -1])
    with pytest.raises(ValueError, match="grid"):  # the photometry emulator of another model's grid
        SpecPhotModel(sps={"phot": shipped_emulators("phot")["phot"]})
    with pytest.raises(ValueError, match="no shipped emulator"):
        shipped_emulators("my_model")
    with pytest.raises(ValueError, match="sps must be"):
        PhotometryModel(sps="fast")
    theta = emulator_inputs(mass, edges, logz)
    theta[0, -1] = 3.5  # t_univ = 33 Gyr: outside the trained box
    with pytest.warns(UserWarning, match="outside the trained range for ln_t_univ_gyr"):
        synth.emulator(theta)
    theta[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        synth.emulator(theta)


def test_engines_run_on_the_emulated_model(models):
    """NUTS (Pyro) and the shipped amortized posterior take the emulated model as they take the exact one."""
    from sedppl.infer.nuts import run_nuts
    from sedppl.mocks import make_mocks
    from sedppl.posteriors import load_shipped

    exact, emulated = models
    obs = make_mocks(exact, 1, seed=2, redshift=0.1, snr_photometry=30).obs
    idata = run_nuts(emulated, obs=obs, num_samples=10, warmup_steps=10, num_chains=1, map_steps=10,
                     map_restarts=1, max_tree_depth=3, laplace=False, jit_compile=False, progress=False,
                     num_prior=20)
    assert np.isfinite(idata.posterior["log_stellar_mass"].values).all()
    post = load_shipped("phot", model=emulated)
    draws = post.sample(obs, 200, predictive=10)
    assert np.isfinite(draws.posterior["log_stellar_mass"].values).all()


def test_engines_run_on_the_emulated_specphot_model():
    """The fully emulated DESI-like model (both grids) as a drop-in: the shipped amortized posterior
    (trained on the exact model) and batched HMC in its flow's coordinates run on it unchanged; the
    amortized posterior-predictive spectra of a mock from the exact model fit it there (chi2/dof of
    the median draw < 2; measured 1.0229 with either synthesis: the mock's noise is white, S/N 3 per pixel)."""
    from sedppl.infer.hmc import run_hmc
    from sedppl.mocks import make_mocks
    from sedppl.posteriors import load_shipped

    emulated = SpecPhotModel(sps="emulated")
    mock = make_mocks(SpecPhotModel(), 1, seed=2, redshift=0.3)
    post = load_shipped("specphot", model=emulated)
    draws = post.sample(mock.obs, 200, predictive=20, seed=0)
    assert np.isfinite(draws.posterior["log_stellar_mass"].values).all()
    model_spec = np.median(draws.posterior_predictive["spectrum"].values[0, :, 0], axis=0)
    ivar = mock.obs.ivar[0].numpy()
    chi2 = float(np.sum((mock.obs.flux[0].numpy() - model_spec) ** 2 * ivar) / np.count_nonzero(ivar))
    assert chi2 < 2.0, chi2
    idata = run_hmc(emulated, obs=mock.obs, num_samples=4, warmup_steps=4, num_chains=2, seed=1,
                    posterior=post, max_steps=8, progress=False)
    assert np.isfinite(idata.posterior["log_stellar_mass"].values).all()


def _log_joint(model, values, obs):
    """log p(theta, x) per draw, (N,) float64, at N draws of one galaxy (sedppl.infer.importance.log_joint)."""
    from sedppl.infer.importance import log_joint

    return log_joint(model, {k: v[:, None] for k, v in values.items()}, obs)[:, 0]


def test_emulated_posterior_agrees_with_exact(models):
    """Posterior means with the emulated and the exact synthesis, on the same mocks, agree within 0.1
    posterior sd for stellar mass, sSFR, age and the dust parameters.

    Both posteriors are estimated from the same 4,000 draws of the shipped amortized posterior by
    importance weighting (weights p(theta, x) / q(theta | x) under each model), so the comparison is
    paired and not limited by independent Monte Carlo noise. 3 ugriz mocks at S/N 30, z = 0.1, seed 21;
    the weights' effective sample size must be >= 40 for the estimate to count."""
    from sedppl.mocks import galaxy, make_mocks
    from sedppl.posteriors import load_shipped

    exact, emulated = models
    post = load_shipped("phot", model=exact)
    mocks = make_mocks(exact, 3, seed=21, redshift=0.1, snr_photometry=30)
    latent = ["log_mass", "log_sfr_ratio", "zh_logit_now", "zh_logit_step", "tau_bc", "tau_ism", "dust_index"]
    for i in range(3):
        obs = galaxy(mocks, i).obs
        idata = post.sample(obs, 4000, seed=i)
        values = {k: torch.as_tensor(idata.posterior[k].values[0, :, 0]) for k in latent}
        log_q = torch.as_tensor(idata.sample_stats["log_q"].values[0, :, 0]).double()
        w_exact = torch.softmax(_log_joint(exact, values, obs) - log_q, 0)
        w_emulated = torch.softmax(_log_joint(emulated, values, obs) - log_q, 0)
        assert 1 / (w_exact**2).sum() >= 40
        for name in ["log_stellar_mass", "log_ssfr_100myr", "mass_weighted_age", "tau_bc", "tau_ism", "dust_index"]:
            f = torch.as_tensor(idata.posterior[name].values[0, :, 0]).double()
            mean = (w_exact * f).sum()
            sd = (w_exact * (f - mean) ** 2).sum().sqrt()
            shift = float(((w_emulated * f).sum() - mean) / sd)
            assert abs(shift) < 0.1, (i, name, shift)


def test_train_branch_emulator_tiny(tmp_path):
    """The training pipeline on a tiny budget: inputs named (with the SSP metallicity grid as grid inputs),
    the model's grid on the card, and the
    result plugs into the model (accuracy is the shipped emulator's test)."""
    model = PhotometryModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emu = train_branch_emulator(model, "phot", tmp_path / "emu", n_train=300, n_valid=100, n_components=8,
                                    hidden=(32,), schedule=((1e-3, 64),), max_epochs=2, progress=False)
    assert emu.card.param_names[0] == "log_mass_fraction_0" and emu.card.param_names[-1] == "ln_t_univ_gyr"
    # the synthesis interpolates linearly in log Z: the network also sees its hat weights on the SSP grid
    assert emu.card.grid_inputs == list(range(7, 14))
    np.testing.assert_allclose(emu.card.input_grid, model.forward_model.phot.stars.log_z.double().numpy())
    np.testing.assert_allclose(emu.card.wave, model.forward_model.phot.wave.double().numpy(), rtol=1e-7)
    assert emu.card.accuracy["median_abs_frac"] > 0
    model.forward_model.use_emulators(phot=tmp_path / "emu.safetensors")
    edges = continuity_edges(torch.tensor([12.0]), 7)  # inside the trained t_univ range (z 0.01-0.2)
    pop = model.forward_model.phot.stars(torch.ones(1, 7), edges, torch.zeros(1, 7), edges[:, -1])
    assert torch.isfinite(pop.old).all() and (pop.old > 0).all()
    with pytest.raises(ValueError, match="no 'nope' branch"):
        train_branch_emulator(model, "nope", tmp_path / "x")
