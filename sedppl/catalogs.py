"""Photometry catalogs (FITS, ECSV, CSV, ...) into a batched :class:`Observation`.

Fluxes may be given in nanomaggies, in microjanskys, or as AB magnitudes; errors
are 1-sigma in the same unit. Missing measurements (NaN, masked entries, or the
sentinel values common in catalogs: |value| >= 99 for magnitudes, errors <= 0)
become ``band_ivar = 0``, so they drop out of the likelihood.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Observation
from .photometry import ALIASES, available_filters

UNITS = ("nanomaggies", "microjansky", "ab_mag")
_UJY_PER_NMGY = 3.631  # 1 nanomaggy = 3.631 microjansky (AB zero point 3631 Jy)


class CatalogError(ValueError):
    """A catalog that cannot be read as described."""


def _column(table, name: str, path: Path) -> np.ndarray:
    if name not in table.colnames:
        raise CatalogError(f"{path}: no column {name!r}; columns are {', '.join(table.colnames[:30])}")
    col = table[name]
    values = np.asarray(col, dtype=np.float64)
    if hasattr(col, "mask") and np.ma.is_masked(col):
        values = np.where(np.ma.getmaskarray(col), np.nan, values)
    return values


def _non_negative_column(table, name: str, path: Path, what: str) -> np.ndarray:
    """A column that must be finite and >= 0 everywhere (redshift, E(B-V)); the first bad rows are named."""
    values = _column(table, name, path)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        raise CatalogError(f"{path}: {what} column {name!r} has missing or negative values (rows {bad[:5].tolist()})")
    return values


def read_photometry_catalog(path: str | Path, bands: list[str], flux_columns: list[str],
                            error_columns: list[str], unit: str = "nanomaggies",
                            redshift_column: str | None = None, id_column: str | None = None,
                            format: str | None = None, ebv_column: str | None = None) -> Observation:
    """Read band fluxes or magnitudes with errors from a table file.

    Arguments:
        path: Any table astropy reads (FITS, ECSV, CSV, ...).
        bands: Filter names in sedppl's (speclite) naming, one per flux column.
        flux_columns, error_columns: Column names, in the order of ``bands``.
        unit: "nanomaggies", "microjansky" or "ab_mag".
        redshift_column: Column of (spectroscopic) redshifts; None to leave z free.
        id_column: Column of names for the galaxies.
        format: astropy's format string when the suffix does not tell it.
        ebv_column: Column of Milky Way E(B-V) (mag, e.g. SFD 1998) per galaxy: the fluxes
            are corrected for Galactic extinction (:func:`sedppl.extinction.deredden`).
            None: the fluxes are taken as already corrected.

    Returns:
        :class:`Observation` with ``band_flux`` (N, K) in nanomaggies and ``band_ivar``
        (N, K) in nmgy^-2 (0 for missing values), dereddened when ``ebv_column`` is given.

    Raises:
        CatalogError: unreadable file, missing columns, unknown unit or filter,
            lengths that do not match, E(B-V) missing or negative.
    """
    from astropy.table import Table

    from .extinction import deredden

    path = Path(path)
    if unit not in UNITS:
        raise CatalogError(f"unit must be one of {UNITS}, got {unit!r}")
    if not (len(bands) == len(flux_columns) == len(error_columns)):
        raise CatalogError(f"{len(bands)} bands, {len(flux_columns)} flux and {len(error_columns)} error columns")
    known = set(available_filters())
    for b in bands:
        if ALIASES.get(b.lower(), b) not in known:
            raise CatalogError(f"unknown filter {b!r} (speclite names such as 'sdss2010-r' or aliases "
                               f"such as {', '.join(list(ALIASES)[:6])}, ...)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        table = Table.read(path, format=format) if format else Table.read(path)
    except Exception as err:
        raise CatalogError(f"{path}: not a readable table ({type(err).__name__}: {err})") from err
    value = np.stack([_column(table, c, path) for c in flux_columns], -1)
    error = np.stack([_column(table, c, path) for c in error_columns], -1)
    if unit == "ab_mag":
        ok = np.isfinite(value) & np.isfinite(error) & (error > 0) & (np.abs(value) < 99)
        flux = np.where(ok, 10 ** ((22.5 - np.where(ok, value, 22.5)) / 2.5), 0.0)
        sigma = flux * np.log(10) / 2.5 * np.where(ok, error, 1.0)
    else:
        scale = 1.0 if unit == "nanomaggies" else 1 / _UJY_PER_NMGY
        ok = np.isfinite(value) & np.isfinite(error) & (error > 0)
        flux = np.where(ok, value * scale, 0.0)
        sigma = np.where(ok, error * scale, 1.0)
    ivar = np.zeros_like(flux)
    ivar[ok] = 1 / sigma[ok] ** 2
    z = None
    if redshift_column is not None:
        z = _non_negative_column(table, redshift_column, path, "redshift")
    names = [str(v) for v in table[id_column]] if id_column else [f"row{i}" for i in range(len(table))]
    obs = Observation(redshift=z, bands=list(bands), band_flux=flux.astype(np.float32),
                      band_ivar=ivar.astype(np.float32), name=names)
    if ebv_column is not None:
        obs = deredden(obs, _non_negative_column(table, ebv_column, path, "E(B-V)"))
    return obs
