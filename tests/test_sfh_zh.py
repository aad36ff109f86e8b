"""SFH and ZH priors as Pyro blocks."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from sedppl.sfh import (continuity_edges, continuity_sfh, dirichlet_sfh, mass_from_sfr_ratios,
                        mass_weighted_age, sfr_averaged)
from sedppl.zh import LOG_Z_RANGE, constant_zh, smooth_zh


def test_continuity_edges_prospector():
    """Prospector's adjust_continuity_agebins(tuniv=13.7, nbins=7) (REFERENCES.md)."""
    e = continuity_edges(torch.tensor(13.7, dtype=torch.float64))
    # the published edges are rounded to 3 significant digits
    np.testing.assert_allclose(e.numpy(), [0, 0.03, 0.1, 0.33, 1.08, 3.55, 11.6, 13.7], rtol=5e-3, atol=1e-12)
    batch = continuity_edges(torch.tensor([13.7, 8.0], dtype=torch.float64))
    torch.testing.assert_close(batch[0], e)
    assert batch[1, -1].item() == 8.0 and batch[1, -2].item() == pytest.approx(0.85 * 8.0)


def test_sfr_ratios_to_mass():
    edges = continuity_edges(torch.tensor(13.7, dtype=torch.float64))
    # zero ratios: constant SFR, mass proportional to bin width
    m = mass_from_sfr_ratios(torch.tensor(10.0, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), edges)
    torch.testing.assert_close(m, 1e10 * torch.diff(edges) / 13.7)
    r = torch.tensor([0.5, -0.2, 0.1, 0.0, 0.3, -0.4], dtype=torch.float64)
    m = mass_from_sfr_ratios(torch.tensor(9.0, dtype=torch.float64), r, edges)
    sfr = m / torch.diff(edges)
    torch.testing.assert_close(torch.log10(sfr[:-1] / sfr[1:]), r)
    assert m.sum().item() == pytest.approx(1e9)
    assert sfr_averaged(m, edges, 0.1).item() == pytest.approx((m[0] + m[1]).item() / 1e8)
    assert 0 < mass_weighted_age(m, edges).item() < 13.7


def test_continuity_prior_sites():
    def model():
        with pyro.plate("galaxies", 3):
            return continuity_sfh(torch.tensor([13.0, 10.0, 5.0]))
    tr = poutine.trace(model).get_trace()
    assert isinstance(tr.nodes["log_sfr_ratio"]["fn"].base_dist, dist.StudentT)
    assert tr.nodes["log_sfr_ratio"]["value"].shape == (3, 6)
    mass, edges = tr.nodes["_RETURN"]["value"]
    assert mass.shape == (3, 7) and edges.shape == (3, 8)
    torch.testing.assert_close(mass.sum(-1), 10 ** tr.nodes["log_mass"]["value"], rtol=1e-5, atol=0)


def test_dirichlet_is_flat():
    """alpha = 1 gives mean fraction 1/N per bin (PROVABGS's stick breaking gives 0.5, 0.25, ...)."""
    pyro.set_rng_seed(3)
    edges = torch.tensor([0.0, 0.1, 1.0, 5.0, 13.0])
    with pyro.plate("draws", 20000):
        mass, _ = dirichlet_sfh(edges)
    frac = mass / mass.sum(-1, keepdim=True)
    np.testing.assert_allclose(frac.mean(0).numpy(), 0.25, atol=0.01)  # std of the mean ~0.0014


def test_zh_blocks_stay_on_grid():
    pyro.set_rng_seed(4)
    edges = continuity_edges(torch.full((500,), 12.0))
    with pyro.plate("galaxies", 500):
        z1 = constant_zh(7)
        z2 = smooth_zh(edges)
    for z in (z1, z2):
        assert z.shape == (500, 7)
        assert torch.all(z >= LOG_Z_RANGE[0]) and torch.all(z <= LOG_Z_RANGE[1])
    # smooth: neighbouring bins differ far less than independent draws would
    assert (z2[:, 1:] - z2[:, :-1]).abs().mean() < 0.5 * (z2[1:] - z2[:-1]).abs().mean()


def test_smooth_zh_gradient():
    edges = continuity_edges(torch.tensor([12.0, 6.0], requires_grad=True))
    cond = {"zh_logit_now": torch.tensor([0.3, -1.0], requires_grad=True),
            "zh_logit_step": torch.tensor([[0.2, -0.1], [0.5, 0.4]], requires_grad=True)}
    with poutine.condition(data=cond), pyro.plate("g", 2):
        z = smooth_zh(edges)
    z.sum().backward()
    assert all(torch.all(torch.isfinite(v.grad)) for v in cond.values())
