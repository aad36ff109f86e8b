"""Milky Way extinction: known values of the law, continuity, dereddening."""

import numpy as np
import pytest
import torch

from sedppl.data import Observation
from sedppl.extinction import deredden, extinction_curve


def test_known_values():
    # A(V) = A_V at x = 1.82 um^-1 (5494.5 A) by construction
    assert float(extinction_curve(torch.tensor([1e4 / 1.82]))) == pytest.approx(1.0, abs=1e-6)
    # CCM89 infrared power law: A(K = 2.2 um) / A_V = 0.574 x^1.61 - 0.527 x^1.61 / 3.1 = 0.1135
    assert float(extinction_curve(torch.tensor([22000.0]))) == pytest.approx(0.1135, abs=2e-4)
    # R_V = A_V / E(B-V): A(4400 A) - A(5500 A) is E(B-V) for R_V = 3.1 within 5%
    ab, av = extinction_curve(torch.tensor([4400.0, 5500.0]))
    assert float(3.1 * (ab - av)) == pytest.approx(1.0, rel=0.05)
    # the 2175 A bump: A(2175) / A_V ~ 3 for R_V = 3.1 (CCM89 Fig. 4), a local maximum
    uv = extinction_curve(torch.tensor([1900.0, 2175.0, 2500.0]))
    assert 2.5 < float(uv[1]) < 3.5 and uv[1] > uv[0] and uv[1] > uv[2]
    # larger R_V: greyer curve (smaller UV-to-V ratio)
    assert extinction_curve(torch.tensor([2500.0]), rv=5.0) < extinction_curve(torch.tensor([2500.0]), rv=3.1)


def test_continuous_at_joins():
    # the IR / optical / UV pieces meet within 1% at x = 1.1 and 3.3 um^-1
    for x in (1.1, 3.3):
        lo, hi = extinction_curve(torch.tensor([1e4 / (x - 1e-6), 1e4 / (x + 1e-6)]))
        assert abs(float(lo / hi) - 1) < 0.01


def test_out_of_range():
    with pytest.raises(ValueError, match="defined on 1250-50000"):
        extinction_curve(torch.tensor([900.0, 5000.0]))
    with pytest.raises(ValueError, match="defined on 1250-50000"):
        extinction_curve(torch.tensor([60000.0]))


def test_wise_coefficients():
    """The infrared power law continued to WISE: A/E(B-V) = 3.1 A/A_V = 0.177 at 3.4 um (Yuan et al. 2013
    measure 0.18) and 0.107 at 4.6 um (they measure 0.16; either is < 0.02 mag at E(B-V) = 0.1)."""
    a = 3.1 * extinction_curve(torch.tensor([33680.0, 46180.0]))
    assert float(a[0]) == pytest.approx(0.177, abs=0.005)
    assert float(a[1]) == pytest.approx(0.107, abs=0.005)


def test_deredden_spectrum_and_bands():
    wave = torch.linspace(3800, 9000, 100)
    obs = Observation(redshift=0.1, wave=wave, flux=torch.ones(2, 100), ivar=torch.ones(2, 100),
                      bands=["sdss_g", "sdss_r"], band_flux=torch.ones(2, 2), band_ivar=torch.ones(2, 2))
    out = deredden(obs, torch.tensor([0.0, 0.1]))
    torch.testing.assert_close(out.flux[0], obs.flux[0])  # E(B-V) = 0 changes nothing
    a = 3.1 * 0.1 * extinction_curve(wave)
    torch.testing.assert_close(out.flux[1], (10 ** (0.4 * a)).float())
    torch.testing.assert_close(out.ivar[1] * out.flux[1] ** 2, obs.ivar[1])  # S/N unchanged
    # g is extincted more than r; A_g - A_r ~ 1.0 E(B-V) for SFD-like coefficients (3.30 - 2.31 with R_V = 3.1)
    dm = 2.5 * np.log10(out.band_flux[1].numpy())
    assert dm[0] > dm[1] and 0.08 < dm[0] - dm[1] < 0.12
    with pytest.raises(ValueError, match="E\\(B-V\\)"):
        deredden(obs, -0.1)
    with pytest.raises(ValueError, match="3 values of E\\(B-V\\) for a batch of shape \\(2,\\)"):
        deredden(obs, torch.tensor([0.1, 0.1, 0.1]))
    # one galaxy takes a scalar or a single value alike
    one = Observation(redshift=0.1, wave=wave, flux=torch.ones(100), ivar=torch.ones(100))
    torch.testing.assert_close(deredden(one, torch.tensor([0.1])).flux, out.flux[1])
    torch.testing.assert_close(deredden(one, 0.1).flux, out.flux[1])
