"""The zoo's Pyro programs: one definition simulates, conditions on one galaxy, and on many."""

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive

from sedppl.data import Observation
from sedppl.photometry import nanomaggies_to_ab
from sedppl.zoo import SDSS_BANDS, PhotometryModel, SpecPhotModel

DERIVED = ["log_stellar_mass", "sfr_10myr", "sfr_100myr", "log_ssfr_100myr", "mass_weighted_age",
           "mass_weighted_log_z"]


@pytest.fixture(scope="module")
def phot_model():
    return PhotometryModel()


def test_prior_predictive_colours(phot_model):
    """2000 prior draws at z = 0.1 in one vectorized call. Among draws with little dust
    (tau_ism + tau_bc < 0.8), 98% have g-r in [-0.1, 1.2] and r-z in [-0.1, 1.0] (SDSS galaxies:
    g-r ~ 0.2-1.0 at z ~ 0.1); more dust makes galaxies redder."""
    pyro.set_rng_seed(0)
    p = Predictive(phot_model, num_samples=1)(n_galaxies=2000, redshift=0.1)
    assert p["photometry"].shape == (1, 2000, 5)
    for name in DERIVED:
        assert p[name].shape == (1, 2000) and torch.all(torch.isfinite(p[name]))
    mag = nanomaggies_to_ab(p["photometry"][0])
    gr, rz = mag[:, 1] - mag[:, 2], mag[:, 2] - mag[:, 4]
    tau = p["tau_ism"][0] + p["tau_bc"][0]
    clean = tau < 0.8
    assert clean.sum() > 30
    for colour, lo, hi in ((gr, -0.1, 1.2), (rz, -0.1, 1.0)):
        q = torch.quantile(colour[clean], torch.tensor([0.01, 0.99]))
        assert lo < q[0] and q[1] < hi, q
    assert gr[tau > 3].median() > gr[clean].median() + 0.3
    # surviving mass below mass formed (by at most 0.4 dex: ~60% survives after 10 Gyr)
    lost = p["log_mass"][0] - p["log_stellar_mass"][0]
    assert torch.all(lost > 0) and torch.all(lost < 0.4)


def test_condition_one_and_many(phot_model):
    pyro.set_rng_seed(1)
    sim = Predictive(phot_model, num_samples=1)(n_galaxies=3, redshift=0.1)
    flux = sim["photometry"][0]
    many = Observation(redshift=torch.full((3,), 0.1), bands=SDSS_BANDS, band_flux=flux,
                       band_ivar=1 / (0.05 * flux) ** 2)
    one = Observation(redshift=0.1, bands=SDSS_BANDS, band_flux=flux[0], band_ivar=1 / (0.05 * flux[0]) ** 2)
    params = {k: sim[k][0] for k in ("log_mass", "log_sfr_ratio", "zh_logit_now", "zh_logit_step", "tau_bc",
                                       "tau_ism", "dust_index")}
    tr_many = poutine.trace(poutine.condition(phot_model, data=params)).get_trace(obs=many)
    tr_one = poutine.trace(poutine.condition(phot_model, data={k: v[:1] for k, v in params.items()})).get_trace(obs=one)
    lp_many = tr_many.nodes["photometry"]["fn"].log_prob(tr_many.nodes["photometry"]["value"])
    lp_one = tr_one.nodes["photometry"]["fn"].log_prob(tr_one.nodes["photometry"]["value"])
    assert lp_many.shape == (3,) and lp_one.shape == (1,)
    torch.testing.assert_close(lp_many[:1], lp_one, rtol=1e-5, atol=1e-4)


def test_redshift_sampled_when_unknown(phot_model):
    pyro.set_rng_seed(2)
    p = Predictive(phot_model, num_samples=1)(n_galaxies=100)
    z = p["redshift"][0]
    assert torch.all((z >= 0.01) & (z <= 0.2))


def test_spectrum_model_prior_and_errors():
    model = SpecPhotModel(ssp_rank=256)
    pyro.set_rng_seed(3)
    p = Predictive(model, num_samples=1)(n_galaxies=4, redshift=torch.tensor([0.05, 0.1, 0.2, 0.4]))
    assert p["spectrum"].shape == (1, 4, len(model.forward_model.wave_obs))
    assert p["photometry"].shape == (1, 4, 5)
    bad = Observation(redshift=1.3, bands=model.bands, band_flux=np.ones(5), band_ivar=np.ones(5))
    with pytest.raises(ValueError, match="outside the model's range"):
        poutine.trace(model).get_trace(obs=bad)
    wrong = Observation(redshift=0.1, bands=["sdss_r"], band_flux=[1.0], band_ivar=[1.0])
    with pytest.raises(ValueError, match="the model lacks"):
        model(obs=wrong)


def test_aperture_and_calibration_nuisances():
    """f_fiber scales the spectrum only; the calibration polynomial tilts it across the range."""
    model = SpecPhotModel(ssp_rank=256, fiber_fraction=(0.4, 0.05), n_calibration=2)
    pyro.set_rng_seed(4)
    tr = poutine.trace(model).get_trace(redshift=0.1)
    base = {k: v["value"] for k, v in tr.nodes.items()
            if v["type"] == "sample" and not v["is_observed"] and k not in ("spectrum", "photometry")}
    prior_f = torch.stack([poutine.trace(model).get_trace(redshift=0.1).nodes["f_fiber"]["value"] for _ in range(40)])
    assert 0.3 < prior_f.mean().item() < 0.5

    def run(f, poly):
        data = dict(base, f_fiber=torch.tensor([f]), calibration_poly=torch.tensor([poly]))
        t = poutine.trace(poutine.condition(model, data=data)).get_trace(redshift=0.1)
        return t.nodes["_RETURN"]["value"]

    a, b = run(1.0, [0.0, 0.0]), run(0.5, [0.0, 0.0])
    torch.testing.assert_close(b.spectrum, 0.5 * a.spectrum, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.photometry, a.photometry)
    c = run(1.0, [0.1, 0.0])
    ratio = (c.spectrum / a.spectrum)[0]
    assert ratio[0].item() == pytest.approx(0.9, rel=1e-4) and ratio[-1].item() == pytest.approx(1.1, rel=1e-4)
