"""Prior whitening: map a latent value through its prior's CDF to a standard normal coordinate.

For a site whose prior is univariate (Uniform, Normal or Student-t, the priors of
the zoo models), w = Phi^-1(F_prior(x)) is N(0, 1) under the prior. A flow in w
starts from the prior exactly and only has to learn how the data move and
shrink it; in particular heavy prior tails (the continuity prior's Student-t
with 2 degrees of freedom) need not be carved by splines from a Gaussian base,
which the plain unconstrained (logit/identity) coordinates would demand.

Coordinates are clipped to |w| <= 5.5 (prior tail mass 4e-8), which keeps every
value strictly inside bounded supports in float32. Computations are in float64
with scipy. :meth:`Whitener.from_white_torch` is the same map in torch,
differentiable and unclipped, for MCMC in the flow's coordinates
(:mod:`sedppl.infer.neutra`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro.distributions as dist
import torch
from scipy import special, stats
from torch import Tensor

W_MAX = 5.5


class _StudentQuantile(torch.autograd.Function):
    """t = F_t^-1(Phi(w)) for a standard Student-t with ``df``; dt/dw = phi(w) / f_t(t)."""

    @staticmethod
    def forward(ctx, w: Tensor, df: float) -> Tensor:
        wn = w.detach().double().cpu().numpy()
        t = np.where(wn < 0, stats.t.ppf(special.ndtr(wn), df), stats.t.isf(special.ndtr(-wn), df))
        out = torch.as_tensor(t, dtype=w.dtype)
        ctx.save_for_backward(w, out)
        ctx.df = df
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, t = ctx.saved_tensors
        log_phi = -0.5 * w**2 - 0.5 * math.log(2 * math.pi)
        log_ft = torch.distributions.StudentT(ctx.df).log_prob(t)
        return grad * torch.exp(log_phi - log_ft), None


@dataclass
class Whitener:
    """The prior of one site: ``kind`` in {"uniform", "normal", "studentt"} and its scalar parameters."""

    kind: str
    params: tuple[float, ...]

    def to_white(self, x: np.ndarray) -> np.ndarray:
        """Constrained values -> standard-normal coordinates."""
        x = np.asarray(x, np.float64)
        if self.kind == "uniform":
            a, b = self.params
            w = special.ndtri(np.clip((x - a) / (b - a), 1e-300, 1.0))
        elif self.kind == "normal":
            mu, sd = self.params
            w = (x - mu) / sd
        else:
            df, mu, sd = self.params
            t = (x - mu) / sd
            w = np.where(t < 0, special.ndtri(stats.t.cdf(t, df)), -special.ndtri(stats.t.sf(t, df)))
        return np.clip(w, -W_MAX, W_MAX)

    def from_white(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standard-normal coordinates -> (constrained values, log|dx/dw|)."""
        w = np.clip(np.asarray(w, np.float64), -W_MAX, W_MAX)
        log_phi = -0.5 * w**2 - 0.5 * np.log(2 * np.pi)
        if self.kind == "uniform":
            a, b = self.params
            return a + (b - a) * special.ndtr(w), np.log(b - a) + log_phi
        if self.kind == "normal":
            mu, sd = self.params
            return mu + sd * w, np.full_like(w, np.log(sd))
        df, mu, sd = self.params
        t = np.where(w < 0, stats.t.ppf(special.ndtr(w), df), stats.t.isf(special.ndtr(-w), df))
        return mu + sd * t, log_phi - stats.t.logpdf(t, df) + np.log(sd)

    def from_white_torch(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Standard-normal coordinates -> (constrained values, log|dx/dw|), in torch: differentiable in ``w``
        and not clipped (the prior's own coordinates, for HMC). Same dtype as ``w``."""
        log_phi = -0.5 * w**2 - 0.5 * math.log(2 * math.pi)
        if self.kind == "uniform":
            a, b = self.params
            return a + (b - a) * torch.special.ndtr(w), math.log(b - a) + log_phi
        if self.kind == "normal":
            mu, sd = self.params
            return mu + sd * w, torch.full_like(w, math.log(sd))
        df, mu, sd = self.params
        t = _StudentQuantile.apply(w, df)
        return mu + sd * t, log_phi - torch.distributions.StudentT(df).log_prob(t) + math.log(sd)


def _scalar(v) -> float | None:
    v = np.unique(np.asarray(v.detach() if hasattr(v, "detach") else v, np.float64))
    return float(v[0]) if v.size == 1 else None


def whitener_for(fn) -> Whitener | None:
    """The :class:`Whitener` of a Pyro site distribution with a univariate prior, or None."""
    d = fn
    while hasattr(d, "base_dist"):  # Independent, Expanded, Masked wrappers
        d = d.base_dist
    if isinstance(d, dist.Uniform):
        p = (_scalar(d.low), _scalar(d.high))
        kind = "uniform"
    elif isinstance(d, dist.Normal):
        p = (_scalar(d.loc), _scalar(d.scale))
        kind = "normal"
    elif isinstance(d, dist.StudentT):
        p = (_scalar(d.df), _scalar(d.loc), _scalar(d.scale))
        kind = "studentt"
    else:
        return None
    return None if any(v is None for v in p) else Whitener(kind, p)
