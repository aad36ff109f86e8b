"""Mocks: truths from the prior, noise at the stated S/N, one galaxy picked from a batch."""

import numpy as np
import pytest
import torch

from sedppl.mocks import galaxy, make_mocks
from sedppl.zoo import PhotometryModel


@pytest.fixture(scope="module")
def model():
    return PhotometryModel()


def test_mock_noise_and_truth(model):
    mock = make_mocks(model, 400, seed=11, redshift=0.1, snr_photometry=20.0)
    # truth has latents and derived quantities, one per galaxy
    for k in ("log_mass", "tau_ism", "log_stellar_mass", "sfr_100myr"):
        assert mock.truth[k].shape[0] == 400, k
    assert "galaxies" not in mock.truth
    # normalised residuals are N(0, 1): sd within 5% (400 x 5 draws: sd of the sd ~ 1.6%)
    pull = (mock.obs.band_flux - mock.photometry) * mock.obs.band_ivar.sqrt()
    assert abs(float(pull.std()) - 1.0) < 0.05
    assert abs(float(pull.mean())) < 0.05
    # S/N per band is the stated 20
    np.testing.assert_allclose((mock.photometry * mock.obs.band_ivar.sqrt()).numpy(), 20.0, rtol=1e-4)
    # surviving mass is below mass formed
    assert torch.all(mock.truth["log_stellar_mass"] < mock.truth["log_mass"])


def test_same_seed_same_mock_and_pick(model):
    a = make_mocks(model, 3, seed=5, redshift=0.1)
    b = make_mocks(model, 3, seed=5, redshift=0.1)
    torch.testing.assert_close(a.obs.band_flux, b.obs.band_flux)
    one = galaxy(a, 1)
    torch.testing.assert_close(one.obs.band_flux[0], a.obs.band_flux[1])
    assert one.truth["log_mass"].shape == (1,)


def test_spectrum_mocks_round_trip(tmp_path):
    from sedppl.mocks import read_mocks, write_mocks
    from sedppl.zoo import SpecPhotModel

    mock = make_mocks(SpecPhotModel(), 2, seed=1, redshift=0.2, snr_spectrum=5.0)
    # median S/N per pixel is the requested 5
    snr = (mock.spectrum * mock.obs.ivar.sqrt()).median(-1).values
    torch.testing.assert_close(snr, torch.full((2,), 5.0), rtol=1e-3, atol=0)
    back = read_mocks(write_mocks(mock, tmp_path / "s.fits", "specphot"))
    torch.testing.assert_close(back.obs.flux, mock.obs.flux)
    torch.testing.assert_close(back.obs.wave, mock.obs.wave)
    torch.testing.assert_close(back.obs.redshift, mock.obs.redshift)  # fixed z is kept for the fit
    torch.testing.assert_close(back.truth["log_sfr_ratio"], mock.truth["log_sfr_ratio"])
