"""Any input of ``sedppl fit`` as an :class:`~sedppl.data.Observation` ready for a model.

Mock files from ``sedppl simulate`` (with their truths), SDSS/BOSS spec files and
DESI coadds (dereddened, put on the model's pixel grid, redshifts measured where
the file has none), and photometry catalogs. See docs/data.md.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table

from .data import Observation
from .extinction import deredden
from .readers import read_desi_coadd, read_sdss_spectrum
from .redshift import measure_redshift


def file_kind(path: Path) -> str:
    """'mock', 'sdss', 'desi' or 'table' from the FITS HDU names (anything unreadable: 'table')."""
    from astropy.io import fits

    try:
        with fits.open(path) as h:
            names = {x.name.upper() for x in h}
    except Exception:
        return "table"
    if "TRUTH" in names:
        return "mock"
    if "COADD" in names:
        return "sdss"
    if "FIBERMAP" in names and "B_FLUX" in names:
        return "desi"
    return "table"


def read_input(path: str | Path | list, model, catalog: dict | None = None, out: str | Path | None = None,
               ebv: float | list[float] | None = None):
    """(Observation, truths or None) from any file ``sedppl fit`` takes, or from several.

    Arguments:
        path: A sedppl mock file (``sedppl simulate``), an SDSS/BOSS spec file, a DESI
            coadd file, or (with ``catalog``) a photometry catalog; or a list of such files,
            whose galaxies make one batch in the order given (:meth:`Observation.concat`;
            e.g. many SDSS spec files, one galaxy each). Truths only if every file is a mock.
        model: The zoo model to fit (its grid, bands and redshift range).
        catalog: Keyword arguments of :func:`sedppl.catalogs.read_photometry_catalog`
            (bands, flux_columns, error_columns, unit, redshift_column, id_column).
        out: Folder for ``redshifts.ecsv`` when redshifts are measured.
        ebv: Milky Way E(B-V) (mag), one value for every galaxy or one per galaxy in
            batch order: the data are corrected for Galactic extinction
            (:func:`sedppl.extinction.deredden`). It replaces the E(B-V) a DESI FIBERMAP
            carries (used otherwise); SDSS spec files and mocks carry none. For a catalog's
            own column, give ``catalog["ebv_column"]`` instead.

    Returns:
        (batch :class:`Observation`, {site: (N,) true values} for mocks or None).

    Raises:
        ValueError: ``ebv`` negative, not finite, of the wrong length, or given together
            with a catalog E(B-V) column.
    """
    if ebv is not None and catalog is not None and catalog.get("ebv_column"):
        raise ValueError("give E(B-V) either as values (--ebv) or as a catalog column (--ebv-column), not both")
    fibermap = ebv is None
    if isinstance(path, (list, tuple)) and len(path) > 1:
        rows: list = []
        parts = [_read_one(p, model, catalog, rows, fibermap_ebv=fibermap) for p in path]
        if rows and out is not None:
            _write_redshifts(rows, out)
        truths = [t for _, t in parts]
        truth = None if any(t is None for t in truths) else \
            {k: np.concatenate([t[k] for t in truths]) for k in truths[0] if all(k in t for t in truths)}
        obs = Observation.concat([o for o, _ in parts])
    else:
        path = path[0] if isinstance(path, (list, tuple)) else path
        obs, truth = _read_one(path, model, catalog, None, out, fibermap_ebv=fibermap)
    if ebv is not None:
        obs = _deredden_batch(obs, ebv)
    return obs, truth


def _deredden_batch(obs: Observation, ebv) -> Observation:
    """``obs`` corrected for E(B-V) given as one value or one per galaxy (checked)."""
    n = obs.n_galaxies
    values = np.atleast_1d(np.asarray(ebv, dtype=float))
    if values.ndim != 1 or len(values) not in (1, n):
        raise ValueError(f"--ebv: {values.size} values of E(B-V) for {n} galaxies; give one for all or one each")
    try:
        out = deredden(obs, values if len(values) == n else float(values[0]))
    except ValueError as err:
        raise ValueError(f"--ebv: {err}") from None
    print(f"[sedppl] corrected for Milky Way extinction, E(B-V) = "
          f"{values[0]:.3f}" + (f" ... {values[-1]:.3f} ({n} galaxies)" if len(values) > 1 else " (every galaxy)"))
    return out


def _read_one(path, model, catalog, redshift_rows, out=None, fibermap_ebv=True):
    """(Observation, truths or None) of one file; measured redshifts to ``redshift_rows`` or ``out``."""
    from .catalogs import read_photometry_catalog
    from .mocks import read_mocks

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if catalog is not None:
        return read_photometry_catalog(path, **catalog), None
    kind = file_kind(path)
    if kind == "mock":
        mock = read_mocks(path)
        return mock.obs, {k: v.numpy() for k, v in mock.truth.items()}
    if kind in ("sdss", "desi"):
        return read_spectra(path, kind, model, out, redshift_rows, fibermap_ebv), None
    raise ValueError(f"{path} is not a sedppl mock, SDSS spec or DESI coadd file; for a catalog give --bands, "
                     "--flux-columns and --error-columns (and --z-column)")


def read_spectra(path: Path, kind: str, model, out: str | Path | None = None,
                 redshift_rows: list | None = None, fibermap_ebv: bool = True) -> Observation:
    """A survey spectrum file ('sdss' or 'desi') as a batch :class:`Observation` on ``model``'s grid.

    DESI spectra are corrected for Galactic extinction with the FIBERMAP's E(B-V)
    (unless ``fibermap_ebv`` is False: the caller corrects with its own values);
    photometry in other bands than the model's is dropped (the spectrum is fitted
    alone, with a warning); a spectrum on another grid is rebinned onto the model's
    (information-conserving); missing redshifts are measured
    (:func:`sedppl.redshift.measure_redshift`, written to ``out/redshifts.ecsv``, or
    appended to ``redshift_rows`` when that list is given, for a caller that reads several files).
    """
    fm = model.forward_model
    if getattr(fm, "spec", None) is None:
        raise ValueError(f"{path} holds spectra but the {type(model).__name__} model has none; "
                         "use a spectrum model (--model specphot)")
    spec = read_sdss_spectrum(path) if kind == "sdss" else read_desi_coadd(path)
    obs = spec.obs
    names = obs.name if isinstance(obs.name, list) else [obs.name]
    if kind == "desi" and fibermap_ebv and spec.meta.get("ebv") is not None:
        obs = deredden(obs, np.asarray(spec.meta["ebv"], dtype=float))
    if obs.has_photometry and list(obs.bands) != list(model.bands):
        warnings.warn(f"{path.name}: photometry in {obs.bands}, the model has {model.bands}: fitting the spectrum "
                      "alone")
        obs = Observation(redshift=obs.redshift, wave=obs.wave, flux=obs.flux, ivar=obs.ivar, mask=obs.mask,
                          resolution=obs.resolution, name=obs.name)
    model_wave = fm.wave_obs.double()
    if obs.wave.shape != model_wave.shape or not torch.allclose(obs.wave, model_wave, atol=1e-3):
        print(f"[sedppl] {path.name}: rebinning {obs.wave.shape[0]} pixels ({obs.wave[0]:.0f}-{obs.wave[-1]:.0f} A) "
              f"onto the model's {model_wave.shape[0]} ({model_wave[0]:.0f}-{model_wave[-1]:.0f} A)")
        obs = obs.on_grid(model_wave.numpy())
    if obs.redshift is None:
        flux, ivar = obs.flux.reshape(-1, obs.flux.shape[-1]), obs.ivar.reshape(-1, obs.flux.shape[-1])
        rows = []
        for g in range(flux.shape[0]):
            r = measure_redshift(Observation(wave=obs.wave, flux=flux[g], ivar=ivar[g]), z_range=fm.z_range)
            rows.append((names[g], r.z, r.z_err, r.delta_chi2, r.chi2 / max(r.dof, 1)))
            print(f"[sedppl] {names[g]}: measured z = {r.z:.5f} +- {r.z_err:.5f} (delta chi2 {r.delta_chi2:.1f})")
            if r.delta_chi2 < 9:
                warnings.warn(f"{names[g]}: ambiguous redshift (delta chi2 {r.delta_chi2:.1f} < 9)")
        if redshift_rows is not None:
            redshift_rows.extend(rows)
        elif out is not None:
            _write_redshifts(rows, out)
        z = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        obs = Observation(redshift=z if len(rows) > 1 or obs.flux.dim() == 2 else z[0], wave=obs.wave,
                          flux=obs.flux, ivar=obs.ivar, mask=obs.mask, resolution=obs.resolution, bands=obs.bands,
                          band_flux=obs.band_flux, band_ivar=obs.band_ivar, name=obs.name)
    if obs.flux.dim() == 1:  # one galaxy: a batch of one, as the fitters expect
        one = (lambda t: None if t is None else t[None])  # noqa: E731
        obs = Observation(redshift=None if obs.redshift is None else obs.redshift.reshape(1), wave=obs.wave,
                          flux=one(obs.flux), ivar=one(obs.ivar), mask=one(obs.mask),
                          resolution=None if obs.resolution is None or obs.resolution.dim() == 3
                          else one(obs.resolution), bands=obs.bands, band_flux=one(obs.band_flux),
                          band_ivar=one(obs.band_ivar), name=[obs.name] if isinstance(obs.name, str) else obs.name)
    return obs


def _write_redshifts(rows: list, out: str | Path) -> None:
    """``out/redshifts.ecsv``: name, z, z_err, delta_chi2, chi2_dof of the measured redshifts."""
    Path(out).mkdir(parents=True, exist_ok=True)
    Table(rows=rows, names=["name", "z", "z_err", "delta_chi2", "chi2_dof"]).write(
        Path(out) / "redshifts.ecsv", overwrite=True)
