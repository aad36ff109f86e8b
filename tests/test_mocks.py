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
