"""Likelihoods (noise models) for spectra and photometry, as Pyro observe statements.

Pixels or bands with zero inverse variance, or a False mask, drop out of the
likelihood exactly (masked, not down-weighted).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from .derived import is_derived_only


def _valid(ivar: Tensor, mask: Tensor | None) -> Tensor:
    ok = ivar > 0
    return ok if mask is None else ok & mask.bool()


def observe_spectrum(name: str, model: Tensor, flux: Tensor | None, ivar: Tensor,
                     mask: Tensor | None = None, jitter: Tensor | float = 1.0,
                     student_df: float | None = None) -> Tensor:
    """Observe a spectrum: Normal (or Student-t) with sigma = jitter / sqrt(ivar) per pixel.

    Arguments:
        name: Sample-site name.
        model: Model flux, (..., M), the unit of ``flux``.
        flux: Observed flux, (..., M), or None to simulate.
        ivar: Inverse variance, (..., M), 1 / unit^2; 0 drops the pixel.
        mask: Optional boolean (..., M), False drops the pixel.
        jitter: Factor (>= 1 in practice) that inflates the noise, (...,) or scalar.
        student_df: Degrees of freedom of a Student-t for outlier-robust fits; None for Gaussian.

    Returns:
        The observed (or simulated) flux; None inside :func:`sedppl.derived.derived_only`
        (no site is emitted there).
    """
    if is_derived_only():
        return None
    valid = _valid(ivar, mask)
    safe = torch.where(valid, ivar, torch.ones_like(ivar))
    sigma = torch.as_tensor(jitter, dtype=model.dtype)[..., None] / torch.sqrt(safe)
    base = dist.Normal(model, sigma) if student_df is None else dist.StudentT(student_df, model, sigma)
    obs = None if flux is None else torch.where(valid, flux, model.detach())
    return pyro.sample(name, base.mask(valid).to_event(1), obs=obs)


def observe_photometry(name: str, model: Tensor, flux: Tensor | None, ivar: Tensor,
                       mask: Tensor | None = None, floor: float = 0.0) -> Tensor:
    """Observe band fluxes with a fractional systematic floor: sigma^2 = 1/ivar + (floor * model)^2.

    Arguments:
        model: Model band fluxes, (..., K), nanomaggies.
        flux: Observed fluxes, (..., K), nanomaggies, or None to simulate.
        ivar: Inverse variance, (..., K), 1/nmgy^2; 0 drops a band.
        floor: Fractional error floor (0.05: 5%).

    Returns:
        The observed (or simulated) fluxes; None inside :func:`sedppl.derived.derived_only`.
    """
    if is_derived_only():
        return None
    valid = _valid(ivar, mask)
    safe = torch.where(valid, ivar, torch.ones_like(ivar))
    sigma = photometry_sigma(model, safe, floor)
    obs = None if flux is None else torch.where(valid, flux, model.detach())
    return pyro.sample(name, dist.Normal(model, sigma).mask(valid).to_event(1), obs=obs)


def photometry_sigma(model: Tensor, ivar: Tensor, floor: float = 0.0) -> Tensor:
    """Total photometric noise: sqrt(1/ivar + (floor * model)^2), in the unit of ``model`` (nanomaggies).

    ``ivar`` must be > 0 (mask zeros first). Shared by the likelihood and the
    noise drawn for amortized training, so both use one noise model.
    """
    return torch.sqrt(1 / ivar + (floor * model) ** 2)


def site_mean(site: dict) -> Tensor:
    """The noise-free model of an observe site in a Pyro trace (the ``loc`` of its, possibly masked, distribution)."""
    fn = site["fn"]
    while not hasattr(fn, "loc") and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn.loc.detach()


def site_scale(site: dict) -> Tensor:
    """The noise sigma of an observe site in a Pyro trace (the ``scale`` of its, possibly masked, distribution)."""
    fn = site["fn"]
    while not hasattr(fn, "scale") and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn.scale.detach()
