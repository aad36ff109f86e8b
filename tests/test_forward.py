"""The assembled forward model: redshift scaling, photometry consistency, batching, dtypes, gradients, errors."""

import numpy as np
import pytest
import torch

from sedppl.forward import ForwardModel
from sedppl.photometry import Photometry
from sedppl.resample import resample

WAVE = np.arange(3600.0, 9824.0, 0.8)  # DESI-like, vacuum
BANDS = ["decam_g", "decam_r", "decam_z", "wise_w1", "wise_w2"]


@pytest.fixture(scope="module")
def model(grid):
    return ForwardModel(grid, wave_obs=WAVE, bands=BANDS, z_range=(0.01, 0.6), resolving_power=3000).double()


def galaxy(b=None, dtype=torch.float64):
    edges = torch.tensor([0.0, 0.03, 0.1, 0.33, 1.08, 3.0, 6.0], dtype=dtype)
    mass = torch.tensor([1.0, 3.0, 10.0, 20.0, 40.0, 60.0], dtype=dtype) * 1e8
    logz = torch.tensor([0.1, 0.0, 0.0, -0.2, -0.4, -0.6], dtype=dtype)
    if b is not None:
        g = torch.Generator().manual_seed(11)
        mass = mass * (0.5 + torch.rand(b, 6, generator=g, dtype=dtype))
        logz = logz + 0.3 * torch.rand(b, 6, generator=g, dtype=dtype)
        edges = edges.expand(b, 7)
    return mass, edges, logz


def test_flux_scales_with_distance_and_redshift(grid):
    """int f_lambda dlambda_obs over a fixed rest-frame window is L / (4 pi d_L^2): the (1+z) of
    f_lambda cancels the stretch of the window."""
    fm = ForwardModel(grid, wave_obs=np.arange(3000.0, 11000.0, 1.0), z_range=(0.01, 1.0), nebular=False).double()
    mass, edges, logz = galaxy()
    rest = torch.tensor([4200.0, 6800.0], dtype=torch.float64)
    vals = []
    for z in (0.05, 0.3, 0.55):
        zt = torch.tensor(z, dtype=torch.float64)
        out = fm(mass, edges, logz, zt)
        band = resample(out.spectrum, fm.edges_obs, rest * (1 + z))  # mean f_lambda over the window
        integral = band * (rest[1] - rest[0]) * (1 + z)
        vals.append((integral * fm.cosmology.luminosity_distance(zt) ** 2).item())
    np.testing.assert_allclose(vals, vals[0], rtol=2e-4)  # window edges fall within pixels


def test_linear_in_mass(model):
    mass, edges, logz = galaxy()
    z = torch.tensor(0.1, dtype=torch.float64)
    a = model(mass, edges, logz, z, av=0.3, dust_index=-0.2, av_bc=0.4, sigma_v=120.0)
    b = model(2.5 * mass, edges, logz, z, av=0.3, dust_index=-0.2, av_bc=0.4, sigma_v=120.0)
    torch.testing.assert_close(b.spectrum, 2.5 * a.spectrum, rtol=1e-10, atol=0)
    torch.testing.assert_close(b.photometry, 2.5 * a.photometry, rtol=1e-10, atol=0)
    torch.testing.assert_close(b.surviving_mass, 2.5 * a.surviving_mass, rtol=1e-10, atol=0)


def test_photometry_consistent_with_spectrum(grid):
    """Bands inside the spectral range: filters applied to the fine model spectrum agree with the
    coarse photometry branch within 0.5% (no broadening, so the two see the same SED)."""
    fm = ForwardModel(grid, wave_obs=WAVE, bands=["decam_g", "decam_r"], z_range=(0.01, 0.6)).double()
    mass, edges, logz = galaxy()
    for z in (0.05, 0.2):
        out = fm(mass, edges, logz, torch.tensor(z, dtype=torch.float64), av=0.4, av_bc=0.5, log_u=-2.5)
        direct = Photometry(["decam_g", "decam_r"])(out.spectrum * 1e-17, fm.edges_obs)
        np.testing.assert_allclose(out.photometry.numpy(), direct.numpy(), rtol=5e-3)


def test_batch_equals_loop(model):
    b = 4
    mass, edges, logz = galaxy(b)
    z = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)
    av = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
    n = torch.tensor([-0.5, 0.0, 0.2, -1.0], dtype=torch.float64)
    sv = torch.tensor([50.0, 100.0, 200.0, 300.0], dtype=torch.float64)
    lu = torch.tensor([-3.5, -3.0, -2.0, -1.0], dtype=torch.float64)
    out = model(mass, edges, logz, z, av=av, dust_index=n, av_bc=av, log_u=lu, sigma_v=sv)
    for i in range(b):
        one = model(mass[i], edges[i], logz[i], z[i], av=av[i], dust_index=n[i], av_bc=av[i],
                    log_u=lu[i], sigma_v=sv[i])
        torch.testing.assert_close(out.spectrum[i], one.spectrum, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out.photometry[i], one.photometry, rtol=1e-9, atol=0)


def test_float32_matches_float64(grid):
    fm32 = ForwardModel(grid, wave_obs=WAVE, bands=BANDS, z_range=(0.01, 0.6), resolving_power=3000)
    fm64 = ForwardModel(grid, wave_obs=WAVE, bands=BANDS, z_range=(0.01, 0.6), resolving_power=3000).double()
    kw = dict(av=0.3, dust_index=-0.3, av_bc=0.3, sigma_v=150.0)
    a = fm32(*galaxy(dtype=torch.float32), torch.tensor(0.2), **kw)
    b = fm64(*galaxy(), torch.tensor(0.2, dtype=torch.float64), **kw)
    assert a.spectrum.dtype == torch.float32
    # float32 carries ~1e-7 relative error per operation over sums of ~1500 SSPs: 1e-4 allowed
    np.testing.assert_allclose(a.spectrum.numpy(), b.spectrum.numpy(), rtol=1e-4, atol=1e-4 * b.spectrum.abs().max().item())
    np.testing.assert_allclose(a.photometry.numpy(), b.photometry.numpy(), rtol=1e-4)


def test_gradients_finite(model):
    mass, edges, logz = galaxy()
    inputs = dict(mass=mass.clone(), edges=edges.clone(), logz=logz.clone(),
                  z=torch.tensor(0.12, dtype=torch.float64), av=torch.tensor(0.3, dtype=torch.float64),
                  dust_index=torch.tensor(-0.2, dtype=torch.float64), av_bc=torch.tensor(0.5, dtype=torch.float64),
                  log_u=torch.tensor(-2.7, dtype=torch.float64), sigma_v=torch.tensor(130.0, dtype=torch.float64),
                  calibration_scale=torch.tensor(0.8, dtype=torch.float64),
                  calibration_poly=torch.tensor([0.05, -0.02], dtype=torch.float64))
    for v in inputs.values():
        v.requires_grad_()
    out = model(**inputs)
    (out.spectrum.sum() + out.photometry.sum() + out.surviving_mass / 1e8).backward()
    for name, v in inputs.items():
        assert v.grad is not None and torch.all(torch.isfinite(v.grad)), name
        assert v.grad.abs().sum() > 0, name


def test_desi_identity_resolution_changes_nothing(grid):
    fm = ForwardModel(grid, wave_obs=WAVE, z_range=(0.01, 0.6)).double()
    mass, edges, logz = galaxy()
    z = torch.tensor(0.1, dtype=torch.float64)
    ident = torch.zeros(11, len(WAVE), dtype=torch.float64)
    ident[5] = 1.0
    a = fm(mass, edges, logz, z)
    b = fm(mass, edges, logz, z, resolution_matrix=ident)
    torch.testing.assert_close(a.spectrum, b.spectrum)


@pytest.mark.parametrize("case,message", [
    ("z_high", "outside the model's range"), ("z_neg", "outside the model's range"),
    ("old", "older than the universe"), ("av", "av must be >= 0"), ("nan", "non-finite"),
])
def test_errors(model, case, message):
    mass, edges, logz = galaxy()
    z, kw = torch.tensor(0.1, dtype=torch.float64), {}
    if case == "z_high":
        z = torch.tensor(0.9, dtype=torch.float64)
    elif case == "z_neg":
        z = torch.tensor(-0.1, dtype=torch.float64)
    elif case == "old":
        edges = torch.tensor([0.0, 0.03, 0.1, 0.33, 1.08, 3.0, 13.0], dtype=torch.float64)
        z = torch.tensor(0.5, dtype=torch.float64)
    elif case == "av":
        kw["av"] = -0.2
    elif case == "nan":
        mass = mass.clone()
        mass[2] = float("nan")
    with pytest.raises(ValueError, match=message):
        model(mass, edges, logz, z, **kw)


def test_constructor_errors(grid):
    with pytest.raises(ValueError, match="unknown filter"):
        ForwardModel(grid, bands=["sdss_x"])
    with pytest.raises(ValueError, match="strictly increasing"):
        ForwardModel(grid, wave_obs=np.array([4000.0, 3999.0, 4001.0]))


def test_widened_photometry_grid_keeps_the_band_fluxes(grid):
    """``phot_rest_range`` adds whole pixels at either end of the photometry grid: the pixels the
    bands need are among the wider grid's (relative 1e-9), it covers the asked range, and the band
    fluxes of a galaxy are unchanged to relative 1e-6 (measured 1.6e-7: the rebinned SSPs are stored
    in float32, and edges equal to 1e-15 can round differently)."""
    narrow = ForwardModel(grid, bands=["sdss_u", "sdss_z"], z_range=(0.01, 0.2)).double()
    wide = ForwardModel(grid, bands=["sdss_u", "sdss_z"], z_range=(0.01, 0.2), phot_rest_range=(2000.0, 60000.0)).double()
    wn, ww = narrow.phot.wave.double().numpy(), wide.phot.wave.double().numpy()
    assert ww[0] <= 2000.0 < ww[1] and ww[-1] >= 60000.0 and len(ww) > 2 * len(wn)
    start = int(np.argmin(np.abs(ww - wn[0])))
    np.testing.assert_allclose(ww[start:start + len(wn)], wn, rtol=1e-6)  # float32 buffers
    np.testing.assert_allclose(wide.phot.edges_vac[start:start + len(wn) + 1].numpy(), narrow.phot.edges_vac.numpy(),
                               rtol=1e-9)
    mass, edges, logz = galaxy()
    for z in (0.02, 0.18):
        zt = torch.tensor(z, dtype=torch.float64)
        a = narrow(mass, edges, logz, zt, av=0.4, av_bc=0.5, log_u=-2.5).photometry
        b = wide(mass, edges, logz, zt, av=0.4, av_bc=0.5, log_u=-2.5).photometry
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="rest-frame range"):
        ForwardModel(grid, bands=["sdss_u"], phot_rest_range=(6000.0, 2000.0))


def test_desi_three_arms(grid):
    """DESI's overlapping B, R, Z arms: each arm's model equals the single-grid model on the same
    pixels (exactly without broadening; away from the arm ends with velocity dispersion)."""
    full = np.arange(3600.0, 9824.0 + 0.4, 0.8)
    arms = [full[(full >= lo) & (full <= hi)] for lo, hi in ((3600, 5930), (5660, 7720), (7420, 9825))]
    one = ForwardModel(grid, wave_obs=full, z_range=(0.01, 0.6)).double()
    three = ForwardModel(grid, wave_obs=arms, z_range=(0.01, 0.6)).double()
    assert [s.stop - s.start for s in three.arm_slices] == [len(a) for a in arms]
    mass, edges, logz = galaxy()
    z = torch.tensor(0.15, dtype=torch.float64)
    for kw, margin in (({}, 0), ({"sigma_v": 200.0}, 40)):
        a = one(mass, edges, logz, z, **kw).spectrum
        b = three(mass, edges, logz, z, **kw).spectrum
        for arm, sl in zip(arms, three.arm_slices):
            idx = np.searchsorted(full, arm)
            inner = slice(margin, len(arm) - margin)
            torch.testing.assert_close(b[sl][inner], a[idx][inner], rtol=1e-9, atol=1e-12)


def test_velocity_dispersion_broadens_lines(grid):
    """H-beta in the observed spectrum (isolated as the difference of two ionisation parameters,
    which changes only the nebular emission, less the continuum from sidebands) has the width of the velocity dispersion:
    sigma = sigma_v / c * lambda_obs, plus the pixels' own widths, within 3%."""
    fm = ForwardModel(grid, wave_obs=WAVE, z_range=(0.01, 0.6)).double()
    mass, edges, logz = galaxy()
    z = torch.tensor(0.1, dtype=torch.float64)
    w = torch.as_tensor(WAVE)
    for sv in (100.0, 250.0):
        a = fm(mass, edges, logz, z, log_u=-1.5, sigma_v=sv).spectrum
        b = fm(mass, edges, logz, z, log_u=-3.0, sigma_v=sv).spectrum
        hb = 4862.68 * 1.1
        reach = 6 * sv / 299792.458 * hb + 4
        side = ((w - hb).abs() > reach) & ((w - hb).abs() < reach + 15)
        sel = (w - hb).abs() <= reach
        line = (a - b)[sel] - (a - b)[side].median()  # less the (flat) nebular continuum
        centre = (line * w[sel]).sum() / line.sum()
        width = torch.sqrt((line * (w[sel] - centre) ** 2).sum() / line.sum()).item()
        pix_rest = 1.5e-4 * hb
        expect = np.sqrt((sv / 299792.458 * hb) ** 2 + pix_rest**2 / 12 + pix_rest**2 / 4 + 0.8**2 / 12)
        assert abs(centre.item() - hb) < 0.3
        assert width == pytest.approx(expect, rel=0.03)
