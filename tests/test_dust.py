"""Attenuation laws against published values; normalisation, batching, gradients."""

import pytest
import torch

from sedppl import dust


@pytest.mark.parametrize("wave,k", [
    (1500.0, 10.33),   # far-UV, commonly quoted k(1500 A) for Calzetti et al. 2000
    (4861.0, 4.60),    # k(H-beta), Calzetti 2001 PASP 113, 1449
    (6563.0, 3.33),    # k(H-alpha), same
    (2.2e4, 0.37),     # K band end of the published range: 2.659(-1.857 + 1.040/2.2) + 4.05
])
def test_calzetti_published(wave, k):
    assert dust.calzetti_k(torch.tensor(wave, dtype=torch.float64)).item() == pytest.approx(k, abs=0.01)


def test_calzetti_continuous_and_positive():
    w = torch.logspace(2.9, 5.5, 5000, dtype=torch.float64)
    k = dust.calzetti_k(w)
    assert torch.all(k >= 0)
    # the published pieces meet at 0.63 micron and the UV extension at 0.12 micron within 1%
    for edge in (1200.0, 6300.0):
        lo, hi = dust.calzetti_k(torch.tensor([edge * (1 - 1e-6), edge * (1 + 1e-6)], dtype=torch.float64))
        assert abs(lo / hi - 1) < 0.01


@pytest.mark.parametrize("law", ["calzetti", "kriek_conroy_0", "kriek_conroy_neg", "kriek_conroy_pos"])
def test_av_is_attenuation_at_5500(law):
    v = torch.tensor([5500.0], dtype=torch.float64)
    av = torch.tensor([0.0, 0.3, 1.7], dtype=torch.float64)
    if law == "calzetti":
        a = dust.calzetti(v, av)
    else:
        n = {"kriek_conroy_0": 0.0, "kriek_conroy_neg": -0.8, "kriek_conroy_pos": 0.4}[law[:]]
        a = dust.kriek_conroy(v, av, torch.full((3,), n, dtype=torch.float64))
    torch.testing.assert_close(a[:, 0], av, rtol=1e-12, atol=1e-12)


def test_kriek_conroy_shape():
    w = torch.tensor([1500.0, 2175.0, 3000.0, 5500.0, 8000.0], dtype=torch.float64)
    av = torch.tensor(1.0, dtype=torch.float64)
    calz = dust.calzetti(w, av)
    flat = dust.kriek_conroy(w, av, torch.tensor(0.0, dtype=torch.float64))
    steep = dust.kriek_conroy(w, av, torch.tensor(-0.5, dtype=torch.float64))
    # n = 0: Calzetti plus a bump of E_b = 0.85 at 2175 A: A(2175)/A_V = (k + 0.85) / k(5500)
    k5500 = dust.calzetti_k(torch.tensor(5500.0, dtype=torch.float64))
    bump_norm = k5500 + dust.drude_bump(torch.tensor([5500.0], dtype=torch.float64), torch.tensor(0.85, dtype=torch.float64))[0]
    expected = (dust.calzetti_k(torch.tensor(2175.0, dtype=torch.float64)) + 0.85) / bump_norm
    assert flat[1].item() == pytest.approx(expected.item(), rel=1e-10)
    assert flat[1] > calz[1]
    # n < 0 is steeper: more UV and less red attenuation than Calzetti
    assert steep[0] > flat[0] and steep[4] < flat[4]
    # the tilt: A ratio between 8000 and 5500 A scales as (8000/5500)^n
    assert (steep[4] / flat[4]).item() == pytest.approx((8000 / 5500) ** -0.5, rel=1e-3)


def test_birth_cloud():
    w = torch.tensor([2750.0, 5500.0, 11000.0], dtype=torch.float64)
    a = dust.birth_cloud(w, torch.tensor(0.6, dtype=torch.float64), -1.0)
    torch.testing.assert_close(a, torch.tensor([1.2, 0.6, 0.3], dtype=torch.float64))
    assert dust.transmission(torch.tensor(2.5)).item() == pytest.approx(0.1)


def test_batch_equals_loop_and_gradients():
    w = torch.linspace(1000, 20000, 300, dtype=torch.float64)
    av = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([-1.0, 0.0, 0.3], dtype=torch.float64, requires_grad=True)
    a = dust.kriek_conroy(w, av, n)
    for i in range(3):
        torch.testing.assert_close(a[i], dust.kriek_conroy(w, av[i], n[i]))
    a.sum().backward()
    assert torch.all(torch.isfinite(av.grad)) and torch.all(torch.isfinite(n.grad))


def test_errors():
    with pytest.raises(ValueError, match="av must be >= 0"):
        dust.check_dust(av=torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="non-finite"):
        dust.check_dust(av_bc=torch.tensor([float("nan")]))
