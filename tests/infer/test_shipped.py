"""The shipped amortized posterior loads and reproduces the calibration figures on its card."""

import json

import numpy as np
import pytest

from sedppl.infer.npe_calibration import calibrate
from sedppl.mocks import make_mocks
from sedppl.posteriors import SHIPPED, load_shipped, shipped_path


@pytest.mark.parametrize("key", sorted(SHIPPED))
def test_shipped_posterior_reproduces_its_card(key):
    post = load_shipped(key)
    card = json.loads(shipped_path(key).with_suffix(".json").read_text())
    cal0 = card["calibration"]
    assert cal0["n_sims"] >= 1000
    # SBC ranks uniform per dimension (chi-square test, p > 1e-3) and central intervals within 3%; the
    # spectrum posterior's diffuse-dust parameters are exempt: dust_index fails the rank test (p = 2.4e-4;
    # tau_ism passes since the interleaved transforms, 0.099) on the conservative side: their central 68%
    # intervals cover 75% and 72%
    dust = {"dust_index", "tau_ism"} if key == "specphot" else set()
    assert all(p > 1e-3 for k, p in cal0["sbc_pvalue"].items() if k not in dust), cal0["sbc_pvalue"]
    assert all(cal0["central_68"][k] >= 0.68 for k in dust)
    assert all(abs(v - 0.95) < 0.03 for v in cal0["central_95"].values())
    cal = calibrate(post, n_sims=cal0["n_sims"], n_draws=cal0["n_draws"])
    # same held-out set and seeds: the figures agree up to float round-off across machines
    assert np.allclose(cal["expected_coverage"], cal0["expected_coverage"], atol=0.01)
    assert np.allclose(cal["tarp"], cal0["tarp"], atol=0.01)
    assert cal["max_coverage_error"] <= cal0["max_coverage_error"] + 0.01
    # the goal, coverage within 0.05 at every level, met by both with their base widths refitted
    # on 2,000 fresh simulations (card: base_scale, within 5% of 1 either way; measured 0.032 (ugriz) and 0.042 (DESI);
    # an earlier spectrum posterior reached 0.068 before the refit, its joint HPD regions too small
    # around the 85-90% levels)
    assert post.card.base_scale_sims == 2000 and 0.95 < post.card.base_scale < 1.05
    assert cal["max_coverage_error"] < 0.05


def test_shipped_posterior_recovers_mock_masses():
    """Stellar masses of 50 prior mocks (z = 0.1, S/N 30 per band): the truth inside the central 68% interval
    for 68% +- 20% (3 binomial sd at 50) of them, and posterior widths below 0.35 dex for S/N-30 ugriz."""
    post = load_shipped("phot")
    mock = make_mocks(post.model, 50, seed=4, redshift=0.1, snr_photometry=30)
    idata = post.sample(mock.obs, 500, seed=0)
    m = idata.posterior["log_stellar_mass"].values[0]
    lo, hi = np.percentile(m, [16, 84], axis=0)
    truth = mock.truth["log_stellar_mass"].numpy()
    assert abs(np.mean((lo <= truth) & (truth <= hi)) - 0.68) < 0.2
    assert np.median(hi - lo) / 2 < 0.35


def test_spectrum_posterior_checks_the_wavelength_grid_every_call():
    """The DESI posterior compares an observation's wavelengths with its card's grid (kept as an array
    after the first call): a grid shifted by 0.5 A, beyond the tolerance (1e-3 A + 1e-5 of the wavelength),
    raises every time, before and after a call on the right grid, and a shift of 5e-4 A passes."""
    import dataclasses

    from sedppl.mocks import galaxy

    post = load_shipped("specphot")
    obs = galaxy(make_mocks(post.model, 1, seed=3, redshift=0.1), 0).obs
    shifted = dataclasses.replace(obs, wave=obs.wave + 0.5)
    with pytest.raises(ValueError, match="not the one this posterior was trained on"):
        post.inputs(shifted, warn=False)
    assert post.inputs(obs, warn=False)["spectrum"].shape == (1, len(post.card.wave) // post.card.bin_factor)
    assert post.inputs(dataclasses.replace(obs, wave=obs.wave + 5e-4), warn=False) is not None
    with pytest.raises(ValueError, match="not the one this posterior was trained on"):
        post.inputs(shifted, warn=False)


def test_spectrum_posterior_flags_the_spectral_snr_outside_its_training():
    """The DESI posterior's distribution check takes the median S/N per pixel over the valid bins only:
    a mock at S/N 3 per pixel passes with or without 60% of its pixels masked (ivar = 0; a median over
    all bins would be 0 and flag it), and one at S/N 10,000 (beyond twice the trained highest) is flagged."""
    from sedppl.mocks import galaxy

    post = load_shipped("specphot")
    lo, hi = post.conditions.snr_spectrum
    assert 2 * hi < 1e4
    ordinary = galaxy(make_mocks(post.model, 1, seed=3, redshift=0.1, snr_spectrum=3.0), 0).obs
    loud = galaxy(make_mocks(post.model, 1, seed=3, redshift=0.1, snr_spectrum=1e4), 0).obs
    x = post.inputs(ordinary, warn=False)
    masked = dict(x, spectrum_ivar=x["spectrum_ivar"].clone())
    masked["spectrum_ivar"][:, : int(0.6 * masked["spectrum_ivar"].shape[1])] = 0
    for inputs, flagged in ((x, False), (masked, False), (post.inputs(loud, warn=False), True)):
        flags, why = post.ood_reasons(inputs)
        assert flags.tolist() == [flagged] and any("median S/N per pixel" in w for w in why) == flagged, why
