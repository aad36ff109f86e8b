"""Mass locked in stellar remnants (white dwarfs, neutron stars, black holes).

The BC03 grids give the mass in *living* stars per unit mass formed
(``LIV_MSTAR_FRAC``). The stellar mass that surveys quote (PROVABGS, FSPS,
Prospector) also counts remnants. We add them as BC03 does: a Kroupa (2001)
IMF over 0.1-100 Msun and the initial-final mass relation of Renzini & Ciotti
(1993): m_rem = 0.077 m + 0.48 Msun for m < 8.5 Msun (white dwarfs), 1.4 Msun
for 8.5 <= m < 40 Msun (neutron stars), 0.5 m for m >= 40 Msun (black holes).
The turn-off mass at each age is taken from the grid itself: the mass m_TO
such that the IMF's stars below m_TO hold the grid's living fraction.

References:
    Kroupa 2001, MNRAS 322, 231.
    Renzini & Ciotti 1993, ApJ 416, L49.
    Bruzual & Charlot 2003, MNRAS 344, 1000 (Sect. 2.1).
"""

from __future__ import annotations

import numpy as np

IMF_MASS_RANGE = (0.1, 100.0)


def kroupa_imf(m: np.ndarray) -> np.ndarray:
    """Kroupa (2001) dN/dm (unnormalised): m^-1.3 below 0.5 Msun, m^-2.3 above, continuous."""
    m = np.asarray(m, float)
    return np.where(m < 0.5, m**-1.3, 0.5 * m**-2.3)


def remnant_mass(m: np.ndarray) -> np.ndarray:
    """Renzini & Ciotti (1993) remnant mass (Msun) of a star of initial mass m (Msun)."""
    m = np.asarray(m, float)
    return np.where(m < 8.5, 0.077 * m + 0.48, np.where(m < 40.0, 1.4, 0.5 * m))


def remnant_fraction(living_fraction: np.ndarray, n_mass: int = 20000) -> np.ndarray:
    """Mass in remnants per unit mass formed, for a Kroupa IMF.

    Arguments:
        living_fraction: Mass in living stars per unit mass formed, (..., A),
            over ages (each row non-increasing after the first few ages).

    Returns:
        Remnant mass fraction, same shape, dimensionless.
    """
    lo, hi = IMF_MASS_RANGE
    m = np.geomspace(lo, hi, n_mass)
    dm = np.gradient(m)
    phi = kroupa_imf(m)
    norm = np.sum(m * phi * dm)
    cum_live = np.cumsum(m * phi * dm) / norm  # mass fraction in stars below m
    rem_above = np.cumsum((remnant_mass(m) * phi * dm)[::-1])[::-1] / norm  # remnants of stars above m
    live = np.minimum.accumulate(np.clip(living_fraction, 0.0, 1.0), axis=-1)
    m_to = np.interp(live, cum_live, m)
    out = np.interp(m_to, m, rem_above)
    # no remnants while every star still lives
    return np.where(live >= cum_live[-1] - 1e-6, 0.0, out)
