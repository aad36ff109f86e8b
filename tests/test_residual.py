"""The learned rest-frame correction (sedppl.residual) and its place in the forward model."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from sedppl.noise import site_mean
from sedppl.residual import RestFrameResidual
from sedppl.zoo import SpecPhotModel


def test_untrained_residual_is_exactly_one():
    res = RestFrameResidual((3000.0, 8000.0), n_knots=16, n_latent=2)
    wave = torch.linspace(2000.0, 12000.0, 500)
    f = res.factor(res.log_correction(torch.randn(7, 2)), wave)
    assert f.shape == (7, 500)
    assert torch.equal(f, torch.ones_like(f))


def test_interpolation_known_values():
    """At the knots the factor is exp(value); halfway between two knots (in ln lambda) the mean of
    the two logs; beyond one knot spacing past either end exactly 1; halfway into that taper, half the
    end value (tolerance: float32 rounding, 1e-6)."""
    res = RestFrameResidual((3000.0, 8000.0), n_knots=6, n_latent=0, remove_trend=False)
    values = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.05, -0.1])
    knots = torch.exp(res.log_knots.double())
    d = float(res.log_knots[1] - res.log_knots[0])
    mid = torch.exp(0.5 * (res.log_knots[1:3].double().sum()))
    wave = torch.cat([knots, mid[None], torch.tensor([3000.0 * math.exp(-0.5 * d), 2000.0, 12000.0],
                                                     dtype=torch.float64)]).float()
    logf = torch.log(res.factor(values, wave)).double()
    assert torch.allclose(logf[:6], values.double(), atol=1e-6)
    assert logf[6].item() == pytest.approx(0.5 * (-0.2 + 0.3), abs=1e-6)
    assert logf[7].item() == pytest.approx(0.05, abs=1e-5)
    assert logf[8].item() == 0.0 and logf[9].item() == 0.0


def test_remove_trend_leaves_no_level_or_tilt():
    """With remove_trend, ln(factor) at the knots is orthogonal to a constant and to ln(lambda) (1e-5)."""
    torch.manual_seed(0)
    res = RestFrameResidual((3000.0, 8000.0), n_knots=20, n_latent=3)
    with torch.no_grad():
        for p in res.parameters():
            p.normal_(0, 0.3)
    logc = res.log_correction(torch.randn(50, 3))
    x = res.log_knots - res.log_knots.mean()
    assert logc.abs().max() > 0.01
    assert torch.allclose(logc.sum(-1), torch.zeros(50), atol=1e-5)
    assert torch.allclose(logc @ x, torch.zeros(50), atol=1e-5)
    # a shape with no level or tilt passes unchanged
    shape = torch.sin(torch.linspace(0, 4 * math.pi, 20)).double()
    basis = torch.stack([torch.ones(20), x], 1).double()
    shape = shape - basis @ torch.linalg.lstsq(basis, shape[:, None]).solution[:, 0]
    assert torch.allclose(res.projector.double() @ shape, shape, atol=1e-5)


def test_batching_equals_looping_and_gradients_are_finite():
    torch.manual_seed(1)
    res = RestFrameResidual((3000.0, 8000.0), n_knots=12, n_latent=2)
    with torch.no_grad():
        res.net[-1].weight.normal_(0, 0.2)
    wave = torch.linspace(2500.0, 9000.0, 300)
    lat = torch.randn(4, 2, requires_grad=True)
    batch = res.factor(res.log_correction(lat), wave)
    loop = torch.stack([res.factor(res.log_correction(lat[i]), wave) for i in range(4)])
    assert torch.allclose(batch, loop, rtol=1e-6)
    batch.sum().backward()
    assert torch.isfinite(lat.grad).all() and lat.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in res.parameters() if p.grad is not None)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="wave_range"):
        RestFrameResidual((5000.0, 3000.0))
    with pytest.raises(ValueError, match="n_knots"):
        RestFrameResidual(n_knots=1)
    with pytest.raises(ValueError, match="latent"):
        RestFrameResidual(n_latent=2).log_correction(torch.zeros(3, 1))


@pytest.fixture(scope="module")
def small_specphot():
    return SpecPhotModel(wave=np.arange(3800.0, 7000.0, 4.0), bands=["sdss_g", "sdss_r", "sdss_i"])


def _means(model, residual, z):
    """Noise-free spectrum and photometry of the same three prior draws with and without ``residual``."""
    out = []
    for r in (None, residual):
        pyro.set_rng_seed(3)
        with torch.no_grad():
            tr = poutine.trace(model).get_trace(n_galaxies=3, redshift=z, residual=r)
        out.append((site_mean(tr.nodes["spectrum"]), site_mean(tr.nodes["photometry"])))
    return out


def test_constant_factor_scales_spectrum_and_photometry(small_specphot):
    """A rest-frame factor of 1.3 everywhere multiplies every pixel and every band flux by 1.3 (1e-5)."""
    z = torch.tensor([0.05, 0.1, 0.2])
    (s0, p0), (s1, p1) = _means(small_specphot, lambda: (lambda wave: torch.full_like(wave, 1.3)), z)
    assert torch.allclose(s1 / s0, torch.full_like(s0, 1.3), rtol=1e-5)
    assert torch.allclose(p1 / p0, torch.full_like(p0, 1.3), rtol=1e-5)


def test_rest_frame_feature_appears_redshifted(small_specphot):
    """A narrow-ish rest-frame bump at 4500 A (sigma 40 A, +50%) peaks in the observed spectrum at
    4500 (1 + z) A, to within two pixels (8 A) plus the instrument's broadening."""
    z = torch.tensor([0.05, 0.1, 0.2])
    bump = lambda: (lambda wave: 1 + 0.5 * torch.exp(-0.5 * ((wave - 4500.0) / 40.0) ** 2))  # noqa: E731
    (s0, _), (s1, _) = _means(small_specphot, bump, z)
    wave = small_specphot.forward_model.wave_obs
    peak = wave[torch.argmax(s1 / s0, dim=-1)]
    assert torch.allclose(peak.double(), 4500.0 * (1 + z.double()), atol=8.0)
    assert ((s1 / s0).max(-1).values > 1.4).all()
