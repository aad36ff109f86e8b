"""The faster rational-quadratic spline against zuko's own."""

import pytest
import torch
import zuko
from zuko.transforms import MonotonicRQSTransform

from sedppl.infer.splines import RationalQuadraticSpline, use_fast_splines


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spline_equals_zukos(dtype):
    """Forward, inverse and log|dy/dx| equal zuko's MonotonicRQSTransform for 2,000 x 5 elements with their
    own knots (8 bins, unit-normal parameters, x up to +-7 so some lie outside the +-5 spline box, where both are the identity),
    to 1e-4 (values) and 1e-3 (log-determinants up to ~13) in float32, 1e-12 and 1e-11 in float64; the
    inverse undoes the forward; gradients are finite."""
    g = torch.Generator().manual_seed(0)
    w, h = (torch.randn(2000, 5, 8, generator=g, dtype=dtype) for _ in range(2))
    d = torch.randn(2000, 5, 7, generator=g, dtype=dtype)
    x = 7 * (2 * torch.rand(2000, 5, generator=g, dtype=dtype) - 1)
    ref, fast = MonotonicRQSTransform(w, h, d), RationalQuadraticSpline(w, h, d)
    tol = {torch.float32: 1e-4, torch.float64: 1e-12}[dtype]
    y_ref, ladj_ref = ref.call_and_ladj(x)
    y, ladj = fast.call_and_ladj(x)
    assert torch.allclose(y, y_ref, atol=tol, rtol=0) and torch.allclose(ladj, ladj_ref, atol=10 * tol, rtol=0)
    assert torch.allclose(fast.inv(y_ref), ref.inv(y_ref), atol=10 * tol)
    assert torch.allclose(fast.inv(y), x, atol=100 * tol)
    assert torch.equal(y[x.abs() > 5], x[x.abs() > 5])
    wg = w.clone().requires_grad_(True)
    RationalQuadraticSpline(wg, h, d).call_and_ladj(x)[1].sum().backward()
    assert torch.isfinite(wg.grad).all() and wg.grad.abs().sum() > 0


def _inverse(layout: str, params, y, **kw):
    """The inverse from parameters (*, F, 3K - 1), in either layout."""
    if layout == "rows":  # parameters first
        return RationalQuadraticSpline.inverse_from_rows(params.movedim(-1, 0), y, **kw)
    return RationalQuadraticSpline.inverse_from_parameters(params, y, **kw)


@pytest.mark.parametrize("layout", ["parameters", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bound, slope", [(5.0, 1e-3), (3.0, 1e-2)])
def test_inverse_from_parameters_equals_zukos_inverse(layout, dtype, bound, slope):
    """The inverse straight from the unconstrained parameters (what the draws use; eager, the
    parameters last, compiled, first: ``inverse_from_rows``) equals zuko's inverse,
    and its log|df/dx| zuko's forward log-determinant at that x, for 2,000 x 5 elements with their own
    knots and y up to +-1.4 B (some outside the box, where x = y and the log-determinant is 0): to 1e-4
    (values) and 1e-3 (log-determinants) in float32, 1e-12 and 1e-11 in float64. Knots shared by
    100 draws (parameters (5, 23), y (100, 5)) give what one set of knots per element gives, and
    gradients are finite."""
    g = torch.Generator().manual_seed(3)
    params = torch.randn(2000, 5, 23, generator=g, dtype=dtype)
    y = 1.4 * bound * (2 * torch.rand(2000, 5, generator=g, dtype=dtype) - 1)
    ref = MonotonicRQSTransform(params[..., :8], params[..., 8:16], params[..., 16:], bound=bound, slope=slope)
    x, ladj = _inverse(layout, params, y, bound=bound, slope=slope)
    tol = {torch.float32: 1e-4, torch.float64: 1e-12}[dtype]
    x_ref = ref.inv(y)
    assert torch.allclose(x, x_ref, atol=tol, rtol=0)
    assert torch.allclose(ladj, ref.call_and_ladj(x_ref)[1], atol=10 * tol, rtol=0)
    out = y.abs() > bound
    assert out.any() and torch.equal(x[out], y[out]) and torch.equal(ladj[out], torch.zeros_like(ladj[out]))
    shared = params[:1, :, :].squeeze(0)  # (5, 23)
    x_s, ladj_s = _inverse(layout, shared, y[:100], bound=bound, slope=slope)
    x_e, ladj_e = _inverse(layout, shared.expand(100, 5, 23).clone(), y[:100], bound=bound, slope=slope)
    assert torch.allclose(x_s, x_e, atol=tol, rtol=0) and torch.allclose(ladj_s, ladj_e, atol=tol, rtol=0)
    pg = params.clone().requires_grad_(True)
    sum(t.sum() for t in _inverse(layout, pg, y, bound=bound, slope=slope)).backward()
    assert torch.isfinite(pg.grad).all() and pg.grad.abs().sum() > 0


def test_shared_knots_take_zukos_broadcasting_path():
    """Knots of shape (5, 9) for inputs (100, 5): the same values as zuko's."""
    g = torch.Generator().manual_seed(1)
    w, h, d = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 7, generator=g)
    x = 4 * torch.randn(100, 5, generator=g)
    assert torch.allclose(RationalQuadraticSpline(w, h, d)(x), MonotonicRQSTransform(w, h, d)(x), atol=2e-5)


@pytest.mark.parametrize("passes", [2, 3])
def test_use_fast_splines_keeps_the_flow(passes):
    """A conditional NSF switched to the fast spline and the group-wise inverse gives the same log densities
    (1e-4), the same draws for the same seed (1e-4), and the same draws with log densities, whose log q
    equals log_prob of the draws (1e-4). An affine flow has nothing to switch."""
    torch.manual_seed(0)
    flow = zuko.flows.NSF(6, 4, transforms=3, hidden_features=(32, 32), passes=passes)
    c = torch.randn(4)
    z = torch.randn(300, 6)
    with torch.no_grad():
        lp = flow(c).log_prob(z)
        torch.manual_seed(1)
        draws = flow(c).sample((200,))
        torch.manual_seed(2)
        x_ref, lq_ref = flow(c).rsample_and_log_prob((200,))
        assert use_fast_splines(flow) == 3
        assert torch.allclose(flow(c).log_prob(z), lp, atol=1e-4)
        torch.manual_seed(1)
        assert torch.allclose(flow(c).sample((200,)), draws, atol=1e-4)
        torch.manual_seed(2)
        x, lq = flow(c).rsample_and_log_prob((200,))
        assert torch.allclose(x, x_ref, atol=1e-4) and torch.allclose(lq, lq_ref, atol=1e-4)
        assert torch.allclose(flow(c).log_prob(x), lq, atol=1e-4)
    assert use_fast_splines(zuko.flows.MAF(3, 2)) == 0


def test_trained_posterior_draws_with_the_fast_spline(small_posterior):
    """train_npe (and NeuralPosterior.load) hand back a posterior whose every spline transform is the fast one."""
    import functools

    from zuko.flows.autoregressive import MaskedAutoregressiveTransform

    found = [m.univariate for m in small_posterior.flow.modules() if isinstance(m, MaskedAutoregressiveTransform)]
    assert found and all(isinstance(u, functools.partial) and u.func is RationalQuadraticSpline for u in found)
