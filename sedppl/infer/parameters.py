"""The latent parameters of a Pyro model as one flat vector, constrained or unconstrained.

Amortized inference learns a density over a model's latent sites. To keep every
draw inside the prior's support, the density lives in the *unconstrained* space
that NUTS also uses: each site's value x is mapped by ``biject_to(support).inv``
to u in R^d, and the sites are concatenated in trace order into one vector.

Latent sites are the sample sites that are neither observed, nor
``pyro.deterministic``, nor the data sites ``spectrum`` and ``photometry`` (which
are sampled when a model simulates) (e.g. ``log_mass``, ``log_sfr_ratio`` (6,), ``tau_bc``);
their event shapes are read from one trace of the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ..derived import DATA_SITES
from .whitening import WhitenedColumns, Whitener, whitener_for


@dataclass
class Site:
    """One latent site: its name, event shape (per galaxy), support, and prior whitener (or None)."""

    name: str
    event_shape: tuple[int, ...]
    support: constraints.Constraint
    whitener: Whitener | None = None

    @property
    def size(self) -> int:
        """Number of scalars in one value of the site (product of its event shape)."""
        n = 1
        for s in self.event_shape:
            n *= s
        return n


class ParameterSpace:
    """Flatten, unflatten and transform a model's latent sites (one galaxy per row).

    Arguments:
        sites: The latent sites in order.
        whiten: Use prior-whitened coordinates (:mod:`sedppl.infer.whitening`) for every
            site with a univariate Uniform, Normal or Student-t prior; the other sites
            (and all sites when False) use ``biject_to(support).inv``.
    """

    def __init__(self, sites: list[Site], whiten: bool = False):
        if not sites:
            raise ValueError("the model has no latent sample sites to infer")
        self.sites = sites
        self.whiten = whiten

    def _white(self, site: Site) -> Whitener | None:
        return site.whitener if self.whiten else None

    @functools.cached_property
    def _columns(self) -> tuple[np.ndarray, WhitenedColumns]:
        """The flat columns of the whitened sites and their whiteners side by side."""
        cols, whiteners, i = [], [], 0
        for s in self.sites:
            if s.whitener is not None:
                cols += range(i, i + s.size)
                whiteners += [s.whitener] * s.size
            i += s.size
        return np.array(cols, np.intp), WhitenedColumns(whiteners)

    @classmethod
    def from_trace(cls, trace, plate_size: int, whiten: bool = False) -> "ParameterSpace":
        """Latent sites of a trace of a model run with a galaxy plate of ``plate_size``."""
        sites = []
        for name, site in trace.nodes.items():
            if (site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]
                    or name in DATA_SITES):
                continue
            value = site["value"]
            if value.dim() == 0 or value.shape[0] != plate_size:
                raise ValueError(f"latent site {name!r} has shape {tuple(value.shape)}; amortized inference "
                                 f"needs every latent site inside the galaxy plate (leading dimension {plate_size})")
            sites.append(Site(name, tuple(value.shape[1:]), site["fn"].support, whitener_for(site["fn"])))
        return cls(sites, whiten)

    @classmethod
    def from_model(cls, model, n: int = 2, whiten: bool = False, **kwargs) -> "ParameterSpace":
        """Trace ``model(n_galaxies=n, **kwargs)`` once (no gradients) and read its latent sites."""
        with torch.no_grad(), pyro.poutine.block(hide_types=["param"]):
            tr = poutine.trace(model).get_trace(n_galaxies=n, **kwargs)
        return cls.from_trace(tr, n, whiten)

    @property
    def names(self) -> list[str]:
        """Site names, in the order of the flat vector."""
        return [s.name for s in self.sites]

    @property
    def dim(self) -> int:
        """Length of the flat parameter vector."""
        return sum(s.size for s in self.sites)

    def labels(self) -> list[str]:
        """A label per flat dimension, e.g. ``log_sfr_ratio[3]``."""
        out = []
        for s in self.sites:
            out += [s.name] if s.size == 1 and not s.event_shape else [f"{s.name}[{i}]" for i in range(s.size)]
        return out

    def to_unconstrained(self, values: dict[str, Tensor]) -> Tensor:
        """{site: (N, *event)} constrained values -> (N, dim) unconstrained."""
        parts = []
        for s in self.sites:
            v = torch.as_tensor(values[s.name], dtype=torch.float32)
            wh = self._white(s)
            u = biject_to(s.support).inv(v) if wh is None else torch.as_tensor(wh.to_white(v.numpy()), dtype=torch.float32)
            parts.append(u.reshape(u.shape[0], s.size))
        return torch.cat(parts, dim=-1)

    def to_constrained(self, u: Tensor, differentiable: bool = False) -> tuple[dict[str, Tensor], Tensor]:
        """(..., dim) unconstrained (or whitened) -> ({site: (..., *event)} constrained, log|dx/du| (...,)).
        Differentiable in ``u`` for sites without a whitener, and for all sites with
        ``differentiable`` (whitened coordinates then unclipped, see
        :meth:`sedppl.infer.whitening.Whitener.from_white_torch`).

        The log-Jacobian turns a density over u into one over the constrained values:
        log p(x) = log p(u) - log|dx/du|.
        """
        out, logdet, i = {}, torch.zeros(u.shape[:-1], dtype=u.dtype), 0
        white = None
        if self.whiten and not differentiable and self._columns[0].size:  # every whitened column at once
            cols, bank = self._columns
            xn, ldn = bank.from_white(u.detach().numpy()[..., cols])
            if cols.size < u.shape[-1]:  # back to the flat columns
                full = np.zeros(u.shape, np.float64)
                full[..., cols] = xn
                xn = full
            white = torch.as_tensor(xn, dtype=u.dtype)
            logdet = torch.as_tensor(ldn.sum(-1), dtype=u.dtype)
        for s in self.sites:
            shape, lo, i = (*u.shape[:-1], *s.event_shape), i, i + s.size
            wh = self._white(s)
            if wh is not None and white is not None:  # its log-Jacobian is in logdet already
                out[s.name] = white[..., lo:i].reshape(shape)
                continue
            piece = u[..., lo:i].reshape(shape)
            if wh is not None:
                x, ld = wh.from_white_torch(piece)
            else:
                t = biject_to(s.support)
                x = t(piece)
                ld = t.log_abs_det_jacobian(piece, x)
            # elementwise transforms return per-element terms; sum any left over event dims
            ld = ld.reshape(*u.shape[:-1], -1).sum(-1) if ld.dim() > u.dim() - 1 else ld
            out[s.name], logdet = x, logdet + ld
        return out, logdet
