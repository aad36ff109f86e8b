"""Air/vacuum, line-spread functions, DESI resolution matrices, calibration."""

import math

import numpy as np
import pytest
import scipy.sparse
import torch

from sedppl import instrument as ins


@pytest.mark.parametrize("air,vac", [
    (6562.80, 6564.61),  # H-alpha (SDSS line list, vacuum)
    (5006.84, 5008.24),  # [OIII]
    (4861.33, 4862.68),  # H-beta
    (6583.45, 6585.27),  # [NII]
])
def test_air_to_vacuum_known_lines(air, vac):
    got = ins.air_to_vacuum(torch.tensor(air, dtype=torch.float64)).item()
    assert got == pytest.approx(vac, abs=0.02)


def test_round_trip_and_uv_convention():
    w = torch.linspace(2000, 25000, 1000, dtype=torch.float64)
    torch.testing.assert_close(ins.vacuum_to_air(ins.air_to_vacuum(w)), w, rtol=0, atol=2e-4)
    uv = torch.tensor([1215.67, 1549.0], dtype=torch.float64)
    torch.testing.assert_close(ins.air_to_vacuum(uv), uv)


def test_resolution_sigma():
    w = torch.tensor([6000.0], dtype=torch.float64)
    assert ins.sigma_from_resolution(w, resolving_power=2000).item() == pytest.approx(3.0 / ins.FWHM_PER_SIGMA)
    assert ins.sigma_from_resolution(w, fwhm=2.5).item() == pytest.approx(2.5 / ins.FWHM_PER_SIGMA)
    with pytest.raises(ValueError, match="exactly one"):
        ins.sigma_from_resolution(w)


def test_gaussian_band_moments():
    """A delta broadened by a pixel-integrated Gaussian: unit sum, mean kept, variance sigma^2 + 1/12 px^2."""
    wave = torch.arange(5000, 5400, 1.0, dtype=torch.float64)
    flux = torch.zeros_like(wave)
    flux[200] = 1.0
    for sigma in (0.7, 3.0, 8.0):
        band = ins.gaussian_band(wave, torch.full_like(wave, sigma), half_width=int(6 * sigma) + 2)
        out = ins.apply_band(flux, band)
        x = wave - wave[200]
        assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (out * x).sum().item() == pytest.approx(0.0, abs=1e-9)
        assert (out * x**2).sum().item() == pytest.approx(sigma**2 + 1 / 12, rel=0.02)


def test_gaussian_band_is_cut_smoothly_and_does_not_depend_on_h():
    """The kernel is the pixel-integrated Gaussian cut at n_sigma: the same for any half-width H that
    covers the cut (to 1e-12 in float64), continuous in sigma across the cut (the old rule, pixels kept
    by their centres, jumped by ~1e-4 there), the identity at zero sigma, and zero beyond the ends."""
    wave = torch.arange(5000, 5100, 0.8, dtype=torch.float64)
    sig = torch.full_like(wave, 0.5)
    torch.testing.assert_close(ins.gaussian_band(wave, sig, 4)[4 - 4:4 + 5],
                               ins.gaussian_band(wave, sig, 9)[9 - 4:9 + 5], rtol=0, atol=1e-12)
    assert float(ins.gaussian_band(wave, sig, 9)[:5].abs().max()) == 0.0  # beyond 5 sigma = 2.5 A
    # sigma crossing the value where the second neighbour's centre (1.6 A) sits at 5 sigma
    lo, hi = (ins.gaussian_band(wave, torch.full_like(wave, s), 4) for s in (0.32 - 1e-7, 0.32 + 1e-7))
    assert float((lo - hi).abs().max()) < 1e-6
    torch.testing.assert_close(ins.gaussian_band(wave, torch.zeros_like(wave), 3)[3], torch.ones_like(wave))
    band = ins.gaussian_band(wave, torch.full_like(wave, 2.0), 12)
    assert float(band[:12, 0].abs().max()) == 0.0 and float(band[-12:, -1].abs().max()) == 0.0
    torch.testing.assert_close(band.sum(-2), torch.ones_like(wave))


def test_velocity_dispersion_width():
    wave = torch.arange(4800, 5200, 0.5, dtype=torch.float64)
    sig = ins.velocity_sigma(wave, torch.tensor([200.0], dtype=torch.float64))
    assert sig[0, 400].item() == pytest.approx(200.0 / ins.C_KMS * 5000.0)


def test_lsf_band_subtracts_template_resolution():
    wave = torch.arange(5000, 5100, 0.5, dtype=torch.float64)
    target, tmpl = torch.full_like(wave, 2.0), torch.full_like(wave, 1.2)
    b1 = ins.lsf_band(wave, target, tmpl)
    b2 = ins.gaussian_band(wave, torch.full_like(wave, math.sqrt(2.0**2 - 1.2**2)), (b1.shape[-2] - 1) // 2)
    torch.testing.assert_close(b1, b2)
    # a template sharper-than-nothing: no broadening where the template is coarser than the target
    ident = ins.lsf_band(wave, torch.full_like(wave, 1.0), torch.full_like(wave, 2.0))
    flux = torch.rand(wave.shape, dtype=torch.float64)
    torch.testing.assert_close(ins.apply_band(flux, ident), flux)


def test_desi_band_matches_dia_matrix():
    rng = np.random.default_rng(5)
    m, ndiag = 50, 11
    data = rng.random((ndiag, m))
    offsets = np.arange(ndiag // 2, -(ndiag // 2) - 1, -1)
    mat = scipy.sparse.dia_matrix((data, offsets), shape=(m, m))
    flux = rng.random(m)
    ref = mat @ flux
    got = ins.apply_band(torch.tensor(flux), ins.desi_band(torch.tensor(data)))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


def test_band_batch_and_gradient():
    wave = torch.arange(5000, 5200, 1.0, dtype=torch.float64)
    sig = torch.tensor([[1.0], [2.5]], dtype=torch.float64).expand(2, 200).clone().requires_grad_()
    flux = torch.rand(2, 200, dtype=torch.float64)
    band = ins.gaussian_band(wave, sig, 12)
    out = ins.apply_band(flux, band)
    for i in range(2):
        torch.testing.assert_close(out[i], ins.apply_band(flux[i], ins.gaussian_band(wave, sig[i], 12)))
    out.pow(2).sum().backward()
    assert torch.all(torch.isfinite(sig.grad))


def test_legendre_calibration():
    wave = torch.linspace(3600, 9800, 101, dtype=torch.float64)
    f = ins.legendre_calibration(wave, torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2]], dtype=torch.float64),
                                 torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(f[0], torch.ones(101, dtype=torch.float64))
    assert f[1, 0].item() == pytest.approx(0.9) and f[1, -1].item() == pytest.approx(1.1)
    # P2(x) = (3x^2 - 1)/2: 1 at both ends, -1/2 at the centre
    assert f[2, 0].item() == pytest.approx(2 * 1.2) and f[2, 50].item() == pytest.approx(2 * 0.9)


def test_broaden_velocity_moments_and_flux():
    """A line on a ln(lambda) grid broadened by sigma_v (sigma = sigma_v / c / dlnlam pixels):
    flux conserved (1e-12), centroid kept, variance sigma^2 + 1/12 (the pixel-integrated
    Gaussian) to 1e-6 pixel^2 from one pixel up; below a pixel non-negative and narrower."""
    dlnlam = 1e-4
    x = torch.arange(-300, 301, dtype=torch.float64)
    line = torch.zeros(601, dtype=torch.float64)
    line[300] = 1.0
    for sigma_kms in (10.0, 30.0, 150.0, 400.0):
        out = ins.broaden_velocity(line, dlnlam, sigma_kms)
        s_pix = sigma_kms / ins.C_KMS / dlnlam
        assert out.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert (out * x).sum().item() == pytest.approx(0.0, abs=1e-9)
        assert out.min().item() > -1e-12
        var = (out * x**2).sum().item()
        if s_pix >= 1:
            assert var == pytest.approx(s_pix**2 + 1 / 12, abs=1e-6)
        else:
            assert 0 < var < s_pix**2 + 1 / 12
    flat = torch.full((50,), 3.0, dtype=torch.float64)
    torch.testing.assert_close(ins.broaden_velocity(flat, dlnlam, 300.0), flat)  # edges padded, not darkened
    torch.testing.assert_close(ins.broaden_velocity(line, dlnlam, 0.0), line)
    with pytest.raises(ValueError, match="velocity dispersion"):
        ins.broaden_velocity(line, dlnlam, -5.0)


def test_broaden_velocity_matches_band_matrix():
    """On a log grid the FFT convolution equals the pixel-integrated Gaussian band matrix of the
    same width in Angstrom (sigma_lambda = lambda sigma_v / c) to 1e-3 of the peak."""
    dlnlam = 1.5e-4
    wave = 5000.0 * torch.exp(dlnlam * torch.arange(800, dtype=torch.float64))
    flux = 1.0 + torch.exp(-0.5 * ((wave - 5300.0) / 0.8) ** 2) - 0.5 * torch.exp(-0.5 * ((wave - 5600.0) / 3.0) ** 2)
    fft = ins.broaden_velocity(flux, dlnlam, 200.0)
    band = ins.apply_band(flux, ins.lsf_band(wave, ins.velocity_sigma(wave, torch.tensor(200.0, dtype=torch.float64))))
    inner = slice(100, 700)
    assert (fft[inner] - band[inner]).abs().max().item() < 1e-3


def test_broaden_velocity_batch_and_gradient():
    """Batched dispersions equal one galaxy at a time (whatever the batch's widest kernel) and
    gradients with respect to sigma_v are finite."""
    gen = torch.Generator().manual_seed(3)
    flux = torch.rand(3, 400, generator=gen, dtype=torch.float64)
    sig = torch.tensor([40.0, 120.0, 390.0], dtype=torch.float64, requires_grad=True)
    out = ins.broaden_velocity(flux, 1.5e-4, sig)
    for i in range(3):
        torch.testing.assert_close(out[i], ins.broaden_velocity(flux[i], 1.5e-4, sig[i]), rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    assert torch.all(torch.isfinite(sig.grad)) and torch.all(sig.grad != 0)
