"""Spectroscopic redshifts by a chi-square scan over templates (for spectra whose files carry none).

The spectrum is rebinned onto a grid uniform in ln(lambda) (information-conserving,
:func:`sedppl.resample.rebin_spectrum`), where a redshift is a shift. At every
trial shift the spectrum is fitted, by weighted linear least squares, with a
basis of rest-frame templates (BC03+MILES SSPs of five ages at solar metallicity,
and emission-line groups: Balmer series at case B ratios, [O II], [O III], [N II],
[S II], [Ne III]), all broadened to ``sigma_v``, plus a Legendre polynomial in the
observed frame (calibration and dust). Every scalar product the normal equations
need at every shift is a cross-correlation, so the whole scan costs a few dozen
FFTs; the chi-square minimum is refined by a parabola, and its curvature gives
the error (Delta chi2 = 1). The best chi2 of any other redshift more than
``exclusion_kms`` away gives ``delta_chi2``, the confidence of the solution (as
in the DESI and SDSS pipelines: small values mean an ambiguous redshift).

References:
    Bolton et al. 2012, AJ 144, 144 (SDSS/BOSS redshifts by template chi2 scans);
    Bailey et al. (Redrock; DESI redshifts, delta chi2 > 9 as the confidence cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Observation
from .instrument import C_KMS, broaden_velocity
from .resample import rebin_spectrum

#: Vacuum wavelengths (Angstrom) and relative strengths of the emission-line groups.
LINE_GROUPS: dict[str, list[tuple[float, float]]] = {
    "balmer": [(6564.61, 2.86), (4862.68, 1.0), (4341.69, 0.468), (4102.89, 0.259)],
    "oii": [(3727.09, 1.0), (3729.88, 1.3)],
    "oiii": [(4960.30, 1.0), (5008.24, 2.98)],
    "nii": [(6549.86, 1.0), (6585.27, 2.95)],
    "sii": [(6718.29, 1.0), (6732.67, 0.75)],
    "neiii": [(3869.86, 1.0)],
}
#: Ages (Gyr) of the SSP templates.
TEMPLATE_AGES_GYR = (0.01, 0.1, 0.5, 2.0, 10.0)


@dataclass
class RedshiftResult:
    """A measured redshift.

    Attributes:
        z: Best redshift (vacuum wavelengths, heliocentric as the input spectrum).
        z_err: 1-sigma error from the chi2 curvature.
        chi2: Minimum chi2; ``dof``: the observed pixels used minus the fitted coefficients.
        delta_chi2: chi2 difference to the best solution more than ``exclusion_kms`` away
            (large: unambiguous; < 9: do not trust).
        z_grid, chi2_grid: The scan, for plots.
    """

    z: float
    z_err: float
    chi2: float
    dof: int
    delta_chi2: float
    z_grid: np.ndarray
    chi2_grid: np.ndarray


def _templates(dlnlam: float, wmin: float, wmax: float, sigma_v: float) -> tuple[float, Tensor]:
    """Rest-frame templates (T, K) on exp(log_start + k dlnlam), vacuum Angstrom, unit median."""
    from .sps.grid import load_bc03_miles, log_wave_grid, rebin_grid_cached

    grid = load_bc03_miles().to_vacuum()
    centers = log_wave_grid(wmin, wmax, dlnlam)
    local = rebin_grid_cached(grid.restrict(wmin * 0.99, wmax * 1.01), centers)
    iz = int(np.argmin(np.abs(np.log10(local.metallicities))))
    rows = []
    for age in TEMPLATE_AGES_GYR:
        ia = int(np.argmin(np.abs(local.ages - age * 1e9)))
        t = np.asarray(local.flux[iz, ia], dtype=np.float64)
        rows.append(t / np.median(t[t > 0]))
    ln = np.log(centers)
    for lines in LINE_GROUPS.values():
        t = np.zeros_like(ln)
        for wave, strength in lines:
            x = (np.log(wave) - ln[0]) / dlnlam
            i = int(np.floor(x))
            if 0 <= i < len(ln) - 1:
                t[i] += strength * (1 - (x - i))
                t[i + 1] += strength * (x - i)
        rows.append(t)
    temps = broaden_velocity(torch.tensor(np.array(rows)), dlnlam, sigma_v)
    return float(ln[0]), temps


def _correlate(a: Tensor, b: Tensor, n_shift: int, nfft: int) -> Tensor:
    """c[..., s] = sum_i a[..., i] b[..., i + s] for s = 0..n_shift-1 (b longer than a)."""
    fa = torch.fft.rfft(a, n=nfft)
    fb = torch.fft.rfft(b, n=nfft)
    return torch.fft.irfft(fa.conj() * fb, n=nfft)[..., :n_shift]


def measure_redshift(obs: Observation, z_range: tuple[float, float] = (0.0, 1.6), sigma_v: float = 150.0,
                     poly_degree: int = 3, dlnlam: float = 1e-4, exclusion_kms: float = 1000.0) -> RedshiftResult:
    """Redshift of one spectrum by a template chi2 scan.

    Arguments:
        obs: One galaxy's spectrum (vacuum Angstrom; flux and ivar in any consistent unit).
        z_range: Redshifts scanned.
        sigma_v: Velocity dispersion of the templates, km/s.
        poly_degree: Degree of an additive Legendre polynomial in the observed frame
            (absorbs calibration errors and the shape of the dust attenuation); -1 for none.
        dlnlam: Step of the scan in ln(1+z) (1e-4: 30 km/s, refined by a parabola).
        exclusion_kms: Half-width around the best redshift excluded when finding the
            second-best solution for ``delta_chi2``.

    Returns:
        A :class:`RedshiftResult`.
    """
    if not obs.has_spectrum:
        raise ValueError("measure_redshift needs a spectrum")
    if obs.flux.dim() != 1:
        raise ValueError("measure_redshift takes one galaxy (a 1-D spectrum); loop over a batch")
    lo_z, hi_z = z_range
    if not 0 <= lo_z < hi_z:
        raise ValueError(f"z_range must satisfy 0 <= low < high, got {z_range}")
    ivar = obs.ivar if obs.mask is None else torch.where(obs.mask, obs.ivar, torch.zeros_like(obs.ivar))
    wave = obs.wave.double()
    # observed spectrum on a ln(lambda) grid
    l0 = math.log(float(wave[0]))
    n_obs = int(math.floor((math.log(float(wave[-1])) - l0) / dlnlam))
    obs_ln = l0 + dlnlam * (0.5 + torch.arange(n_obs, dtype=torch.float64))
    flux, w = rebin_spectrum(wave, obs.flux, ivar, torch.exp(obs_ln))
    flux, w = flux.double(), w.double()
    if not torch.any(w > 0):
        raise ValueError("every pixel of the spectrum is masked")
    # shifts s: rest ln(lambda) = obs ln(lambda) - (s0 + s) dlnlam
    s0 = int(math.floor(math.log1p(lo_z) / dlnlam))
    n_shift = int(math.ceil(math.log1p(hi_z) / dlnlam)) - s0 + 1
    rest_start = float(obs_ln[0]) - (s0 + n_shift - 1) * dlnlam  # rest ln of obs pixel 0 at the largest shift
    rest_len = n_obs + n_shift - 1
    t_start, temps = _templates(dlnlam, math.exp(rest_start) * 0.999, math.exp(rest_start + rest_len * dlnlam) * 1.001,
                                sigma_v)
    off = int(round((rest_start - t_start) / dlnlam))
    temps = temps[:, off: off + rest_len]
    if temps.shape[-1] < rest_len:
        raise ValueError("the templates do not cover the scanned redshifts")
    # obs pixel i at shift q sees rest pixel i + q, where ln(1+z) = (s0 + n_shift - 1 - q) dlnlam;
    # every sum over i of a[i] T[i + q] is a cross-correlation
    n_t = temps.shape[0]
    x = torch.linspace(-1, 1, n_obs, dtype=torch.float64)
    polys = torch.stack([torch.special.legendre_polynomial_p(x, j) for j in range(poly_degree + 1)]) \
        if poly_degree >= 0 else torch.zeros(0, n_obs, dtype=torch.float64)
    n_p = polys.shape[0]
    nfft = 1 << int(math.ceil(math.log2(rest_len + n_obs)))
    tt = _correlate(w.expand(n_t, n_t, n_obs), temps[:, None] * temps[None, :], n_shift, nfft)  # (T, T, S)
    tp = _correlate((w * polys)[None].expand(n_t, n_p, n_obs), temps[:, None].expand(n_t, n_p, rest_len),
                    n_shift, nfft)  # (T, P, S)
    pp = (w * polys[:, None] * polys[None, :]).sum(-1)  # (P, P)
    bt = _correlate((w * flux).expand(n_t, n_obs), temps, n_shift, nfft)  # (T, S)
    bp = (w * flux * polys).sum(-1)  # (P,)
    k = n_t + n_p
    mat = torch.zeros(n_shift, k, k, dtype=torch.float64)
    mat[:, :n_t, :n_t] = tt.permute(2, 0, 1)
    mat[:, :n_t, n_t:] = tp.permute(2, 0, 1)
    mat[:, n_t:, :n_t] = tp.permute(2, 1, 0)
    mat[:, n_t:, n_t:] = pp
    rhs = torch.cat([bt.T, bp.expand(n_shift, n_p)], -1)
    ridge = 1e-9 * torch.diagonal(mat, dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1e-30)
    mat = mat + ridge[:, None, None] * torch.eye(k, dtype=torch.float64)
    coef = torch.linalg.solve(mat, rhs[..., None])[..., 0]
    chi2 = (w * flux**2).sum() - (coef * rhs).sum(-1)
    lnz = (s0 + (n_shift - 1) - torch.arange(n_shift, dtype=torch.float64)) * dlnlam
    order = torch.argsort(lnz)
    lnz, chi2 = lnz[order], chi2[order]
    inside = (lnz >= math.log1p(lo_z) - 1e-12) & (lnz <= math.log1p(hi_z) + 1e-12)
    lnz, chi2 = lnz[inside], chi2[inside]
    i = int(torch.argmin(chi2))
    best, err = float(lnz[i]), dlnlam
    if 0 < i < len(chi2) - 1:
        c_m, c_0, c_p = (float(v) for v in chi2[i - 1: i + 2])
        curv = (c_m - 2 * c_0 + c_p) / dlnlam**2
        if curv > 0:
            best = float(lnz[i]) + 0.5 * dlnlam * (c_m - c_p) / (c_m - 2 * c_0 + c_p)
            err = math.sqrt(2.0 / curv)
    far = (lnz - lnz[i]).abs() > exclusion_kms / C_KMS
    delta = float(chi2[far].min() - chi2[i]) if torch.any(far) else float("inf")
    z = math.expm1(best)
    # the rebinned pixels share the information of the observed ones: count the observed pixels
    return RedshiftResult(z=z, z_err=err * (1 + z), chi2=float(chi2[i]), dof=int((ivar > 0).sum()) - k,
                          delta_chi2=delta, z_grid=torch.expm1(lnz).numpy(), chi2_grid=chi2.numpy())
