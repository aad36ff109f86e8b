"""Drawing from a masked autoregressive flow one group of features per network pass.

zuko inverts a masked autoregressive transform y = f(x; c) by ``passes`` full
evaluations of its masked network, each at a batch of every draw and each giving
the parameters of every feature, and then evaluates the network once more for
the log-determinant. Most of that work can be skipped without changing the
result. Features come in groups (one per pass; two for a coupling transform):
the parameters of group g depend only on the context and on the features of the
groups before g, so

* the parameters of the first group depend on the context alone: one network
  evaluation per galaxy, not one per draw;
* the part of the first layer that the context feeds is the same for every
  draw and every pass: computed once per galaxy;
* a hidden unit fed (through the masks) by the groups before g only is final
  once they are solved: each pass computes only the units that its group newly
  makes computable, so over all passes every unit is computed once (for a
  coupling transform: half the units per draw, a quarter of the products
  between hidden layers);
* each pass needs the output rows of its own group only, and solving the groups
  in order leaves each group's parameters final, so the log-determinant of the
  inverse comes with the passes (for the spline, from the inverse's own bin
  position: :meth:`sedppl.infer.splines.RationalQuadraticSpline.inverse_and_ladj`).

Inside ``torch.compile`` the same passes run with every tensor laid out features
first and draws last (:meth:`GroupwiseAutoregressiveTransform.solve_features_first`):
the spline's element-wise work then fuses into kernels that are vectorised along
the draws, about 1.8x faster for the whole compiled flow than the gathers of the
eager layout (``benchmarks/RESULTS.md``), while eager drawing keeps the layout
that is fastest without a compiler.

:class:`GroupwiseAutoregressiveTransform` is the transform for one context;
its forward direction (parameters -> base draws: densities, training) is zuko's.
:func:`sedppl.infer.splines.use_fast_splines` switches a trained flow to it.

References:
    Papamakarios et al. 2017, "Masked Autoregressive Flow for Density Estimation"
    (arXiv:1705.07057); Germain et al. 2015, "MADE" (arXiv:1502.03509).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import constraints
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.transforms import Transform
from zuko.utils import unpack


class GroupwiseAutoregressiveTransform(Transform):
    """A masked autoregressive transform for one context, inverted group by group.

    Arguments:
        module: The lazy transform (zuko's ``MaskedAutoregressiveTransform``: its masked
            network ``hyper``, its groups ``order``, its univariate transformation).
        c: The context, (*, C), or None for an unconditional transform.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, module: MaskedAutoregressiveTransform, c: Tensor | None) -> None:
        super().__init__()
        self.module = module
        self.c = c
        self.meta = functools.partial(module.meta, c)

    @property
    def inv(self) -> Transform:
        """The inverse transform (base draws -> parameters), solved group by group."""
        return _GroupwiseInverse(self)

    def _call(self, x: Tensor) -> Tensor:
        return self.meta(x)(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.solve(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det dy/dx| (*) at parameters x (*, D) (zuko's forward evaluation)."""
        return self.meta(x).log_abs_det_jacobian(x, y)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """y = f(x) and log|det dy/dx| for parameters x (*, D) (zuko's forward evaluation: one pass)."""
        return self.meta(x).call_and_ladj(x)

    def solve(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """x = f^-1(y) and log|det df/dx| at x, one group of features per network pass.

        Each pass computes only the hidden units that its group newly makes computable (see
        :class:`_Plan`), from the units of the passes before it; the units that depend on the
        context alone are computed once per context, not once per draw.

        Arguments:
            y: Base-side values, (*, D), with * broadcastable against the context's batch shape.

        Returns:
            x (*, D) and the forward log-determinant log|det df/dx| (*).
        """
        m = self.module
        plan = _plan(m)
        nb = 0 if self.c is None else self.c.dim() - 1
        ns = y.dim() - 1 - nb  # y's sample dimensions (before the context's batch ones)
        if _parameter_major() and ns >= 0:
            done = self.solve_features_first(y.permute(y.dim() - 1, *range(ns, ns + nb), *range(ns)))
            if done is not None:  # back to y's layout, as views
                xt, ladj = done
                return xt.permute(*range(1 + nb, 1 + nb + ns), *range(1, 1 + nb), 0), \
                    ladj.permute(*range(nb, nb + ns), *range(nb))
        acts = plan.activations
        # hidden[k][q]: the post-activation units of hidden layer k that pass q computed
        hidden: list[list[Tensor]] = [[] for _ in acts]
        solved: list[Tensor] = []  # the groups' x, in solving order
        ladj = y.new_zeros(())
        for p, (feats, cols, first, layers, out, _) in enumerate(plan.passes):
            w_c, w_x, b = first
            # the first layer: context (the same for every draw) + the groups solved so far
            pre = b if self.c is None else F.linear(self.c, w_c, b)
            for x_q, w in zip(solved, w_x):
                pre = pre + F.linear(x_q, w)
            hidden[0].append(acts[0](pre))
            for k, (ws, b) in enumerate(layers, start=1):
                pre = _combine(hidden[k - 1], ws, b)
                hidden[k].append(acts[k](pre))
            phi = _combine(hidden[-1], *out)
            y_g = y[..., plan.columns[cols[0]]]
            if plan.inverse is not None:
                x_g, ladj_g = plan.inverse(phi.unflatten(-1, (-1, m.total)), y_g)
            else:
                u = m.univariate(*unpack(phi.unflatten(-1, (-1, m.total)), m.shapes))
                if hasattr(u, "inverse_and_ladj"):
                    x_g, ladj_g = u.inverse_and_ladj(y_g)
                else:
                    x_g = u.inv(y_g)
                    ladj_g = u.log_abs_det_jacobian(x_g, y_g)
            x_g = x_g.expand(*y.shape[:-1], x_g.shape[-1])
            solved.append(x_g)
            ladj = ladj + ladj_g.sum(-1)
        x = _assemble(plan, solved, y, -1)
        return x, ladj.expand(x.shape[:-1])

    def solve_features_first(self, yt: Tensor) -> tuple[Tensor, Tensor] | None:
        """:meth:`solve` with every tensor laid out features first: (D, *batch, *sample), the context's
        batch dimensions, then the draws', which vary fastest.

        For ``torch.compile`` (see :func:`_parameter_major`): the layers are products ``W @ h``, each
        spline parameter is a contiguous slab, and the fused spline kernel runs along the draws with
        the per-galaxy terms broadcast, vectorised. The results are :meth:`solve`'s (to rounding).

        Arguments:
            yt: Base-side values, (D, *batch, *sample), with ``batch`` the context's batch shape.

        Returns:
            x (D, *batch, *sample) and log|det df/dx| (*batch, *sample); None where this layout is not
            available (a univariate transform without ``inverse_from_rows``, or a batch shape that is
            not the context's).
        """
        m = self.module
        plan = _plan(m)
        nb = 0 if self.c is None else self.c.dim() - 1
        if plan.inverse_rows is None or (self.c is not None and yt.shape[1:1 + nb] != self.c.shape[:-1]):
            return None
        acts = plan.activations
        ns = yt.dim() - 1 - nb
        hidden: list[list[Tensor]] = [[] for _ in acts]
        solved: list[Tensor] = []
        ladj = yt.new_zeros(())
        for feats, cols, first, layers, _, out_rows in plan.passes:
            w_c, w_x, b = first
            if self.c is None:
                pre = b.view(-1, *[1] * (nb + ns))
            else:  # the context's part: once per galaxy, broadcast along the draws
                pre = F.linear(self.c, w_c, b).movedim(-1, 0).reshape(-1, *self.c.shape[:-1], *[1] * ns)
            for x_q, w in zip(solved, w_x):
                pre = pre + _rows_product(w, x_q)
            hidden[0].append(acts[0](pre))
            for k, (ws, b) in enumerate(layers, start=1):
                hidden[k].append(acts[k](_combine_rows(hidden[k - 1], ws, b, nb + ns)))
            phi = _combine_rows(hidden[-1], *out_rows, nb + ns)  # (total * F, ...), parameter by parameter
            x_g, ladj_g = plan.inverse_rows(phi.unflatten(0, (m.total, -1)), yt[plan.columns[cols[0]]])
            solved.append(x_g)
            ladj = ladj + ladj_g.sum(0)
        return _assemble(plan, solved, yt, 0), ladj.expand(yt.shape[1:])


def _assemble(plan: "_Plan", solved: list[Tensor], like: Tensor, dim: int) -> Tensor:
    """The groups' solved features (in solving order) put back in feature order along ``dim`` of a
    tensor shaped like ``like``: one concatenation where the groups are consecutive columns."""
    if plan.contiguous:
        return torch.cat([solved[p] for p in plan.column_order], dim=dim)
    x = torch.zeros_like(like)
    for (feats, *_), x_g in zip(plan.passes, solved):
        x = x.index_copy(dim, feats, x_g)
    return x


def _parameter_major() -> bool:
    """Whether the inverse takes each group's spline parameters first
    (:meth:`sedppl.infer.splines.RationalQuadraticSpline.inverse_from_rows`): inside ``torch.compile``
    only, where that is one vectorised kernel; eager, the gathers of ``inverse_from_parameters`` are faster."""
    return torch.compiler.is_compiling()


def _rows_product(w: Tensor, h: Tensor) -> Tensor:
    """w @ h for units first: weights (R, H) and inputs (H, *) -> (R, *)."""
    return (w @ h.reshape(h.shape[0], -1)).view(w.shape[0], *h.shape[1:])


def _combine_rows(inputs: list[Tensor], weights: list[Tensor | None], bias: Tensor, dims: int) -> Tensor:
    """:func:`_combine` with units first: bias + sum_q weights[q] @ inputs[q], (rows, *), for inputs
    (H_q, *) of ``dims`` trailing dimensions each (size 1 where they do not vary)."""
    out = bias.view(-1, *[1] * dims)
    for h, w in zip(inputs, weights):
        if w is not None:
            out = out + _rows_product(w, h)
    return out


def _combine(inputs: list[Tensor], weights: list[Tensor | None], bias: Tensor) -> Tensor:
    """bias + sum_q inputs[q] @ weights[q].T, skipping the blocks without weights (no units, or no links)."""
    out = None
    for h, w in zip(inputs, weights):
        if w is None:
            continue
        out = F.linear(h, w, bias) if out is None else out + F.linear(h, w)
    return bias if out is None else out


class _Plan:
    """What the group-wise inverse of one masked network needs, computed once per set of weights.

    A hidden unit of a masked network depends on the features of some groups. Its *level* is the
    pass from which it can be computed: 0 for the units that the context alone feeds, else one more
    than the last group (in solving order) that reaches it. Pass p needs the units of levels <= p
    (its group's outputs are fed by no others) and computes those of level p only: over all passes,
    every unit is computed once. For a coupling transform that halves the units computed per draw
    and quarters the products between hidden layers, since the level-0 half is per context.
    """

    def __init__(self, m: MaskedAutoregressiveTransform) -> None:
        layers = list(m.hyper)
        linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
        if 2 * len(linears) - 1 != len(layers) or not all(isinstance(x, nn.Linear) for x in layers[::2]):
            raise NotImplementedError("group-wise inversion needs a plain masked MLP (no residual blocks)")
        self.activations = layers[1::2]
        # the univariate transform's inverse straight from its parameters, where it has one
        # (sedppl.infer.splines.RationalQuadraticSpline.inverse_from_parameters): fewer operations
        u = m.univariate
        fused = getattr(getattr(u, "func", u), "inverse_from_parameters", None)
        self.inverse = None if fused is None or getattr(u, "args", ()) else \
            functools.partial(fused, **getattr(u, "keywords", {}))
        # the same with the parameters first (inside torch.compile: see _parameter_major)
        rows_first = getattr(getattr(u, "func", u), "inverse_from_rows", None)
        self.inverse_rows = None if rows_first is None or self.inverse is None else \
            functools.partial(rows_first, **getattr(u, "keywords", {}))
        self.weights = [layer.mask * layer.weight for layer in linears]
        masks = [layer.mask.bool() for layer in linears]
        biases = [layer.bias for layer in linears]
        d = m.order.numel()
        values = torch.unique(m.order).tolist()
        position = torch.empty(d, dtype=torch.long, device=m.order.device)
        for p, g in enumerate(values):
            position[m.order == g] = p
        # each hidden unit's level: see the class docstring
        levels = [(masks[0][:, :d] * (position + 1)).amax(1)]
        for mask in masks[1:-1]:
            levels.append((mask * levels[-1]).amax(1))
        units = [[torch.nonzero(lv == p).squeeze(-1) for p in range(len(values))] for lv in levels]
        self.units = units  # per hidden layer, per level: the units' indices

        def block(w: Tensor, mask: Tensor, rows: Tensor, below: list[Tensor], upto: int) -> list[Tensor | None]:
            """w[rows][:, units of level q below] for q <= upto, None where empty or unlinked."""
            return [w[rows][:, cols] if rows.numel() and cols.numel() and mask[rows][:, cols].any() else None
                    for cols in below[:upto + 1]]

        # per pass, in solving order: its features (index and list); the first layer's context weights,
        # weights per group solved before it and bias; per later hidden layer its weights per level and
        # bias; its output rows' weights per level and bias, feature by feature (out) and parameter by
        # parameter (out_rows)
        self.passes = []
        for p, g in enumerate(values):
            feats = torch.nonzero(m.order == g).squeeze(-1)
            rows0 = units[0][p]
            w0 = self.weights[0][rows0]
            w_x = [w0[:, torch.nonzero(m.order == values[q]).squeeze(-1)] for q in range(p)]
            first = (w0[:, d:], w_x, biases[0][rows0])
            later = [(block(self.weights[k], masks[k], units[k][p], units[k - 1], p), biases[k][units[k][p]])
                     for k in range(1, len(linears) - 1)]
            rows = (feats[:, None] * m.total + torch.arange(m.total, device=feats.device)).reshape(-1)
            last = masks[-1][rows]
            if any(last[:, units[-1][q]].any() for q in range(p + 1, len(values))):
                raise NotImplementedError("an output of a group is fed by units of a later group")
            out = (block(self.weights[-1], masks[-1], rows, units[-1], p), biases[-1][rows])
            # the same output rows parameter by parameter (all features' first parameter, ...)
            rows = (feats[None, :] * m.total + torch.arange(m.total, device=feats.device)[:, None]).reshape(-1)
            out_rows = (block(self.weights[-1], masks[-1], rows, units[-1], p), biases[-1][rows])
            self.passes.append((feats, feats.tolist(), first, later, out, out_rows))
        # each group's columns of y: a slice (a view) where they are consecutive, else an index
        self.columns = {g[1][0]: slice(g[1][0], g[1][-1] + 1) if g[1] == list(range(g[1][0], g[1][-1] + 1))
                        else g[0] for g in self.passes}
        cols = sorted(c for g in self.passes for c in g[1])
        spans = sorted((g[1][0], g[1][-1]) for g in self.passes)
        # the passes in the order of their columns (for concatenating contiguous groups)
        self.column_order = sorted(range(len(self.passes)), key=lambda p: self.passes[p][1][0])
        self.contiguous = all(isinstance(c, slice) for c in self.columns.values()) and \
            cols == list(range(len(cols))) and all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))


def _plan(m: MaskedAutoregressiveTransform) -> _Plan:
    """The cached :class:`_Plan` of ``m``, rebuilt when a weight changed (training, ``load_state_dict``)
    or when gradients are wanted (the cached masked weights carry none)."""
    cached = getattr(m, "_groupwise_plan", None)
    if torch.compiler.is_compiling() and cached is not None:
        # inside torch.compile (NeuralPosterior.compile): the plan of the eager warm-up call, so the
        # compiled code is for fixed weights (compile after training or loading)
        return cached[1]
    key = tuple((p.data_ptr(), p._version) for p in m.hyper.parameters())
    if torch.is_grad_enabled():
        return _Plan(m)
    if cached is None or cached[0] != key:
        cached = (key, _Plan(m))
        m._groupwise_plan = cached
    return cached[1]


class _GroupwiseInverse(Transform):
    """y -> x of a :class:`GroupwiseAutoregressiveTransform`."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, forward: GroupwiseAutoregressiveTransform) -> None:
        super().__init__()
        self._forward = forward

    @property
    def inv(self) -> Transform:
        return self._forward

    def _call(self, y: Tensor) -> Tensor:
        return self._forward.solve(y)[0]

    def _inverse(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def log_abs_det_jacobian(self, y: Tensor, x: Tensor) -> Tensor:
        return -self._forward.log_abs_det_jacobian(x, y)

    def call_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, ladj = self._forward.solve(y)
        return x, -ladj

    def call_and_ladj_features_first(self, yt: Tensor) -> tuple[Tensor, Tensor] | None:
        """:meth:`call_and_ladj` for values laid out features first, (D, *batch, *sample) -> the same
        layout and (*batch, *sample); None where that layout is not available (see
        :meth:`GroupwiseAutoregressiveTransform.solve_features_first`)."""
        solved = self._forward.solve_features_first(yt)
        return None if solved is None else (solved[0], -solved[1])


class GroupwiseMaskedAutoregressiveTransform(MaskedAutoregressiveTransform):
    """zuko's lazy masked autoregressive transform that builds :class:`GroupwiseAutoregressiveTransform`.

    Same parameters and state dict as zuko's; :func:`sedppl.infer.splines.use_fast_splines`
    switches a flow's transforms to this class.
    """

    def forward(self, c: Tensor | None = None) -> Transform:
        """The transform for context ``c`` (*, C)."""
        return GroupwiseAutoregressiveTransform(self, c)
