"""Fitting many galaxies with an amortized posterior, in chunks that checkpoint.

:func:`fit_catalog` splits a batch :class:`~sedppl.data.Observation` into chunks;
each chunk's posterior draws go to ``chunks/posterior_NNNNN.nc`` (ArviZ NetCDF,
one ``galaxy`` dimension) and its summary rows to ``chunks/summary_NNNNN.ecsv``,
each written to a temporary name and renamed, so a killed run leaves only
complete chunks and a rerun skips them. The final table ``summary.ecsv`` (and
``summary.fits``) is assembled from the chunk tables, so a resumed run gives the
same table as an uninterrupted one (draws depend only on the seed and the chunk).

Summary columns: ``name``; for every latent and derived site (vector sites per
element) ``<site>_p16``, ``_p50``, ``_p84``; ``chi2_dof`` of the data against the
median posterior-predictive model (noise model of the fit, bands/pixels with
ivar 0 left out); ``ood`` (True when the posterior warned that the galaxy lies
outside its training distribution).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .data import Observation


def subset(obs: Observation, idx: slice) -> Observation:
    """Rows ``idx`` of a batch observation."""
    pick = (lambda t: None if t is None or t.dim() == 0 else t[idx])  # noqa: E731
    names = obs.name[idx] if isinstance(obs.name, list) else obs.name
    z = obs.redshift if obs.redshift is None or obs.redshift.dim() == 0 else obs.redshift[idx]
    res = obs.resolution if obs.resolution is None or obs.resolution.dim() < 3 else obs.resolution[idx]
    return Observation(redshift=z, wave=obs.wave, flux=pick(obs.flux), ivar=pick(obs.ivar), mask=pick(obs.mask),
                       resolution=res, bands=obs.bands, band_flux=pick(obs.band_flux),
                       band_ivar=pick(obs.band_ivar), name=names)


def n_galaxies(obs: Observation) -> int:
    data = obs.band_flux if obs.has_photometry else obs.flux
    return 1 if data.dim() == 1 else data.shape[0]


def summarize(idata, obs: Observation, post, ood: np.ndarray):
    """Summary table of one chunk: percentiles of every variable, chi2/dof and flags."""
    from astropy.table import Table

    n = n_galaxies(obs)
    cols: dict[str, np.ndarray] = {"name": np.array(obs.name if isinstance(obs.name, list) else [obs.name] * n)}
    for var in idata.posterior.data_vars:
        v = idata.posterior[var].values  # (chain, draw, galaxy, ...)
        v = v.reshape(v.shape[0] * v.shape[1], n, -1)
        for j in range(v.shape[-1]):
            label = var if v.shape[-1] == 1 else f"{var}_{j}"
            p16, p50, p84 = np.percentile(v[..., j], [16, 50, 84], axis=0)
            cols[f"{label}_p16"], cols[f"{label}_p50"], cols[f"{label}_p84"] = p16, p50, p84
    cols["chi2_dof"] = chi2_dof(idata, obs, post)
    cols["ood"] = ood
    return Table(cols)


def chi2_dof(idata, obs: Observation, post) -> np.ndarray:
    """chi2 per used band/pixel of the data against the median posterior-predictive model.

    Uses the photometry (nanomaggies) and/or the spectrum predicted by the model at
    each draw (``posterior_predictive`` means), with the model's photometric floor.
    """
    from .noise import photometry_sigma

    n = n_galaxies(obs)
    chi2, dof = np.zeros(n), np.zeros(n)
    pp = idata.posterior_predictive if hasattr(idata, "posterior_predictive") else None
    if pp is None:
        return np.full(n, np.nan)
    if "photometry" in pp and obs.has_photometry:
        v = pp["photometry"].values
        pred = torch.as_tensor(np.median(v.reshape(-1, *v.shape[2:]), axis=0)).reshape(n, -1)
        f, iv = obs.band_flux.reshape(n, -1), obs.band_ivar.reshape(n, -1)
        ok = iv > 0
        sig = photometry_sigma(pred, torch.where(ok, iv, torch.ones_like(iv)),
                               float(getattr(post.model, "photometry_floor", 0.0)))
        chi2 += torch.where(ok, ((f - pred) / sig) ** 2, torch.zeros_like(f)).sum(-1).numpy()
        dof += ok.sum(-1).numpy()
    if "spectrum" in pp and obs.has_spectrum:
        v = pp["spectrum"].values
        pred = torch.as_tensor(np.median(v.reshape(-1, *v.shape[2:]), axis=0)).reshape(n, -1)
        f, iv = obs.flux.reshape(n, -1), obs.ivar.reshape(n, -1)
        ok = iv > 0 if obs.mask is None else (iv > 0) & obs.mask.reshape(n, -1)
        chi2 += torch.where(ok, (f - pred) ** 2 * iv, torch.zeros_like(f)).sum(-1).numpy()
        dof += ok.sum(-1).numpy()
    return chi2 / np.maximum(dof, 1)


def prior_draws(model, n: int, redshift: float | None, seed: int = 0) -> dict[str, np.ndarray]:
    """{site: (n, ...)} latent and deterministic values of ``n`` prior draws of ``model`` (for plots)."""
    import pyro
    from pyro import poutine

    pyro.set_rng_seed(seed)
    kw = {} if redshift is None else {"redshift": redshift}
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(n_galaxies=n, **kw)
    return {k: v["value"].numpy() for k, v in tr.nodes.items()
            if v["type"] == "sample" and k not in ("spectrum", "photometry") and v["value"].dim() >= 1
            and v["value"].shape[0] == n}


def _plots(idata, part: Observation, post, first: int, count: int, folder: Path, truth) -> None:
    from .plotting import plot_fit

    folder.mkdir(parents=True, exist_ok=True)
    phot = post.model.forward_model.photometry
    names = part.name if isinstance(part.name, list) else [f"galaxy{first + i}" for i in range(n_galaxies(part))]
    for g in range(min(count, n_galaxies(part))):
        z = None if part.redshift is None else float(part.redshift.reshape(-1)[g if part.redshift.numel() > 1 else 0])
        prior = prior_draws(post.model, 2000, z)
        t = None if truth is None else {k: np.asarray(v)[first: first + n_galaxies(part)] for k, v in truth.items()}
        plot_fit(idata, part, phot, g, folder / f"{names[g]}.png", prior=prior, truth=t,
                 title=f"{names[g]} ({post.card.model}, z = {z})")


def fit_catalog(obs: Observation, post, out: str | Path, chunk: int = 500, num_samples: int = 1000,
                seed: int = 0, save_draws: bool = True, progress: bool = True, plots: int = 0,
                truth: dict | None = None):
    """Fit every galaxy of ``obs`` with a neural posterior, resumably.

    Arguments:
        obs: A batch observation (catalog or spectra).
        post: :class:`sedppl.infer.npe.NeuralPosterior`.
        out: Output folder (``summary.ecsv``, ``summary.fits``, ``chunks/``).
        chunk: Galaxies per chunk (a chunk is the unit of checkpointing).
        num_samples: Posterior draws per galaxy.
        seed: Seed; chunk i draws with seed + i.
        save_draws: Also write each chunk's draws as NetCDF.
        plots: Write a figure (photometric fit, SFH, corner over the prior) for the first ``plots``
            galaxies to ``plots/<name>.png``.
        truth: {site: (N,) true values} (mocks) to mark on the figures.

    Returns:
        The summary table (astropy ``Table``).
    """
    from astropy.table import Table, vstack
    from tqdm.auto import tqdm

    out = Path(out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    n = n_galaxies(obs)
    tables = []
    n_chunks = -(-n // chunk)
    for i in tqdm(range(n_chunks), disable=not progress, desc="fitting", unit="chunk"):
        path = out / "chunks" / f"summary_{i:05d}.ecsv"
        if path.exists():
            tables.append(Table.read(path))
            continue
        part = subset(obs, slice(i * chunk, min(n, (i + 1) * chunk)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = post.inputs(part, warn=False)
            ood = post.ood_flags(x)
            idata = post.sample(part, num_samples=num_samples, seed=seed + i, predictive=True, check=False)
        table = summarize(idata, part, post, ood)
        if i * chunk < plots:
            _plots(idata, part, post, i * chunk, plots - i * chunk, out / "plots", truth)
        if save_draws:
            nc = out / "chunks" / f"posterior_{i:05d}.nc"
            idata.to_netcdf(str(nc) + ".tmp")
            os.replace(str(nc) + ".tmp", nc)
        table.write(str(path) + ".tmp", format="ascii.ecsv", overwrite=True)
        os.replace(str(path) + ".tmp", path)
        tables.append(table)
        for w in caught:
            if "training distribution" not in str(w.message):
                warnings.warn(w.message, w.category)
    summary = vstack(tables)
    summary.meta["comments"] = [f"sedppl fit: {post.card.model} posterior, {num_samples} draws per galaxy, "
                                "16/50/84th percentiles; units as in docs/conventions.md"]
    for name, fmt in (("summary.ecsv", "ascii.ecsv"), ("summary.fits", "fits")):
        summary.write(str(out / name) + ".tmp", format=fmt, overwrite=True)
        os.replace(str(out / name) + ".tmp", out / name)
    if summary["ood"].any():
        warnings.warn(f"{int(summary['ood'].sum())} of {len(summary)} galaxies lie outside the posterior's training "
                      "distribution (column 'ood'); check them with --method nuts")
    return summary
