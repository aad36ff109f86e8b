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
differentiable and clipped only at |w| = 35 (finite in float64), for MCMC in the flow's coordinates
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
W_TORCH_MAX = 35.0
T_TORCH_MAX = 1e30


def t_from_normal(w: np.ndarray, df: float) -> np.ndarray:
    """t = F_t^-1(Phi(w)), float64, both tails computed from their own side (no 1 - p cancellation).
    For df = 2 (the continuity prior) in closed form, t = sign(w) (1 - 2 q) / sqrt(2 q (1 - q)) with
    q = Phi(-|w|), the tail beyond |w| (from its logarithm where q < 1e-300, |w| > 37: no subnormals);
    otherwise scipy's quantile function."""
    if df == 2.0:
        w = np.asarray(w, np.float64)
        q = special.ndtr(-np.abs(w))
        qs = np.maximum(q, 1e-300)
        t = np.sign(w) * (1.0 - 2.0 * qs) / np.sqrt(2.0 * qs * (1.0 - qs))
        far = q < 1e-300
        if np.any(far):  # t = sign(w) / sqrt(2 q) to float64 precision
            t = np.where(far, np.sign(w) * np.exp(-0.5 * special.log_ndtr(-np.abs(w))) / math.sqrt(2.0), t)
        return t
    return np.where(w < 0, stats.t.ppf(special.ndtr(w), df), stats.t.isf(special.ndtr(-w), df))


def normal_from_t(t: np.ndarray, df: float) -> np.ndarray:
    """w = Phi^-1(F_t(t)), float64, the inverse of :func:`t_from_normal`. For df = 2 the tail beyond
    |t| is 1 / (s (s + |t|)) with s = sqrt(t^2 + 2), exactly and without cancellation."""
    if df == 2.0:
        s = np.sqrt(t * t + 2.0)
        return -np.sign(t) * special.ndtri(1.0 / (s * (s + np.abs(t))))
    return np.where(t < 0, special.ndtri(stats.t.cdf(t, df)), -special.ndtri(stats.t.sf(t, df)))


def t_logpdf(t: np.ndarray, df: float) -> np.ndarray:
    """log density of a standard Student-t, float64 (closed form for df = 2)."""
    if df == 2.0:
        return -1.5 * np.log1p(0.5 * t * t) - 1.5 * math.log(2.0)
    return stats.t.logpdf(t, df)


class _StudentQuantile(torch.autograd.Function):
    """t = F_t^-1(Phi(w)) for a standard Student-t with ``df``; dt/dw = phi(w) / f_t(t)."""

    @staticmethod
    def forward(ctx, w: Tensor, df: float) -> Tensor:
        # |w| <= 35 keeps t finite in float64 (Phi(-35) ~ 1e-268; t ~ 1e134 for df = 2), and |t| <= 1e30 keeps
        # it finite when a float32 model gets it: an optimiser's or a leapfrog's wild step then meets a finite,
        # vanishingly small density instead of an infinite parameter (which stops the model with an error)
        wn = np.clip(w.detach().double().cpu().numpy(), -W_TORCH_MAX, W_TORCH_MAX)
        out = torch.as_tensor(np.clip(t_from_normal(wn, df), -T_TORCH_MAX, T_TORCH_MAX), dtype=w.dtype)
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
            w = normal_from_t((x - mu) / sd, df)
        return np.clip(w, -W_MAX, W_MAX)

    def from_white(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standard-normal coordinates -> (constrained values, log|dx/dw|), element-wise, float64."""
        x, ld = WhitenedColumns([self]).from_white(np.asarray(w, np.float64)[..., None])
        return x[..., 0], ld[..., 0]

    def from_white_torch(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Standard-normal coordinates -> (constrained values, log|dx/dw|), in torch: differentiable in ``w``
        and clipped only at |w| = 35 (the prior's own coordinates, for HMC). Same dtype as ``w``."""
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


class WhitenedColumns:
    """Whiteners side by side, one per column of a flat vector: :meth:`Whitener.from_white` of every
    column in one pass per kind of prior (a few numpy operations for a catalog's draws, not a few per site).

    Arguments:
        whiteners: The whitener of each column, in order.
    """

    def __init__(self, whiteners: list[Whitener]):
        def columns(kind: str, df: float | None = None) -> tuple[np.ndarray, ...]:
            cols = [i for i, wh in enumerate(whiteners) if wh.kind == kind and (df is None or wh.params[0] == df)]
            n_params = 3 if kind == "studentt" else 2
            params = np.array([whiteners[i].params for i in cols], np.float64).reshape(len(cols), n_params)
            return (np.array(cols, np.intp), *params.T)

        self.uniform = columns("uniform")  # columns, a, b
        self.normal = columns("normal")  # columns, mu, sd
        self.studentt = [columns("studentt", df) for df in sorted({wh.params[0] for wh in whiteners
                                                                     if wh.kind == "studentt"})]  # columns, df, mu, sd

    def from_white(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standard-normal coordinates (..., K) -> (constrained values, log|dx/dw|), both (..., K), float64."""
        # columns first (K, ...): each kind's columns are whole rows, its parameters broadcast along them
        w = np.clip(np.moveaxis(np.asarray(w, np.float64), -1, 0), -W_MAX, W_MAX)
        tail = (1,) * (w.ndim - 1)
        log_phi = -0.5 * w**2 - 0.5 * np.log(2 * np.pi)
        x, ld = np.empty_like(w), np.empty_like(w)
        cols, a, b = self.uniform
        if cols.size:
            a, b = a.reshape(-1, *tail), b.reshape(-1, *tail)
            x[cols] = a + (b - a) * special.ndtr(w[cols])
            ld[cols] = np.log(b - a) + log_phi[cols]
        cols, mu, sd = self.normal
        if cols.size:
            mu, sd = mu.reshape(-1, *tail), sd.reshape(-1, *tail)
            x[cols] = mu + sd * w[cols]
            ld[cols] = np.broadcast_to(np.log(sd), (cols.size, *w.shape[1:]))
        for cols, df, mu, sd in self.studentt:
            mu, sd = mu.reshape(-1, *tail), sd.reshape(-1, *tail)
            t = t_from_normal(w[cols], float(df[0]))
            x[cols] = mu + sd * t
            ld[cols] = log_phi[cols] - t_logpdf(t, float(df[0])) + np.log(sd)
        return np.moveaxis(x, 0, -1), np.moveaxis(ld, 0, -1)


class StudentTQuantiles(torch.distributions.transforms.Transform):
    """x = mu + sd * F_t^-1(Phi(w)): standard-normal coordinates w -> a Student-t variable x,
    differentiable in w (any floating dtype); |w| is clipped at 35 and the standard t at +-1e30 (far
    beyond any density that matters) so that x stays finite in float64, and in float32 for |sd| < 1e8.

    A ``torch.distributions`` transform of real support, so it can stand wherever
    ``biject_to(constraints.real)`` does (:class:`sedppl.infer.potential.UnconstrainedCoordinates`).
    Under x ~ StudentT(df, mu, sd), w ~ N(0, 1) exactly.

    Arguments:
        df, mu, sd: The Student-t's degrees of freedom, location and scale (same units as x).
    """

    domain = torch.distributions.constraints.real
    codomain = torch.distributions.constraints.real
    bijective = True
    sign = 1

    def __init__(self, df: float, mu: float, sd: float):
        super().__init__()
        self.df, self.mu, self.sd = float(df), float(mu), float(sd)

    def __eq__(self, other) -> bool:
        return isinstance(other, StudentTQuantiles) and (self.df, self.mu, self.sd) == (other.df, other.mu, other.sd)

    def _call(self, w: Tensor) -> Tensor:
        return self.mu + self.sd * _StudentQuantile.apply(w, self.df)

    def _inverse(self, x: Tensor) -> Tensor:
        t = (x.detach().double().cpu().numpy() - self.mu) / self.sd
        return torch.as_tensor(normal_from_t(t, self.df), dtype=x.dtype)

    def log_abs_det_jacobian(self, w: Tensor, x: Tensor) -> Tensor:
        """log |dx/dw| = log phi(w) - log f_t((x - mu) / sd) + log sd, element-wise."""
        log_phi = -0.5 * w**2 - 0.5 * math.log(2 * math.pi)
        return log_phi - torch.distributions.StudentT(self.df).log_prob((x - self.mu) / self.sd) + math.log(self.sd)


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
