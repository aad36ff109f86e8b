"""Basis + burst SFH, with PROVABGS's own NMF basis from ../shared when present."""

from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from sedppl.sfh import BasisSFH, basis_burst_sfh, fine_edges, place_burst

SHARED = Path(__file__).resolve().parents[2] / "shared" / "provabgs"


def provabgs_basis():
    if not (SHARED / "sfh_t_int.txt").exists():
        pytest.skip("../shared/provabgs is not present")
    t = np.loadtxt(SHARED / "sfh_t_int.txt")[::-1].copy()  # stored oldest first
    s = np.loadtxt(SHARED / "NMF_2basis_SFH_components_nowgt_lin_Nc4.txt")[:, ::-1][[2, 0, 1, 3]].copy()
    return t, s


def test_provabgs_basis_peaks():
    """After PROVABGS's reordering the bases peak near 1.2, 5.6, 8.4 and 11.1 Gyr lookback."""
    t, s = provabgs_basis()
    np.testing.assert_allclose(t[np.argmax(s, axis=1)], [1.2, 5.6, 8.4, 11.1], atol=0.3)


def test_fractions_and_mass_conservation():
    t, s = provabgs_basis()
    basis = BasisSFH(t, s)
    edges = fine_edges(torch.tensor([13.7, 8.0], dtype=torch.float64))
    frac = basis.mass_fractions(edges)
    assert frac.shape == (2, 4, 40)
    torch.testing.assert_close(frac.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    # in a universe 8 Gyr old the 11 Gyr basis keeps only its young tail: its mass-weighted
    # lookback time moves below 8 Gyr
    centre = 0.5 * (edges[..., 1:] + edges[..., :-1])
    age = (frac[:, 3] * centre).sum(-1)
    assert age[0] > 9.0 and age[1] < 8.0
    pyro.set_rng_seed(5)
    with pyro.plate("g", 2):
        mass, e = basis_burst_sfh(basis, torch.tensor([13.7, 8.0]))
    assert mass.shape == (2, 40) and torch.all(mass >= 0)


def test_basis_burst_total_mass_and_burst_position():
    t, s = provabgs_basis()
    basis = BasisSFH(t, s)
    cond = {"log_mass": torch.tensor([10.0]), "basis_weight": torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
            "f_burst": torch.tensor([0.3]), "t_burst": torch.tensor([2.0])}
    with poutine.condition(data=cond), pyro.plate("g", 1):
        mass, edges = basis_burst_sfh(basis, torch.tensor([13.0]))
    assert mass.sum().item() == pytest.approx(1e10, rel=1e-5)
    burst = place_burst(torch.tensor([1.0]), torch.tensor([2.0]), edges)
    centre = torch.log(0.5 * (edges[..., 1:] + edges[..., :-1]))
    # the burst's mass-weighted log time is log(2 Gyr)
    assert torch.exp((burst * centre).sum()).item() == pytest.approx(2.0, rel=1e-5)
    assert burst.sum().item() == pytest.approx(1.0)


def test_gradients_in_burst_and_weights():
    t, s = provabgs_basis()
    basis = BasisSFH(t, s)
    cond = {"log_mass": torch.tensor([10.0], requires_grad=True),
            "basis_weight": torch.tensor([[0.1, 0.2, 0.3, 0.4]], requires_grad=True),
            "f_burst": torch.tensor([0.3], requires_grad=True), "t_burst": torch.tensor([2.0], requires_grad=True)}
    with poutine.condition(data=cond), pyro.plate("g", 1):
        mass, edges = basis_burst_sfh(basis, torch.tensor([13.0]))
    (mass * torch.arange(40.0)).sum().backward()
    for v in cond.values():
        assert torch.all(torch.isfinite(v.grad)) and v.grad.abs().sum() > 0


def test_bad_basis():
    with pytest.raises(ValueError, match="increasing"):
        BasisSFH([1.0, 0.5], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="non-negative"):
        BasisSFH([0.5, 1.0], [[1.0, -1.0]])
