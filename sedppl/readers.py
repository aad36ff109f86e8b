"""Readers of survey spectra into :class:`sedppl.data.Observation`.

* :func:`read_sdss_spectrum` -- SDSS/BOSS ``spec-PLATE-MJD-FIBER.fits`` files
  (DR8 and later, e.g. DR18): the ``COADD`` table (``loglam`` = log10 vacuum
  wavelength in Angstrom, ``flux`` and ``ivar`` in 1e-17 erg/s/cm^2/A,
  ``and_mask``, ``wdisp``) and the pipeline redshift from ``SPECOBJ``.

Files that are not what they claim (not FITS, truncated, missing tables or
columns, inconsistent lengths) raise :class:`SpectrumFileError` naming the file
and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Observation

SDSS_DLOGLAM = 1e-4  # SDSS/BOSS pixel size in log10(wavelength)


class SpectrumFileError(ValueError):
    """A spectrum file that cannot be read as the format it claims."""


@dataclass
class SurveySpectrum:
    """A spectrum read from a survey file.

    Attributes:
        obs: The :class:`Observation` (vacuum Angstrom, 1e-17 erg/s/cm^2/A, redshift
            from the file's pipeline where present).
        fwhm: Instrumental line-spread FWHM per pixel, (M,), Angstrom; pass it as
            ``ForwardModel(fwhm=...)``.
        meta: Header facts: survey ids, RA/Dec (deg), pipeline class, redshift error
            and warning flags, velocity dispersion (km/s).
    """

    obs: Observation
    fwhm: np.ndarray
    meta: dict = field(default_factory=dict)


def _open_fits(path: Path):
    from astropy.io import fits

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("exception")
        for h in hdul:  # touch every table so truncation shows up here, not later
            _ = h.data
    except Exception as err:  # astropy raises OSError, TypeError, VerifyError ...
        raise SpectrumFileError(f"{path}: not a readable FITS file ({type(err).__name__}: {err})") from err
    return hdul


def read_sdss_spectrum(path: str | Path, mask_bits: bool = True, name: str | None = None) -> SurveySpectrum:
    """Read an SDSS/BOSS ``spec`` file.

    Arguments:
        path: The FITS file.
        mask_bits: Drop pixels with any ``and_mask`` bit set (bad in every exposure);
            pixels with ivar = 0 are always dropped.
        name: Label; default the file name.

    Returns:
        :class:`SurveySpectrum`; ``fwhm`` = 2.3548 * wdisp * ln(10) * 1e-4 * wavelength
        (``wdisp`` is the Gaussian sigma in pixels of 1e-4 in log10 wavelength).

    Raises:
        SpectrumFileError: not FITS, truncated, no ``COADD`` table or missing columns,
            wavelengths not increasing.
    """
    path = Path(path)
    hdul = _open_fits(path)
    with hdul:
        names = [h.name.upper() for h in hdul]
        if "COADD" not in names:
            raise SpectrumFileError(f"{path}: no COADD table: not an SDSS spec file (HDUs: {', '.join(names)})")
        coadd = hdul["COADD"].data
        cols = {c.lower() for c in coadd.columns.names}
        need = {"loglam", "flux", "ivar"}
        if not need <= cols:
            raise SpectrumFileError(f"{path}: COADD lacks columns {sorted(need - cols)}")
        loglam = np.asarray(coadd["loglam"], dtype=np.float64)
        flux = np.asarray(coadd["flux"], dtype=np.float64)
        ivar = np.asarray(coadd["ivar"], dtype=np.float64)
        if len(loglam) < 2 or np.any(np.diff(loglam) <= 0):
            raise SpectrumFileError(f"{path}: COADD loglam is not strictly increasing")
        # loglam is stored in float32: restore the exact 1e-4 dex grid (coefficient COEFF0 has 4 decimals)
        steps = np.rint((loglam - loglam[0]) / SDSS_DLOGLAM)
        if np.all(np.abs(loglam - loglam[0] - steps * SDSS_DLOGLAM) < 1e-5):
            loglam = np.round(loglam[0], 4) + steps * SDSS_DLOGLAM
        wave = 10**loglam
        good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        if mask_bits and "and_mask" in cols:
            good &= np.asarray(coadd["and_mask"]) == 0
        if not good.any():
            raise SpectrumFileError(f"{path}: every pixel is masked (ivar = 0 or and_mask set)")
        flux = np.where(good, flux, 0.0)
        ivar = np.where(good, ivar, 0.0)
        wdisp = np.asarray(coadd["wdisp"], dtype=np.float64) if "wdisp" in cols else np.full_like(wave, 1.0)
        fwhm = 2.3548 * wdisp * np.log(10) * SDSS_DLOGLAM * wave
        meta = {"file": path.name, "primary_header": dict(hdul[0].header)}
        z = None
        if "SPECOBJ" in names:
            so = hdul["SPECOBJ"].data
            get = (lambda k: so[k][0] if k in so.columns.names else None)  # noqa: E731
            z = get("Z")
            meta.update({k.lower(): (v.item() if hasattr(v, "item") else v) for k in
                         ("PLATE", "MJD", "FIBERID", "CLASS", "SUBCLASS", "Z_ERR", "ZWARNING", "VDISP",
                          "PLUG_RA", "PLUG_DEC", "SN_MEDIAN_ALL")
                         if (v := get(k)) is not None})
        if z is not None and not np.isfinite(z):
            z = None
    obs = Observation(redshift=None if z is None else float(z), wave=wave, flux=flux.astype(np.float32),
                      ivar=ivar.astype(np.float32), name=name or path.stem)
    return SurveySpectrum(obs=obs, fwhm=fwhm, meta=meta)
