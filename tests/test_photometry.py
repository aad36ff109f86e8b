"""Band fluxes in nanomaggies through speclite curves."""

import os

import numpy as np
import pytest
import torch

from sedppl.photometry import AB_FNU_CGS, C_AA_S, LogGridPhotometry, Photometry, ab_to_nanomaggies, nanomaggies_to_ab
from sedppl.resample import edges_from_centers


def test_flat_fnu_is_zero_ab():
    """A source of 3631 Jy at all wavelengths is 1 maggy = 1e9 nanomaggies in every band."""
    bands = ["sdss_u", "decam_g", "BASS-r", "MzLS-z", "wise_w1", "galex_nuv", "2mass_ks"]
    phot = Photometry(bands)
    wave = torch.logspace(3, 5.5, 20000, dtype=torch.float64)
    flam = AB_FNU_CGS * C_AA_S / wave**2
    out = phot(flam, edges_from_centers(wave))
    np.testing.assert_allclose(out.numpy(), 1e9, rtol=2e-4)


def test_sun_absolute_magnitudes():
    """The Sun at 10 pc (ppxf's spectrum) gives Willmer (2018, ApJS 236, 47) M_AB within 0.03 mag.

    With speclite's SDSS curves without atmosphere; with the 1.3-airmass curves
    (``sdss2010-*``) u differs by 0.04 mag.
    """
    ppxf = pytest.importorskip("ppxf")
    data = np.load(os.path.join(os.path.dirname(ppxf.__file__), "sps_models", "spectra_sun_vega.npz"))
    lam, flux = torch.tensor(data["lam"]), torch.tensor(data["flux_sun"])
    phot = Photometry([f"sdss2010noatm-{b}" for b in "ugriz"])
    mags = nanomaggies_to_ab(phot(flux, edges_from_centers(lam))).numpy()
    np.testing.assert_allclose(mags, [6.39, 5.11, 4.65, 4.53, 4.50], atol=0.03)


def test_batch_redshift_and_gradient():
    phot = Photometry(["sdss_g", "sdss_r", "sdss_i"])
    wave = torch.linspace(2000, 12000, 5000, dtype=torch.float64)
    flam = (1e-17 * (wave / 5000) ** -1.5).expand(3, -1)
    z = torch.tensor([0.05, 0.2, 0.4], dtype=torch.float64, requires_grad=True)
    edges = edges_from_centers(wave) * (1 + z[:, None]) / 1.5
    out = phot(flam, edges)
    for i in range(3):
        torch.testing.assert_close(out[i], phot(flam[i], edges[i]))
    out.sum().backward()
    assert torch.all(torch.isfinite(z.grad)) and torch.all(z.grad != 0)


def test_log_grid_photometry_grouped_equals_direct():
    """Many spectra at few redshifts (grouped per lattice shift) give the per-spectrum result
    and the direct filter integration to 1e-4, with finite gradients in flux and z."""
    phot = Photometry(["sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"])
    edges = torch.exp(torch.linspace(np.log(2000.0), np.log(12000.0), 4001, dtype=torch.float64))
    fast = LogGridPhotometry(phot, edges, (0.0, 0.5)).double()
    rng = np.random.default_rng(2)
    wave = 0.5 * (edges[1:] + edges[:-1])
    slopes = torch.tensor(rng.uniform(-2.5, 0.5, 48))
    flam = 1e-17 * (wave / 5000) ** slopes[:, None] * (1 + 0.3 * torch.sin(wave[None] / 97.0))
    flam.requires_grad_(True)
    z = torch.tensor([0.05, 0.31, 0.05] * 16, dtype=torch.float64, requires_grad=True)  # 2 redshifts, 48 spectra
    grouped = fast(flam, z)
    single = torch.stack([fast(flam[i:i + 1], z[i:i + 1])[0] for i in range(48)])  # the per-spectrum gather
    torch.testing.assert_close(grouped, single, rtol=1e-10, atol=0)
    for i in (0, 1):
        direct = phot(flam[i].detach(), edges * (1 + z[i].detach()))  # observed f_lambda on redshifted pixels
        np.testing.assert_allclose(grouped[i].detach().numpy(), direct.numpy(), rtol=1e-4)
    grouped.sum().backward()
    assert torch.isfinite(flam.grad).all() and torch.isfinite(z.grad).all() and (z.grad != 0).all()


def test_line_photometry_matches_narrow_gaussian():
    phot = Photometry(["sdss_r"])
    wave = torch.arange(5000, 7500, 0.1, dtype=torch.float64)
    center, sigma, flux = 6200.0, 1.0, 3e-15
    prof = flux * torch.exp(-0.5 * ((wave - center) / sigma) ** 2) / (sigma * (2 * np.pi) ** 0.5)
    ref = phot(prof, edges_from_centers(wave))
    got = phot.lines(torch.tensor([center], dtype=torch.float64), torch.tensor([flux], dtype=torch.float64))
    assert got.item() == pytest.approx(ref.item(), rel=1e-3)


def test_magnitude_conversions():
    f = torch.tensor([1.0, 10.0, 1e9], dtype=torch.float64)
    torch.testing.assert_close(nanomaggies_to_ab(f), torch.tensor([22.5, 20.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ab_to_nanomaggies(nanomaggies_to_ab(f)), f)


def test_errors():
    with pytest.raises(ValueError, match="unknown filter 'sdss_q'"):
        Photometry(["sdss_q"])
    phot = Photometry(["wise_w2"])
    wave = torch.linspace(3000, 9000, 100, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not cover"):
        phot(torch.ones(100, dtype=torch.float64), edges_from_centers(wave))
