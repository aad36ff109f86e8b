"""Flux-conserving resampling."""

import math

import pytest
import torch

from sedppl.resample import check_wavelengths, edges_from_centers, interp1d, rebin_spectrum, resample


def test_conserves_integrated_flux():
    g = torch.Generator().manual_seed(3)
    wave = torch.sort(torch.rand(500, generator=g, dtype=torch.float64) * 4000 + 4000).values
    flux = torch.rand(3, 500, generator=g, dtype=torch.float64)
    edges = edges_from_centers(wave)
    new = torch.linspace(float(edges[0]), float(edges[-1]), 97, dtype=torch.float64)
    out = resample(flux, edges, new)
    total_in = (flux * torch.diff(edges)).sum(-1)
    total_out = (out * torch.diff(new)).sum(-1)
    torch.testing.assert_close(total_out, total_in, rtol=1e-12, atol=0)


def test_identity_and_constant():
    wave = torch.linspace(3000, 9000, 601, dtype=torch.float64)
    edges = edges_from_centers(wave)
    flux = torch.sin(wave / 100) + 2
    torch.testing.assert_close(resample(flux, edges, edges), flux, rtol=1e-12, atol=1e-12)
    const = torch.full_like(wave, 3.0)
    new = torch.linspace(3100, 8900, 33, dtype=torch.float64)
    torch.testing.assert_close(resample(const, edges, new), torch.full((32,), 3.0, dtype=torch.float64))


def test_batched_edges_and_gradient():
    wave = torch.linspace(3000, 9000, 601, dtype=torch.float64)
    edges = edges_from_centers(wave)
    flux = (torch.cos(wave / 50) + 2).requires_grad_()
    z = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    target = torch.linspace(4000, 7000, 200, dtype=torch.float64)
    out = resample(flux, edges, target / (1 + z[:, None]), (1 + z[:, None]))
    for i in range(2):
        single = resample(flux, edges, target / (1 + z[i]), 1 + z[i])
        torch.testing.assert_close(out[i], single)
    out.sum().backward()
    assert torch.all(torch.isfinite(z.grad)) and torch.all(torch.isfinite(flux.grad))


def test_errors():
    wave = torch.linspace(3000, 9000, 61, dtype=torch.float64)
    with pytest.raises(ValueError, match="model covers only"):
        resample(torch.ones(61, dtype=torch.float64), edges_from_centers(wave),
                 torch.linspace(2000, 5000, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="strictly increasing"):
        check_wavelengths(torch.tensor([1.0, 3.0, 2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        check_wavelengths(torch.tensor([1.0, float("nan")]))


def test_interp1d():
    xp = torch.tensor([0.0, 1.0, 3.0])
    fp = torch.tensor([0.0, 2.0, 4.0])
    torch.testing.assert_close(interp1d(torch.tensor([0.5, 2.0, 5.0]), xp, fp), torch.tensor([1.0, 3.0, 4.0]))
    # a grid uniform in ln: the interval found by arithmetic, the same values as the binary search
    g = torch.Generator().manual_seed(3)
    xp = 1711.0 * torch.exp(1.5e-4 * torch.arange(11655, dtype=torch.float64)).float()
    fp = torch.rand(11655, generator=g)
    x = torch.cat([xp[::7], 1600 + 9000 * torch.rand(5000, generator=g), torch.tensor([1000.0, 20000.0])])
    torch.testing.assert_close(interp1d(x, xp, fp, log_step=1.5e-4), interp1d(x, xp, fp), rtol=0, atol=0)


def test_log_resampling_matches_general():
    from sedppl.resample import resample_log

    g = torch.Generator().manual_seed(8)
    log_start, dln, n = math.log(3000.0), 1.5e-4, 8000
    edges = torch.exp(log_start + dln * torch.arange(n + 1, dtype=torch.float64))
    flux = torch.rand(2, n, generator=g, dtype=torch.float64) + 0.5
    obs = torch.arange(4000.0, 7000.0, 0.8, dtype=torch.float64)
    obs_edges = edges_from_centers(obs)
    z = torch.tensor([0.1, 0.31], dtype=torch.float64)
    ref = resample(flux, edges, obs_edges / (1 + z[:, None]), (1 + z[:, None]))
    got = resample_log(flux, log_start, dln, torch.log(obs_edges), torch.log1p(z))
    # partial source pixels are split by ln(lambda) fraction rather than lambda fraction:
    # an O(dlnlam / 2) = 7.5e-5 redistribution inside a pixel, never a loss of flux
    torch.testing.assert_close(got, ref, rtol=5e-5, atol=0)
    got32 = resample_log(flux.float(), log_start, dln, torch.log(obs_edges), torch.log1p(z))
    torch.testing.assert_close(got32.double(), got, rtol=2e-6, atol=0)
    # whole-range integral conserved exactly
    full = torch.log(torch.tensor([3100.0, 3500.0], dtype=torch.float64))
    one = resample_log(flux, log_start, dln, full, torch.zeros(2, dtype=torch.float64))
    ref_full = resample(flux, edges, torch.exp(full))
    torch.testing.assert_close(one, ref_full, rtol=1e-6, atol=0)


def test_rebin_spectrum_conserves_information():
    """An SDSS-like log grid onto DESI's 0.8 A grid: total information (sum of ivar over
    whole source pixels) and the information-weighted flux are conserved (1e-5); binning
    the fine pixels back gives the ivar-weighted means; uncovered pixels get ivar 0."""
    gen = torch.Generator().manual_seed(0)
    wave = 10 ** (3.6 + 1e-4 * torch.arange(400, dtype=torch.float64))  # 3981-4349 A, ~1 A pixels
    flux = 1 + torch.rand(2, 400, generator=gen, dtype=torch.float64)
    ivar = 10 * torch.rand(2, 400, generator=gen, dtype=torch.float64)
    ivar[:, 50:60] = 0.0
    ivar[:, :3] = ivar[:, -3:] = 0.0  # so that no information sits in partly covered end pixels
    new = torch.arange(3950.0, 4400.0, 0.8, dtype=torch.float64)
    f, iv = rebin_spectrum(wave, flux, ivar, new)
    edges = edges_from_centers(wave)
    inside = (edges_from_centers(new)[:-1] >= edges[0]) & (edges_from_centers(new)[1:] <= edges[-1])
    assert torch.all(iv[:, ~inside] == 0)
    torch.testing.assert_close(iv.double().sum(-1), ivar.sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close((f.double() * iv.double()).sum(-1), (flux * ivar).sum(-1), rtol=1e-5, atol=0)
    # a coarse target made of pairs of whole source pixels: exact ivar-weighted means and ivar sums
    w1 = torch.arange(4000.0, 4100.0, 1.0, dtype=torch.float64)
    fc, ic = rebin_spectrum(w1, flux[:, :100], ivar[:, :100], w1[::2] + 0.5)
    torch.testing.assert_close(ic[:, 5].double(), ivar[:, 10:12].sum(-1), rtol=1e-6, atol=0)
    mean = (flux[:, 10:12] * ivar[:, 10:12]).sum(-1) / ivar[:, 10:12].sum(-1)
    torch.testing.assert_close(fc[:, 5].double(), mean, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="ivar"):
        rebin_spectrum(wave, flux, -ivar, new)
    with pytest.raises(ValueError, match="increasing"):
        rebin_spectrum(wave.flip(0), flux, ivar, new)
