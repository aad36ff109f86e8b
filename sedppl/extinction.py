"""Milky Way foreground extinction and dereddening of observations.

A(lambda) = E(B-V) R_V [a(x) + b(x) / R_V], x = 1 / lambda in inverse microns:
Cardelli, Clayton & Mathis (1989) in the infrared (0.3-1.1 um^-1) and ultraviolet
(3.3-8 um^-1), O'Donnell (1994) in the optical (1.1-3.3 um^-1), the combination
behind SFD-era corrections. The infrared power law (x^1.61) is continued to
5 um (x = 0.2 um^-1) for WISE W1/W2: A/E(B-V) = 0.18 at 3.4 um and 0.11 at
4.6 um, where the extinction is a few hundredths of a magnitude at most
(Yuan, Liu & Xiang 2013 measure 0.18 and 0.16). Defined on 1250-50000 A
(observed frame: this dust is in our Galaxy); A = A_V = R_V E(B-V) exactly at x = 1.82 um^-1 (5494.5 A).

References:
    Cardelli, Clayton & Mathis 1989, ApJ 345, 245.
    O'Donnell 1994, ApJ 422, 158.
    Yuan, Liu & Xiang 2013, MNRAS 430, 2188 (empirical WISE extinction coefficients).
    Schlegel, Finkbeiner & Davis 1998, ApJ 500, 525 (E(B-V) maps; DESI's EBV column).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .data import Observation

WAVE_RANGE_AA = (1250.0, 50000.0)
_OD94_A = [1.0, 0.104, -0.609, 0.701, 1.137, -1.718, -0.827, 1.647, -0.505]
_OD94_B = [0.0, 1.952, 2.908, -3.989, -7.985, 11.102, 5.491, -10.805, 3.347]


def _poly(coeffs: list[float], y: Tensor) -> Tensor:
    out = torch.zeros_like(y)
    for c in reversed(coeffs):
        out = out * y + c
    return out


def extinction_curve(wave: Tensor, rv: float = 3.1) -> Tensor:
    """A(lambda) / A_V of the Milky Way law (CCM89 + O'Donnell 1994 optical).

    Arguments:
        wave: Observed wavelengths, (L,) or (..., L), Angstrom (air or vacuum).
        rv: Total-to-selective ratio R_V (3.1 for the diffuse ISM).

    Returns:
        A(lambda) / A_V, same shape as ``wave``.

    Raises:
        ValueError: wavelengths outside 1250-50000 A.
    """
    wave = torch.as_tensor(wave, dtype=torch.float64)
    if torch.any(wave < WAVE_RANGE_AA[0]) or torch.any(wave > WAVE_RANGE_AA[1]):
        raise ValueError(f"the Milky Way extinction law is defined on {WAVE_RANGE_AA[0]:.0f}-"
                         f"{WAVE_RANGE_AA[1]:.0f} A; got {float(wave.min()):.0f}-{float(wave.max()):.0f} A")
    x = 1e4 / wave
    ir, opt, uv = x < 1.1, (x >= 1.1) & (x < 3.3), x >= 3.3
    a, b = torch.zeros_like(x), torch.zeros_like(x)
    p = x.clamp(max=1.1) ** 1.61
    a = torch.where(ir, 0.574 * p, a)
    b = torch.where(ir, -0.527 * p, b)
    y = x - 1.82
    a = torch.where(opt, _poly(_OD94_A, y), a)
    b = torch.where(opt, _poly(_OD94_B, y), b)
    xu = x.clamp(min=3.3)
    f = (xu - 5.9).clamp(min=0.0)
    fa = -0.04473 * f**2 - 0.009779 * f**3
    fb = 0.2130 * f**2 + 0.1207 * f**3
    a = torch.where(uv, 1.752 - 0.316 * xu - 0.104 / ((xu - 4.67) ** 2 + 0.341) + fa, a)
    b = torch.where(uv, -3.090 + 1.825 * xu + 1.206 / ((xu - 4.62) ** 2 + 0.263) + fb, b)
    return a + b / rv


def deredden(obs: Observation, ebv: float | Tensor, rv: float = 3.1) -> Observation:
    """Correct an observation for Milky Way extinction E(B-V) (mag).

    The spectrum is multiplied by 10^(0.4 A(lambda)) pixel by pixel (ivar by
    10^(-0.8 A)); each band by 10^(0.4 A) at its effective wavelength
    (response-weighted mean wavelength of the filter curve), the usual
    approximation for broad bands.

    Arguments:
        obs: The observation (one galaxy or a batch of B).
        ebv: E(B-V), mag (e.g. DESI's FIBERMAP ``EBV``, SFD 1998): a scalar for every galaxy,
            or (B,) one per galaxy ((1,) for one galaxy).
        rv: R_V.

    Returns:
        A new :class:`Observation`.

    Raises:
        ValueError: E(B-V) negative or not finite, or not one value per galaxy.
    """
    from .photometry import load_curve

    ebv = torch.as_tensor(ebv, dtype=torch.float64)
    if torch.any(~torch.isfinite(ebv)) or torch.any(ebv < 0):
        raise ValueError(f"E(B-V) must be finite and >= 0 mag, got {ebv.tolist()}")
    batch = (obs.flux if obs.has_spectrum else obs.band_flux).shape[:-1]
    if ebv.ndim and ebv.numel() == 1 and not batch:
        ebv = ebv.reshape(())  # one value for one galaxy
    elif ebv.ndim and tuple(ebv.shape) != tuple(batch):
        raise ValueError(f"{ebv.numel()} values of E(B-V) for a batch of shape {tuple(batch)}")
    kw = dict(redshift=obs.redshift, wave=obs.wave, mask=obs.mask, resolution=obs.resolution,
              bands=obs.bands, name=obs.name, flux=obs.flux, ivar=obs.ivar,
              band_flux=obs.band_flux, band_ivar=obs.band_ivar)
    if obs.has_spectrum:
        a = rv * ebv[..., None] * extinction_curve(obs.wave, rv)
        boost = 10 ** (0.4 * a)
        kw.update(flux=(obs.flux * boost).float(), ivar=(obs.ivar / boost**2).float())
    if obs.has_photometry:
        eff = []
        for band in obs.bands:
            w, r = load_curve(band)
            eff.append(np.trapezoid(w * r, w) / np.trapezoid(r, w))
        a = rv * ebv[..., None] * extinction_curve(torch.tensor(eff), rv)
        boost = 10 ** (0.4 * a)
        kw.update(band_flux=(obs.band_flux * boost).float(), band_ivar=(obs.band_ivar / boost**2).float())
    return Observation(**kw)
