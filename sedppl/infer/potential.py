"""The potential energy of many independent targets (galaxies x chains) of one Pyro program.

A Pyro program whose latent sites all lie in one plate over B targets (the zoo
models' galaxy plate) has a joint density that is a product over targets, so
one evaluation with a plate of B gives every target's log density, and one
backward pass of their sum every target's gradient. :class:`BatchedPotential`
returns them per target, in flat coordinates (B, D) that a coordinates object
maps to the sites: :class:`UnconstrainedCoordinates` (``biject_to`` of each
site's support, as NUTS uses) or the base space of an amortized flow
(:class:`sedppl.infer.neutra.FlowCoordinates`). :func:`find_modes` and
:func:`laplace_covariance` give every target's mode and Laplace covariance.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .whitening import StudentTQuantiles, whitener_for


@contextmanager
def physics_dtype(model: Callable, dtype: torch.dtype) -> Iterator[None]:
    """Run a model's physics in ``dtype`` inside the block; every tensor's own type is restored after.

    The zoo models keep their physics in ``model.forward_model`` (a torch module,
    float32 by default); its buffers are converted (float32 values round-trip exactly).
    A model without that attribute is left alone: its own code decides its precision.

    Why: the potential of a high-S/N spectrum is a sum over thousands of pixels (its
    value ~2.6e4 for the case below); in float32 the difference of its values at two points 2e-6 apart is
    wrong by up to ~4 (measured: the DESI-like model on the SDSS spectrum of NGC 3073,
    7,781 pixels, 8 amortized-posterior draws), so HMC sees energy errors of that size
    at any step size and its step-size adaptation collapses; in float64 the error is 1e-8.
    """
    fm = getattr(model, "forward_model", None)
    if not isinstance(fm, torch.nn.Module) or dtype is None:
        yield
        return
    before = {n: t.dtype for n, t in list(fm.named_buffers()) + list(fm.named_parameters())}
    fm.to(dtype)
    try:
        yield
    finally:
        for prefix, mod in fm.named_modules():
            for k, t in list(mod._buffers.items()):
                name = f"{prefix}.{k}" if prefix else k
                if t is not None and t.dtype != before.get(name, t.dtype):
                    mod._buffers[k] = t.to(before[name])
            for k, t in list(mod._parameters.items()):
                name = f"{prefix}.{k}" if prefix else k
                if t is not None and t.dtype != before.get(name, t.dtype):
                    mod._parameters[k] = torch.nn.Parameter(t.detach().to(before[name]), t.requires_grad)


class UnconstrainedCoordinates:
    """A model's latent sites as one flat vector per target, each site mapped to R^d by
    ``biject_to(support).inv`` (NUTS's coordinates), sites in sorted order; a site whose
    prior is a Student-t with scalar parameters is mapped by its prior's quantiles instead.

    Why the Student-t sites differ: a heavy-tailed prior (the continuity prior's
    ``log_sfr_ratio``, 2 degrees of freedom: infinite variance) on a parameter the data
    do not constrain (the ratio of two bins that hold almost no mass) leaves the
    posterior as heavy-tailed as the prior, which HMC with any fixed step size and mass
    matrix explores badly (chains that stay in the core for hundreds of draws and then
    wander 10 scales out: R-hat 1.69 on one such ratio for NGC 3073, docs/data.md). In
    w = Phi^-1(F_t(x)) the prior is N(0, 1) exactly, so an unconstrained ratio is a
    standard normal to HMC, and a constrained one is a smooth map of it.

    Arguments:
        trace: One trace of the model with a plate of B targets; every latent site must
            have a value of shape (B, *event).
        dtype: Floating type of the site values handed to the model (float32, or float64
            for a model whose physics runs in double precision: see :func:`physics_dtype`).
        student_t_quantiles: Map Student-t sites through their prior quantiles (True, the
            default), or like any other site of real support (identity; False).
    """

    def __init__(self, trace: poutine.Trace, dtype: torch.dtype = torch.float32,
                 student_t_quantiles: bool = True):
        self.dtype = dtype
        latent = {k: s for k, s in trace.nodes.items()
                  if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
        if not latent:
            raise ValueError("the model has no latent sample sites")
        self.names = sorted(latent)
        batch = latent[self.names[0]]["value"].shape[:1]
        self.transforms, self.event_shapes, self.sizes = {}, {}, []
        for k in self.names:
            fn, value = latent[k]["fn"], latent[k]["value"]
            white = whitener_for(fn) if student_t_quantiles else None
            event = tuple(fn.event_shape)
            if value.dim() != 1 + len(event) or value.shape[:1] != batch:
                raise ValueError(f"site {k!r} has shape {tuple(value.shape)}; every latent site must be "
                                 f"(targets, *event) inside one plate of {tuple(batch)} targets")
            t = StudentTQuantiles(*white.params) if white is not None and white.kind == "studentt" \
                else biject_to(fn.support)
            self.transforms[k] = t
            self.event_shapes[k] = tuple(t.inv(value).shape[1:])
            self.sizes.append(int(np.prod(self.event_shapes[k], dtype=int)))
        self.dim = sum(self.sizes)

    def constrain(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Constrained {site: value (B, *event)} (``dtype``) and log |du -> x Jacobian| (B,) from u (B, D)."""
        values, logdet = {}, torch.zeros(u.shape[0], dtype=u.dtype)
        for k, v in zip(self.names, torch.split(u, self.sizes, dim=-1)):
            v = v.reshape((u.shape[0],) + self.event_shapes[k])
            t = self.transforms[k]
            x = t(v)
            logdet = logdet + t.log_abs_det_jacobian(v, x).reshape(u.shape[0], -1).sum(-1)
            values[k] = x.to(self.dtype)
        return values, logdet

    def flatten(self, values: dict[str, Tensor]) -> Tensor:
        """u (B, D) float64 from constrained {site: value (B, *event)}."""
        return torch.cat([self.transforms[k].inv(values[k].double()).reshape(values[k].shape[0], -1)
                          for k in self.names], dim=-1).detach()


class BatchedPotential:
    """Per-target potential energy of a Pyro program.

    Arguments:
        model: The Pyro program; every latent site must lie inside one plate of B targets.
        args, kwargs: Passed to the model (e.g. ``obs=...`` with B galaxies).
        coordinates: How a flat vector (B, D) maps to the latent sites: an object with
            ``names``, ``dim``, ``constrain(u) -> (values, log_jacobian)`` and
            ``flatten(values) -> u``; :class:`UnconstrainedCoordinates` by default
            (:class:`sedppl.infer.neutra.FlowCoordinates`: the base space of an amortized flow).
        dtype, student_t_quantiles: Of the default coordinates (see :class:`UnconstrainedCoordinates`).

    Call with u (B, D) float64; returns U (B,) = -(log joint density + log |Jacobian|) per target.
    """

    def __init__(self, model: Callable, args: tuple = (), kwargs: dict | None = None, coordinates=None,
                 dtype: torch.dtype = torch.float32, student_t_quantiles: bool = True):
        self.model, self.args, self.kwargs = model, args, dict(kwargs or {})
        tr = poutine.trace(model).get_trace(*args, **self.kwargs)
        self.coords = coordinates if coordinates is not None else \
            UnconstrainedCoordinates(tr, dtype, student_t_quantiles)
        latent = {k for k, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
                  and not site_is_subsample(s)}
        if set(self.coords.names) != latent:
            raise ValueError(f"the coordinates cover the sites {sorted(self.coords.names)}; the model's latent "
                             f"sites are {sorted(latent)}")
        self.names = list(self.coords.names)
        self.dim = self.coords.dim

    def constrain(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Constrained {site: value (B, *event)} and log |Jacobian| (B,)."""
        return self.coords.constrain(u)

    def flatten(self, values: dict[str, Tensor]) -> Tensor:
        """u (B, D) float64 from constrained {site: value (B, *event)}."""
        return self.coords.flatten(values)

    def log_densities(self, u: Tensor) -> tuple[Tensor, dict[str, Tensor], poutine.Trace]:
        """Per-target log prior + log likelihood + log |Jacobian| (B,), the observed sites'
        log likelihoods {site: (B,)}, and the trace."""
        values, logdet = self.constrain(u)
        # without argument validation, a target whose proposal overflows the physics (a wild leapfrog
        # step) gets a non-finite density of its own (rejected as divergent) instead of stopping the batch
        with pyro.validation_enabled(False):
            tr = poutine.trace(poutine.condition(self.model, data=values)).get_trace(*self.args, **self.kwargs)
        tr.compute_log_prob()
        total = logdet
        loglik = {}
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic", False):
                continue
            lp = site["log_prob"]
            if lp.dim() == 0 or lp.shape[-1] != u.shape[0]:
                raise ValueError(f"site {name!r} has log-density shape {tuple(lp.shape)}: it is not inside "
                                 f"the plate of {u.shape[0]} targets")
            lp = lp.reshape(-1, u.shape[0]).sum(0).to(u.dtype)
            total = total + lp
            if name not in self.names:  # observed (the latents are conditioned, not observed)
                loglik[name] = lp
        return total, loglik, tr

    def __call__(self, u: Tensor) -> Tensor:
        return -self.log_densities(u)[0]

    def value_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """U (B,) and dU/du (B, D), non-finite values kept (callers treat them as divergent)."""
        u = u.detach().requires_grad_(True)
        pot = self(u)
        (grad,) = torch.autograd.grad(pot.sum(), u)
        return pot.detach(), grad.detach()

    def prior_draw(self) -> Tensor:
        """u (B, D): one draw of the prior for every target."""
        tr = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
        return self.flatten({k: tr.nodes[k]["value"] for k in self.names})


def find_modes(potential: BatchedPotential, starts: Tensor, steps: int = 200) -> tuple[Tensor, Tensor]:
    """Minimise every target's potential from ``starts`` (B, D) by L-BFGS on their sum.

    The targets are independent, so the sum's minimum is every target's minimum;
    non-finite potentials count as 1e30.

    Returns:
        (u (B, D), U (B,)).
    """
    x = starts.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-12, history_size=20)

    def closure():
        opt.zero_grad()
        pot = potential(x)
        pot = torch.where(torch.isfinite(pot), pot, torch.full_like(pot, 1e30))
        pot.sum().backward()
        return pot.sum()

    opt.step(closure)
    with torch.no_grad():
        u = x.detach()
        return u, potential(u)


def laplace_covariance(potential: BatchedPotential, u: Tensor, step: float = 1e-3,
                       max_sd: float = 10.0) -> Tensor:
    """Inverse Hessian of every target's potential at u (B, D): (B, D, D), eigenvalues
    made positive and floored at ``1 / max_sd**2`` (2 D batched gradients)."""
    b, d = u.shape
    hess = torch.zeros(b, d, d, dtype=u.dtype)
    for j in range(d):
        e = torch.zeros(d, dtype=u.dtype)
        e[j] = step
        hess[:, :, j] = (potential.value_and_grad(u + e)[1] - potential.value_and_grad(u - e)[1]) / (2 * step)
    hess = 0.5 * (hess + hess.transpose(-1, -2))
    hess = torch.where(torch.isfinite(hess), hess, torch.zeros_like(hess))
    evals, evecs = torch.linalg.eigh(hess)
    evals = evals.abs().clamp(min=1 / max_sd**2)
    return (evecs / evals[:, None, :]) @ evecs.transpose(-1, -2)
