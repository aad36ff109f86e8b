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

import warnings

import numpy as np

from .data import Observation
from .surveys import DESI_BANDS, DESI_BANDS_NORTH

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


_DESI_FLUX_COLUMNS = ["G", "R", "Z", "W1", "W2"]


def read_desi_coadd(path: str | Path, targets: list[int] | None = None) -> SurveySpectrum:
    """Read a DESI ``coadd`` file: B, R and Z arms merged on one grid, Legacy Surveys photometry.

    The three arms share DESI's 0.8 A lattice in vacuum; where they overlap, pixels
    are combined with inverse-variance weights (flux), summed inverse variances and
    ivar-weighted resolution rows, as DESI's own camera coadds do. Pixels with a
    nonzero ``MASK`` are dropped. Photometry (``FLUX_G ... FLUX_W2`` and their
    ivar, nanomaggies, not corrected for Galactic extinction; ``EBV`` is in
    ``meta``) comes from the FIBERMAP: DECam g, r, z for ``PHOTSYS`` "S" (and
    targets without photometry), BASS g, r and MzLS z for "N".

    Arguments:
        path: The FITS file.
        targets: TARGETIDs to read, in that order; default all with data (empty
            fibres are skipped with a warning and listed in ``meta["skipped"]``).

    Returns:
        :class:`SurveySpectrum` with a batched :class:`Observation` (one row per target;
        ``redshift`` None: coadd files carry none), ``resolution`` (B, 11, M) in DESI's
        diagonal layout, and ``fwhm`` None-free: the per-pixel FWHM implied by the
        first target's resolution rows (Angstrom).

    Raises:
        SpectrumFileError: not FITS, truncated, arms or FIBERMAP missing, arms not on
            one lattice, unknown TARGETIDs, or targets of both photometric systems.
    """
    path = Path(path)
    hdul = _open_fits(path)
    with hdul:
        names = {h.name.upper() for h in hdul}
        need = {"FIBERMAP"} | {f"{a}_{k}" for a in "BRZ" for k in ("WAVELENGTH", "FLUX", "IVAR")}
        if not need <= names:
            raise SpectrumFileError(f"{path}: not a DESI coadd file (missing HDUs {sorted(need - names)})")
        fm = hdul["FIBERMAP"].data
        ids = np.asarray(fm["TARGETID"])
        if targets is None:
            rows = np.arange(len(ids))
        else:
            where = {int(t): i for i, t in enumerate(ids)}
            unknown = [t for t in targets if int(t) not in where]
            if unknown:
                raise SpectrumFileError(f"{path}: TARGETIDs not in the file: {unknown[:5]}")
            rows = np.array([where[int(t)] for t in targets])
        arms = []
        for a in "BRZ":
            w = np.asarray(hdul[f"{a}_WAVELENGTH"].data, dtype=np.float64)
            f = np.asarray(hdul[f"{a}_FLUX"].data, dtype=np.float64)[rows]
            iv = np.asarray(hdul[f"{a}_IVAR"].data, dtype=np.float64)[rows]
            if f.shape[-1] != len(w) or iv.shape != f.shape:
                raise SpectrumFileError(f"{path}: arm {a} flux/ivar do not match its {len(w)} wavelengths")
            if f"{a}_MASK" in names:
                iv = np.where(np.asarray(hdul[f"{a}_MASK"].data)[rows] != 0, 0.0, iv)
            res = np.asarray(hdul[f"{a}_RESOLUTION"].data, dtype=np.float64)[rows] \
                if f"{a}_RESOLUTION" in names else None
            arms.append((w, f, iv, res))
        wave, flux, ivar, resolution = _merge_arms(path, arms)
        photsys = np.char.strip(np.asarray(fm["PHOTSYS"]).astype(str))[rows] if "PHOTSYS" in fm.columns.names \
            else np.array(["S"] * len(rows))
        systems = set(photsys) - {""}
        if len(systems) > 1:
            raise SpectrumFileError(f"{path}: targets from both photometric systems {sorted(systems)}; "
                                    "read north and south targets separately with targets=[...]")
        bands = list(DESI_BANDS_NORTH if systems == {"N"} else DESI_BANDS)
        cols = fm.columns.names
        band_flux = np.stack([np.asarray(fm[f"FLUX_{b}"], dtype=np.float64)[rows] if f"FLUX_{b}" in cols
                              else np.zeros(len(rows)) for b in _DESI_FLUX_COLUMNS], -1)
        band_ivar = np.stack([np.asarray(fm[f"FLUX_IVAR_{b}"], dtype=np.float64)[rows] if f"FLUX_IVAR_{b}" in cols
                              else np.zeros(len(rows)) for b in _DESI_FLUX_COLUMNS], -1)
        meta = {"file": path.name, "targetid": ids[rows].tolist(), "photsys": photsys.tolist(),
                "ebv": np.asarray(fm["EBV"])[rows].tolist() if "EBV" in cols else None,
                "primary_header": dict(hdul[0].header)}
    bad = ~(ivar > 0).any(-1)
    if bad.all() or (bad.any() and targets is not None):
        raise SpectrumFileError(f"{path}: targets {ids[rows][bad].tolist()[:5]} have no unmasked pixel")
    if bad.any():  # by default, skip empty fibres (unassigned, sky with everything masked) and say so
        warnings.warn(f"{path.name}: skipped {int(bad.sum())} targets with no unmasked pixel "
                      f"({ids[rows][bad].tolist()[:5]}); listed in meta['skipped']", stacklevel=2)
        keep = ~bad
        meta["skipped"] = ids[rows][bad].tolist()
        rows = rows[keep]
        flux, ivar, band_flux, band_ivar = flux[keep], ivar[keep], band_flux[keep], band_ivar[keep]
        resolution = None if resolution is None else resolution[keep]
        meta["targetid"] = ids[rows].tolist()
        meta["photsys"] = [p for p, k in zip(meta["photsys"], keep) if k]
        if meta["ebv"] is not None:
            meta["ebv"] = [e for e, k in zip(meta["ebv"], keep) if k]
    obs = Observation(redshift=None, wave=wave, flux=flux.astype(np.float32), ivar=ivar.astype(np.float32),
                      resolution=None if resolution is None else resolution.astype(np.float32), bands=bands,
                      band_flux=band_flux.astype(np.float32), band_ivar=band_ivar.astype(np.float32),
                      name=[str(t) for t in ids[rows]])
    fwhm = _fwhm_from_resolution(resolution[0], wave) if resolution is not None else np.full_like(wave, np.nan)
    return SurveySpectrum(obs=obs, fwhm=fwhm, meta=meta)


def _merge_arms(path, arms):
    """Put the arms on their common lattice; ivar-weighted flux and resolution where they overlap."""
    step = float(np.round(np.median(np.diff(arms[0][0])), 6))
    lo = min(a[0][0] for a in arms)
    idx = []
    for w, *_ in arms:
        k = (w - lo) / step
        if np.any(np.abs(k - np.rint(k)) > 1e-3):
            raise SpectrumFileError(f"{path}: the arms are not on one wavelength lattice")
        idx.append(np.rint(k).astype(int))
    n = max(i[-1] for i in idx) + 1
    nb = arms[0][1].shape[0]
    has_res = all(a[3] is not None for a in arms)
    nd = arms[0][3].shape[1] if has_res else 0
    fsum, isum = np.zeros((nb, n)), np.zeros((nb, n))
    rsum = np.zeros((nb, nd, n)) if has_res else None
    wsum = np.zeros((nb, n))
    for (w, f, iv, res), i in zip(arms, idx):
        fsum[:, i] += f * iv
        isum[:, i] += iv
        if has_res:
            rsum[:, :, i] += res * np.maximum(iv, 1e-30)[:, None]
            wsum[:, i] += np.maximum(iv, 1e-30)
    wave = lo + step * np.arange(n)
    flux = np.where(isum > 0, fsum / np.where(isum > 0, isum, 1), 0.0)
    res = rsum / np.where(wsum > 0, wsum, 1)[:, None] if has_res else None
    return wave, flux, isum, res


def _fwhm_from_resolution(res: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Per-pixel FWHM (A) of a DESI resolution matrix (2H+1, M) from the second moment of its rows."""
    nd = res.shape[0]
    offsets = np.arange(nd // 2, -(nd // 2) - 1, -1)[:, None]  # DESI stores +H (above) first
    norm = res.sum(0)
    mean = (offsets * res).sum(0) / np.where(norm > 0, norm, 1)
    var = ((offsets - mean) ** 2 * res).sum(0) / np.where(norm > 0, norm, 1)
    return 2.3548 * np.sqrt(np.clip(var, 0, None)) * np.gradient(wave)
