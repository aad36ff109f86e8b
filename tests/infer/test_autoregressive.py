"""The group-wise inverse of masked autoregressive transforms against zuko's own inverse."""

import pytest
import torch
import zuko
from zuko.flows.autoregressive import MaskedAutoregressiveTransform

from sedppl.infer import autoregressive
from sedppl.infer.autoregressive import GroupwiseAutoregressiveTransform, GroupwiseMaskedAutoregressiveTransform
from sedppl.infer.splines import use_fast_splines


def _switch(flow):
    """Switch every masked autoregressive transform of ``flow`` to the group-wise inverse (any univariate)."""
    for m in flow.modules():
        if type(m) is MaskedAutoregressiveTransform:
            m.__class__ = GroupwiseMaskedAutoregressiveTransform


@pytest.mark.parametrize("kind", ["nsf", "maf"])
@pytest.mark.parametrize("passes,randperm", [(2, False), (3, False), (None, False), (2, True), (None, True)])
def test_groupwise_inverse_equals_zukos(kind, passes, randperm):
    """For coupling (2 passes), 3 passes and fully autoregressive transforms, contiguous and randomly
    permuted feature orders, spline and affine univariates, and a batch of 4 contexts: the inverse and
    its log-determinant equal zuko's passes to 1e-4 (float32), and the draws' log q equals log_prob at
    the draws (1e-4)."""
    torch.manual_seed(0)
    cls = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}[kind]
    flow = cls(7, 3, transforms=3, hidden_features=(32, 32), passes=passes, randperm=randperm)
    c = torch.randn(4, 3)
    z = torch.randn(50, 4, 7)
    with torch.no_grad():
        ref_x, ref_ladj = flow(c).transform.inv.call_and_ladj(z)
        _switch(flow)
        x, ladj = flow(c).transform.inv.call_and_ladj(z)
        assert torch.allclose(x, ref_x, atol=1e-4) and torch.allclose(ladj, ref_ladj, atol=1e-4)
        torch.manual_seed(3)
        draws, lq = flow(c).rsample_and_log_prob((50,))
        assert draws.shape == (50, 4, 7) and lq.shape == (50, 4)
        assert torch.allclose(flow(c).log_prob(draws), lq, atol=1e-4)


@pytest.mark.parametrize("context", [3, 0])
@pytest.mark.parametrize("passes,randperm", [(2, False), (3, True), (None, False)])
def test_parameter_major_inverse_equals_zukos(monkeypatch, context, passes, randperm):
    """The inverse that ``torch.compile`` takes (the output layer transposed, each spline parameter a
    slab: ``_combine_rows`` and ``inverse_from_rows``), run eagerly here, equals zuko's passes to 1e-4
    (float32), conditional (a batch of 4 contexts) and unconditional, for coupling, 3-pass and fully
    autoregressive transforms."""
    torch.manual_seed(4)
    flow = zuko.flows.NSF(7, context, transforms=3, hidden_features=(32, 32), passes=passes, randperm=randperm)
    c = torch.randn(4, context) if context else None
    z = torch.randn(50, 4, 7)
    with torch.no_grad():
        ref_x, ref_ladj = flow(c).transform.inv.call_and_ladj(z)
        use_fast_splines(flow)
        monkeypatch.setattr(autoregressive, "_parameter_major", lambda: True)
        x, ladj = flow(c).transform.inv.call_and_ladj(z)
    assert x.shape == ref_x.shape and ladj.shape == ref_ladj.shape
    assert torch.allclose(x, ref_x, atol=1e-4) and torch.allclose(ladj, ref_ladj, atol=1e-4)


def test_batching_equals_looping_and_gradients_are_finite():
    """Drawing for a batch of 3 contexts equals inverting each context alone (1e-5); with gradients
    enabled the inverse is differentiable with finite gradients with respect to the network weights
    and the base draws, and the plan cached without gradients is not reused with them."""
    torch.manual_seed(1)
    flow = zuko.flows.NSF(5, 2, transforms=2, hidden_features=(16, 16), passes=2)
    use_fast_splines(flow)
    c = torch.randn(3, 2)
    z = torch.randn(20, 3, 5)
    with torch.no_grad():
        batch = flow(c).transform.inv(z)
        for i in range(3):
            assert torch.allclose(flow(c[i]).transform.inv(z[:, i]), batch[:, i], atol=1e-5)
    zg = z.clone().requires_grad_(True)
    x, ladj = flow(c).transform.inv.call_and_ladj(zg)
    (x.square().sum() + ladj.sum()).backward()
    weights = [p for p in flow.parameters() if p.grad is not None]
    assert weights and all(torch.isfinite(p.grad).all() for p in weights)
    assert torch.isfinite(zg.grad).all() and zg.grad.abs().sum() > 0


def test_cached_plan_follows_new_weights():
    """Changing the weights in place (as an optimiser or load_state_dict does) rebuilds the cached plan:
    draws after the change equal zuko's with the new weights."""
    torch.manual_seed(2)
    flow = zuko.flows.NSF(4, 2, transforms=2, hidden_features=(16, 16), passes=2)
    ref = zuko.flows.NSF(4, 2, transforms=2, hidden_features=(16, 16), passes=2)
    use_fast_splines(flow)
    c, z = torch.randn(2), torch.randn(30, 4)
    with torch.no_grad():
        flow(c).transform.inv(z)  # builds and caches the plans
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
        ref.load_state_dict(flow.state_dict())
        assert torch.allclose(flow(c).transform.inv(z), ref(c).transform.inv(z), atol=1e-4)


def test_transform_is_the_switched_class():
    """use_fast_splines makes an NSF's transforms build GroupwiseAutoregressiveTransform."""
    flow = zuko.flows.NSF(3, 2, transforms=2)
    use_fast_splines(flow)
    assert all(isinstance(t(torch.zeros(2)), GroupwiseAutoregressiveTransform) for t in flow.transform.transforms)


def test_custom_adjacency_keeps_zukos_inverse():
    """A spline transform built from a custom adjacency (no feature order) gets the fast spline but keeps
    zuko's inverse, and its draws equal zuko's (1e-4)."""
    torch.manual_seed(4)
    adjacency = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=bool)
    t = zuko.flows.autoregressive.MaskedAutoregressiveTransform(
        3, 2, adjacency=adjacency, univariate=zuko.transforms.MonotonicRQSTransform,
        shapes=[(8,), (8,), (7,)])
    flow = zuko.lazy.Flow([t], zuko.lazy.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(3), torch.ones(3), buffer=True))
    c, z = torch.randn(2), torch.randn(40, 3)
    with torch.no_grad():
        ref = flow(c).transform.inv(z)
        assert use_fast_splines(flow) == 1 and type(t) is MaskedAutoregressiveTransform
        assert torch.allclose(flow(c).transform.inv(z), ref, atol=1e-4)


@pytest.mark.parametrize("features", [2, 7, 15])
@pytest.mark.parametrize("odd_first", [False, True])
def test_interleaved_coupling_splits_neighbours_and_inverts(features, odd_first):
    """The interleaved coupling transform's two groups are the even and the odd features (so every
    pair of neighbours is split: in the DESI posterior, tau_ism and dust_index); it starts as the
    identity (|y - x| < 1e-6, log-determinant < 1e-6 in float32); with trained-like random weights
    the group-wise inverse equals zuko's to 1e-4 (values) and 1e-4 + 1e-4 relative (log-determinants
    of up to ~20 nats, summed over 15 features in float32)."""
    from sedppl.infer.npe import interleaved_coupling, interleaved_order

    group = interleaved_order(features, odd_first) // -(-features // 2)
    first = 1 if odd_first else 0
    assert group.tolist() == [0 if i % 2 == first else 1 for i in range(features)]
    torch.manual_seed(1)
    t = interleaved_coupling(features, 3, (32, 32), odd_first=odd_first)
    assert torch.equal(t.order, group)
    c, x = torch.randn(4, 3), torch.randn(4, features)
    y, ladj = t(c).call_and_ladj(x)
    assert (y - x).abs().max() < 1e-6 and ladj.abs().max() < 1e-6
    with torch.no_grad():
        for p in t.hyper.parameters():
            p.normal_(0, 0.3)
        z = torch.randn(20, 4, features)
        ref_x, ref_ladj = t(c).inv.call_and_ladj(z)
        use_fast_splines(t)
        assert isinstance(t(c), GroupwiseAutoregressiveTransform)
        x, ladj = t(c).inv.call_and_ladj(z)
    assert torch.allclose(x, ref_x, atol=1e-4) and torch.allclose(ladj, ref_ladj, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("passes", [2, 3, None])
def test_every_hidden_unit_is_computed_once(passes):
    """The passes split each hidden layer's units by level (the pass from which a unit can be
    computed): together they are every unit exactly once; for a coupling transform (2 passes) the
    draws' pass computes about half of each layer (zuko assigns hidden units to the groups in turn),
    the other half being fed by the context alone."""
    from sedppl.infer.autoregressive import _Plan

    torch.manual_seed(5)
    t = zuko.flows.NSF(7, 3, transforms=1, hidden_features=(32, 24), passes=passes).transform.transforms[0]
    plan = _Plan(t)
    for layer, width in zip(plan.units, (32, 24)):
        assert sorted(torch.cat(layer).tolist()) == list(range(width))
    if passes == 2:
        assert [len(u) for u in plan.units[0]] == [16, 16] and [len(u) for u in plan.units[1]] == [12, 12]
