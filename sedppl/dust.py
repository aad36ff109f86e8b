"""Dust attenuation laws, batched and differentiable.

Convention (the same for every law here): ``av`` is the attenuation in
magnitudes at the V reference wavelength 5500 Angstrom, so A(5500 A) = av
exactly. Optical depth is tau = A / (2.5 log10 e) = A / 1.0857.
Wavelengths are rest-frame Angstrom (air or vacuum: these curves are smooth,
the difference is far below their accuracy).

References:
    Calzetti et al. 2000, ApJ 533, 682.
    Kriek & Conroy 2013, ApJL 775, L16.
    Noll et al. 2009, A&A 507, 1793 (the bump profile).
    Charlot & Fall 2000, ApJ 539, 718.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: V reference wavelength (Angstrom) at which A = av.
V_WAVE_AA = 5500.0
#: Total-to-selective ratio of the Calzetti law.
CALZETTI_RV = 4.05
#: 2.5 log10(e): magnitudes per unit optical depth.
MAG_PER_TAU = 1.0857362047581294


def calzetti_k(wave: Tensor) -> Tensor:
    """Calzetti et al. (2000) k(lambda) = A(lambda) / E(B-V)_stars, with R_V = 4.05.

    Arguments:
        wave: Wavelengths, Angstrom, any shape.

    Returns:
        k(lambda), same shape, dimensionless. The published formula holds for
        0.12-2.2 um; below 0.12 um it is extended as a power law
        (lambda / 0.12 um)^-0.77 (the extension bagpipes uses), above 2.2 um
        the long-wavelength formula is continued and floored at 0.
    """
    wave = torch.as_tensor(wave)
    x = wave * 1e-4  # micron
    xs = x.clamp(min=0.12)
    k_blue = 2.659 * (-2.156 + 1.509 / xs - 0.198 / xs**2 + 0.011 / xs**3) + CALZETTI_RV
    k_red = (2.659 * (-1.857 + 1.040 / x) + CALZETTI_RV).clamp(min=0.0)
    k_012 = 2.659 * (-2.156 + 1.509 / 0.12 - 0.198 / 0.12**2 + 0.011 / 0.12**3) + CALZETTI_RV
    k_uv = k_012 * (x / 0.12) ** -0.77
    return torch.where(x < 0.12, k_uv, torch.where(x < 0.63, k_blue, k_red))


def calzetti(wave: Tensor, av: Tensor) -> Tensor:
    """Calzetti et al. (2000) attenuation A(lambda) in magnitudes.

    Arguments:
        wave: Wavelengths, (L,) Angstrom.
        av: Attenuation at 5500 A, (...,) mag.

    Returns:
        A(lambda), (..., L), mag.
    """
    wave = torch.as_tensor(wave)
    av = torch.as_tensor(av, dtype=wave.dtype)
    shape = calzetti_k(wave) / calzetti_k(torch.tensor(V_WAVE_AA, dtype=wave.dtype))
    return av[..., None] * shape


def drude_bump(wave: Tensor, amplitude: Tensor, center: float = 2175.0, width: float = 350.0) -> Tensor:
    """Drude profile of the 2175 A bump, D = E_b (lambda dl)^2 / ((lambda^2 - l0^2)^2 + (lambda dl)^2).

    Arguments:
        wave: (L,) Angstrom.
        amplitude: E_b, (...,).
        center, width: l0 and dl, Angstrom.

    Returns:
        (..., L), in units of k (added to k_Calzetti).
    """
    lw = (wave * width) ** 2
    prof = lw / ((wave**2 - center**2) ** 2 + lw)
    return torch.as_tensor(amplitude)[..., None] * prof


def kriek_conroy(wave: Tensor, av: Tensor, index: Tensor) -> Tensor:
    """Kriek & Conroy (2013) attenuation: Calzetti with a power-law tilt and a matching bump.

    A(lambda) proportional to [k_Cal(lambda) + D(lambda)] (lambda / 5500 A)^n, with a bump of
    strength E_b = 0.85 - 1.9 n, normalised so that A(5500 A) = av. n = 0 is
    Calzetti with a bump; n < 0 is steeper (FSPS ``dust_type=4``).

    Arguments:
        wave: (L,) Angstrom.
        av: (...,) mag at 5500 A.
        index: The power-law index n, (...,).

    Returns:
        A(lambda), (..., L), mag.
    """
    wave = torch.as_tensor(wave)
    av = torch.as_tensor(av, dtype=wave.dtype)
    index = torch.as_tensor(index, dtype=wave.dtype)
    av, index = torch.broadcast_tensors(av, index)
    eb = 0.85 - 1.9 * index
    v = torch.tensor([V_WAVE_AA], dtype=wave.dtype)
    curve = (calzetti_k(wave) + drude_bump(wave, eb)) * (wave / V_WAVE_AA) ** index[..., None]
    norm = calzetti_k(v) + drude_bump(v, eb)
    return av[..., None] * curve / norm


def birth_cloud(wave: Tensor, av_bc: Tensor, index: float | Tensor = -1.0) -> Tensor:
    """Extra attenuation of stars in birth clouds, A = av_bc (lambda / 5500 A)^index.

    Charlot & Fall (2000) use index -0.7; FSPS's default (and PROVABGS's) is -1.

    Arguments:
        wave: (L,) Angstrom.
        av_bc: (...,) mag at 5500 A.
        index: Power-law index.

    Returns:
        (..., L), mag.
    """
    wave = torch.as_tensor(wave)
    av_bc = torch.as_tensor(av_bc, dtype=wave.dtype)
    index = torch.as_tensor(index, dtype=wave.dtype)
    return av_bc[..., None] * (wave / V_WAVE_AA) ** index[..., None]


def transmission(attenuation_mag: Tensor) -> Tensor:
    """Fraction of light transmitted, 10^(-0.4 A)."""
    return torch.pow(10.0, -0.4 * attenuation_mag)


def check_dust(**params: Tensor) -> None:
    """Raise ``ValueError`` if an attenuation parameter is negative or not finite."""
    for name, value in params.items():
        value = torch.as_tensor(value)
        if torch.any(~torch.isfinite(value)):
            raise ValueError(f"dust parameter {name}: non-finite value")
        if name.startswith("av") and torch.any(value < 0):
            raise ValueError(f"dust parameter {name} must be >= 0 mag, got {value.min().item():.4g}")
