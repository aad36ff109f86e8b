"""Differentiable cosmology against astropy."""

import numpy as np
import pytest
import torch
from astropy.cosmology import LambdaCDM, Planck18

from sedppl.cosmology import Cosmology


@pytest.fixture(scope="module")
def planck():
    return Cosmology()


@pytest.mark.parametrize("cosmo", [Planck18, LambdaCDM(H0=70, Om0=0.3, Ode0=0.6)])
def test_against_astropy(cosmo):
    c = Cosmology(cosmo, z_max=5)
    z = np.array([1e-3, 0.01, 0.05, 0.1, 0.37, 1.0, 2.5, 4.9])
    dl = c.luminosity_distance(torch.tensor(z, dtype=torch.float64)).numpy()
    age = c.age(torch.tensor(z, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(dl, cosmo.luminosity_distance(z).to_value("Mpc"), rtol=1e-6)
    np.testing.assert_allclose(age, cosmo.age(z).to_value("Gyr"), rtol=1e-6)
    lb = c.lookback_time(torch.tensor(z, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(lb, cosmo.lookback_time(z).to_value("Gyr"), rtol=1e-5, atol=1e-9)


def test_gradient_matches_finite_difference(planck):
    z = torch.tensor([0.02, 0.3, 1.4], dtype=torch.float64, requires_grad=True)
    planck.luminosity_distance(z).sum().backward()
    h = 1e-6
    zp, zm = z.detach() + h, z.detach() - h
    fd = (Planck18.luminosity_distance(zp.numpy()) - Planck18.luminosity_distance(zm.numpy())).to_value("Mpc") / (2 * h)
    np.testing.assert_allclose(z.grad.numpy(), fd, rtol=1e-6)


def test_float32(planck):
    z = torch.tensor([0.1, 0.5], dtype=torch.float32)
    d = planck.luminosity_distance(z)
    assert d.dtype == torch.float32
    np.testing.assert_allclose(d.numpy(), Planck18.luminosity_distance(z.numpy().astype(float)).to_value("Mpc"), rtol=1e-6)


@pytest.mark.parametrize("z,message", [(-0.1, ">= 0"), (25.0, "beyond"), (float("nan"), "non-finite")])
def test_errors(planck, z, message):
    with pytest.raises(ValueError, match=message):
        planck.luminosity_distance(torch.tensor([z]))
