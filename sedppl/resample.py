"""Flux-conserving resampling of spectra onto new pixel grids.

A spectrum is taken as constant across each of its pixels (pixel edges halfway
between centres). The integral of the flux density over any new pixel is the
difference of the cumulative integral at its edges, so the integrated flux
over any range of whole new pixels is conserved exactly. Differentiable in the
flux and in the new edges (hence in redshift).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def edges_from_centers(wave: Tensor) -> Tensor:
    """Pixel edges, (..., N+1), halfway between centres (..., N), ends mirrored; Angstrom."""
    mid = 0.5 * (wave[..., 1:] + wave[..., :-1])
    first = 2 * wave[..., :1] - mid[..., :1]
    last = 2 * wave[..., -1:] - mid[..., -1:]
    return torch.cat([first, mid, last], dim=-1)


def check_wavelengths(wave: Tensor, what: str = "wavelengths") -> None:
    """Raise ``ValueError`` for non-finite, non-positive or unsorted wavelengths."""
    if torch.any(~torch.isfinite(wave)):
        raise ValueError(f"{what}: non-finite value (NaN or inf)")
    if torch.any(wave <= 0):
        raise ValueError(f"{what} must be positive (Angstrom)")
    if wave.shape[-1] > 1 and torch.any(torch.diff(wave, dim=-1) <= 0):
        raise ValueError(f"{what} must be strictly increasing")


def cumulative(flux: Tensor, edges: Tensor) -> Tensor:
    """Cumulative integral of a pixelised flux density at its edges, (..., N+1)."""
    area = flux * torch.diff(edges, dim=-1)
    return torch.cat([torch.zeros_like(area[..., :1]), torch.cumsum(area, dim=-1)], dim=-1)


def integrate_at(cum: Tensor, edges: Tensor, points: Tensor) -> Tensor:
    """Evaluate the cumulative integral ``cum`` (on shared ``edges`` (N+1,)) at ``points`` (..., M)."""
    j = (torch.searchsorted(edges, points.detach().contiguous(), right=True) - 1).clamp(0, edges.numel() - 2)
    u = (points - edges[j]) / (edges[j + 1] - edges[j])
    batch = torch.broadcast_shapes(cum.shape[:-1], points.shape[:-1])
    cum = cum.expand(*batch, cum.shape[-1])
    jj = j.expand(*batch, j.shape[-1])
    u = u.expand(*batch, u.shape[-1])
    c0 = torch.gather(cum, -1, jj)
    c1 = torch.gather(cum, -1, jj + 1)
    return c0 + u * (c1 - c0)


def resample(flux: Tensor, edges: Tensor, new_edges: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """Average flux density over new pixels, conserving the integral.

    Arguments:
        flux: Flux density, (..., N), any per-Angstrom unit.
        edges: Source pixel edges, (N+1,), Angstrom, increasing.
        new_edges: Target pixel edges, (..., M+1), Angstrom, increasing, in the
            source's wavelength frame; they must lie inside ``edges``.
        scale: Stretch of the wavelength axis from the source to the target
            frame (e.g. 1 + z), scalar or (..., 1): the target pixel widths
            are ``scale`` times those of ``new_edges``.

    Returns:
        (..., M): mean flux density per target pixel, in the source's unit per
        unit target wavelength.
    """
    lo, hi = float(edges[0]), float(edges[-1])
    if torch.any(new_edges[..., 0] < lo * (1 - 1e-9)) or torch.any(new_edges[..., -1] > hi * (1 + 1e-9)):
        raise ValueError(
            f"resample: target pixels span {new_edges.min().item():.2f}-{new_edges.max().item():.2f} A "
            f"but the model covers only {lo:.2f}-{hi:.2f} A")
    c = integrate_at(cumulative(flux, edges), edges, new_edges)
    return torch.diff(c, dim=-1) / (torch.diff(new_edges, dim=-1) * scale)


def interp1d(x: Tensor, xp: Tensor, fp: Tensor, log_step: float | None = None) -> Tensor:
    """Linear interpolation of ``fp`` (K,) given at increasing ``xp`` (K,) at points ``x`` (...),
    constant beyond the ends; differentiable in ``x`` and ``fp``.

    ``log_step``: the step in ln(xp) when ``xp`` is uniform in ln (``xp[k] = xp[0] exp(k log_step)``,
    e.g. a rest-frame wavelength grid, positive); each point's interval is then found by arithmetic
    instead of a binary search, with the same result.
    """
    if log_step is None:
        j = torch.searchsorted(xp, x.detach().contiguous(), right=True) - 1
    else:  # rounding can leave a point one interval off: checked against the knots
        xd = x.detach()
        j = torch.floor((torch.log(xd) - math.log(float(xp[0]))) / log_step).long().clamp(0, xp.numel() - 2)
        j = j + (xd >= xp[j + 1]).long() - (xd < xp[j]).long()
    j = j.clamp(0, xp.numel() - 2)
    u = ((x - xp[j]) / (xp[j + 1] - xp[j])).clamp(0.0, 1.0)
    return fp[j] + u * (fp[j + 1] - fp[j])


def resample_log(flux: Tensor, log_start: float, dlnlam: float, target_log_edges: Tensor,
                 shift: Tensor) -> Tensor:
    """Flux-conserving resampling from a grid uniform in ln(lambda), shifted by ``shift``.

    The fast path for redshifting: the source pixel i spans
    ln(lambda) in [log_start + i dlnlam, log_start + (i+1) dlnlam] + shift, so no
    search is needed; the cumulative integral is kept in float64, so float32
    input stays accurate. A source pixel cut by a target edge is split by its ln(lambda) fraction, an
    O(dlnlam / 2) redistribution inside the pixel; the fractions of every source
    pixel add up to one, so the integrated flux is conserved.

    Arguments:
        flux: Source flux density per unit source wavelength, (..., N).
        log_start: ln(lambda / A) of the first source edge.
        dlnlam: Source pixel width in ln(lambda).
        target_log_edges: ln(lambda / A) of the target edges, (M+1,), increasing.
        shift: ln(1 + z) added to the source grid, (...,).

    Returns:
        (..., M): the integral of ``flux`` over the part of the source grid that
        each target pixel covers (in source wavelength), divided by the target
        pixel's width (in target wavelength). For a rest-frame L_lambda seen at
        redshift z this is L's contribution per observed Angstrom.
    """
    n = flux.shape[-1]
    idx = torch.arange(n, dtype=torch.float64)
    src_width = torch.exp(log_start + idx * dlnlam) * math.expm1(dlnlam)  # Angstrom
    area = flux.double() * src_width  # integral over each source pixel
    cum = torch.cat([torch.zeros_like(area[..., :1]), torch.cumsum(area, dim=-1)], dim=-1)
    tgt_width = torch.diff(torch.exp(target_log_edges.double()))
    shift = torch.as_tensor(shift, dtype=torch.float64)
    pos = (target_log_edges.double() - log_start - shift[..., None]) / dlnlam  # (..., M+1) in source pixels
    if torch.any(pos[..., 0] < -1e-6) or torch.any(pos[..., -1] > n + 1e-6):
        raise ValueError("resample_log: target pixels fall outside the model's wavelength range")
    pos = pos.clamp(0.0, float(n))
    k = torch.floor(pos.detach()).long().clamp(max=n - 1)
    frac = pos - k
    batch = torch.broadcast_shapes(area.shape[:-1], k.shape[:-1])
    kk = k.expand(*batch, k.shape[-1])
    at = torch.gather(cum.expand(*batch, n + 1), -1, kk) + torch.gather(area.expand(*batch, n), -1, kk) * frac
    return (torch.diff(at, dim=-1) / tgt_width).to(flux.dtype)


def rebin_spectrum(wave: Tensor, flux: Tensor, ivar: Tensor, new_wave: Tensor) -> tuple[Tensor, Tensor]:
    """Put an observed spectrum with inverse variances on another pixel grid, conserving information.

    Each source pixel j spreads its inverse variance evenly over its width
    (information per Angstrom ivar_j / width_j); a new pixel collects the
    information of the parts it covers, and its flux is the information-weighted
    mean of those parts. So a new pixel made of k whole source pixels gets their
    ivar-weighted mean flux and the sum of their ivar (exact), a new pixel that is
    a fraction phi of one source pixel gets its flux and phi times its ivar, and
    the total information is conserved (no overcounting when a coarse spectrum,
    e.g. SDSS's 69 km/s pixels, goes onto a finer grid such as DESI's 0.8 A). The
    noise of neighbouring new pixels cut from one source pixel is correlated;
    binning them back together (as amortized posteriors do) undoes that.

    Arguments:
        wave: Source pixel centres, (N,), Angstrom (vacuum or air, as ``new_wave``).
        flux: (..., N) flux density, e.g. 1e-17 erg/s/cm^2/A.
        ivar: (..., N) inverse variance (0 = masked).
        new_wave: New pixel centres, (M,), same frame and unit.

    Returns:
        (flux (..., M), ivar (..., M)); new pixels not wholly inside the source
        coverage, or with no unmasked source pixel, get flux 0 and ivar 0.
    """
    wave, new_wave = torch.as_tensor(wave, dtype=torch.float64), torch.as_tensor(new_wave, dtype=torch.float64)
    check_wavelengths(wave, "source wavelengths")
    check_wavelengths(new_wave, "new wavelengths")
    flux, ivar = torch.as_tensor(flux, dtype=torch.float64), torch.as_tensor(ivar, dtype=torch.float64)
    if torch.any(ivar < 0) or torch.any(torch.isnan(ivar)):
        raise ValueError("inverse variance must be >= 0 (negative or NaN ivar found)")
    edges, new_edges = edges_from_centers(wave), edges_from_centers(new_wave)
    inside = (new_edges[:-1] >= edges[0]) & (new_edges[1:] <= edges[-1])
    clipped = new_edges.clamp(float(edges[0]), float(edges[-1]))
    width = torch.diff(edges)
    info = ivar / width  # per Angstrom
    f = torch.where(ivar > 0, torch.nan_to_num(flux), torch.zeros_like(flux))
    new_width = torch.diff(clipped)
    new_ivar = resample(info, edges, clipped) * new_width
    num = resample(info * f, edges, clipped) * new_width
    ok = inside & (new_ivar > 0)
    out_flux = torch.where(ok, num / new_ivar.clamp(min=1e-300), torch.zeros_like(num))
    out_ivar = torch.where(ok, new_ivar, torch.zeros_like(new_ivar))
    return out_flux.float(), out_ivar.float()
