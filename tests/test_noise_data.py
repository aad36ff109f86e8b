"""Likelihoods and the Observation container."""

import numpy as np
import pytest
import torch
from pyro import poutine

from sedppl.data import Observation
from sedppl.noise import observe_photometry, observe_spectrum


def log_prob(fn, *args, **kwargs):
    tr = poutine.trace(fn).get_trace(*args, **kwargs)
    return tr.log_prob_sum().item()


def test_gaussian_value_and_masking():
    model = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    flux = torch.tensor([1.5, 1.0, 3.0, float("nan")], dtype=torch.float64)
    ivar = torch.tensor([4.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    lp = log_prob(observe_spectrum, "s", model, flux, ivar)
    sig = 1 / np.sqrt([4.0, 1.0, 2.0])
    ref = np.sum(-0.5 * ((np.array([1.5, 1.0, 3.0]) - [1, 2, 3]) / sig) ** 2 - np.log(sig * np.sqrt(2 * np.pi)))
    assert lp == pytest.approx(ref)
    # a False mask drops a pixel exactly
    mask = torch.tensor([True, False, True, True])
    lp_m = log_prob(observe_spectrum, "s", model, flux, ivar, mask)
    dropped = -0.5 * 1.0 - np.log(np.sqrt(2 * np.pi))
    assert lp_m == pytest.approx(ref - dropped)


def test_jitter_and_student_t():
    model = torch.zeros(50, dtype=torch.float64)
    flux = torch.full((50,), 3.0, dtype=torch.float64)
    flux[0] = 50.0  # an outlier
    ivar = torch.ones(50, dtype=torch.float64)
    g = log_prob(observe_spectrum, "s", model, flux, ivar)
    j = log_prob(observe_spectrum, "s", model, flux, ivar, jitter=3.0)
    t = log_prob(observe_spectrum, "s", model, flux, ivar, student_df=3.0)
    assert j > g and t > g  # both explain 3-sigma residuals and the outlier better


def test_photometry_floor():
    model = torch.tensor([100.0], dtype=torch.float64)
    flux = torch.tensor([110.0], dtype=torch.float64)
    ivar = torch.tensor([1.0], dtype=torch.float64)
    lp = log_prob(observe_photometry, "p", model, flux, ivar, floor=0.05)
    sig = np.sqrt(1 + 25.0)
    assert lp == pytest.approx(-0.5 * (10 / sig) ** 2 - np.log(sig * np.sqrt(2 * np.pi)))


@pytest.mark.parametrize("change,message", [
    ("nan_flux", "NaN or infinite flux"), ("neg_ivar", "must be >= 0"), ("unsorted", "strictly increasing"),
    ("all_masked", "every pixel"), ("shape", "mismatched shapes"), ("nothing", "neither"),
    ("bands", "band fluxes for"), ("neg_z", "redshift"),
])
def test_observation_errors(change, message):
    kw = dict(redshift=0.1, wave=np.arange(4000.0, 4010.0), flux=np.ones(10), ivar=np.ones(10),
              bands=["sdss_r"], band_flux=[10.0], band_ivar=[1.0])
    if change == "nan_flux":
        kw["flux"] = np.r_[np.nan, np.ones(9)]
    elif change == "neg_ivar":
        kw["ivar"] = np.r_[-1.0, np.ones(9)]
    elif change == "unsorted":
        kw["wave"] = np.r_[4001.0, 4000.0, np.arange(4002.0, 4010.0)]
    elif change == "all_masked":
        kw["ivar"] = np.zeros(10)
    elif change == "shape":
        kw["ivar"] = np.ones(9)
    elif change == "nothing":
        kw = dict(redshift=0.1)
    elif change == "bands":
        kw["bands"] = ["sdss_r", "sdss_g"]
    elif change == "neg_z":
        kw["redshift"] = -0.2
    with pytest.raises(ValueError, match=message):
        Observation(**kw)


def test_nan_flux_allowed_where_masked():
    obs = Observation(redshift=0.1, wave=np.arange(4000.0, 4010.0), flux=np.r_[np.nan, np.ones(9)],
                      ivar=np.r_[0.0, np.ones(9)])
    assert obs.has_spectrum and not obs.has_photometry
    with pytest.raises(ValueError, match="lacks"):
        Observation(redshift=0.1, bands=["sdss_u"], band_flux=[1.0], band_ivar=[1.0]).check_bands(["sdss_r"])


def test_observation_concat():
    """Several observations make one batch in order: each part's rows come back unchanged (select), a mask
    present in one part only keeps every pixel of the others, and parts that cannot share a batch (another
    wavelength grid, other bands, a redshift given for one only) raise an error that names the part."""
    wave = torch.linspace(4000, 5000, 20)
    a = Observation(redshift=0.1, wave=wave, flux=torch.ones(20), ivar=torch.full((20,), 4.0), name="a")
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :3] = False
    b = Observation(redshift=torch.tensor([0.2, 0.3]), wave=wave, flux=torch.rand(2, 20), ivar=torch.ones(2, 20),
                    mask=mask, name=["b", "c"])
    both = Observation.concat([a, b])
    assert both.n_galaxies == 3 and both.name == ["a", "b", "c"]
    torch.testing.assert_close(both.redshift, torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(both.flux[1:], b.flux)
    torch.testing.assert_close(both.ivar[0], a.ivar)
    assert both.mask[0].all() and torch.equal(both.mask[1:], mask)
    with pytest.raises(ValueError, match="observation 1 has another wavelength grid"):
        Observation.concat([a, Observation(redshift=0.1, wave=wave + 1, flux=torch.ones(20), ivar=torch.ones(20))])
    with pytest.raises(ValueError, match="observation 1 lacks a redshift"):
        Observation.concat([a, Observation(wave=wave, flux=torch.ones(20), ivar=torch.ones(20))])
    phot = Observation(redshift=0.1, bands=["sdss2010-r"], band_flux=torch.ones(1), band_ivar=torch.ones(1))
    with pytest.raises(ValueError, match="observation 1 holds other data"):
        Observation.concat([a, phot])
