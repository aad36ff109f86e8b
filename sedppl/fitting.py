"""Fitting many galaxies with an amortized posterior, in chunks that checkpoint.

:func:`fit_catalog` splits a batch :class:`~sedppl.data.Observation` into chunks;
each chunk's posterior draws go to ``chunks/posterior_NNNNN.nc`` (ArviZ NetCDF,
one ``galaxy`` dimension) and its summary rows to ``chunks/summary_NNNNN.ecsv``,
each written to a temporary name and renamed, so a killed run leaves only
complete chunks and a rerun skips them. The final table ``summary.ecsv`` (and
``summary.fits``) is assembled from the chunk tables, so a resumed run gives the
same table as an uninterrupted one (draws depend only on the seed and the chunk).
Derived quantities are computed for every draw without simulating light
(:mod:`sedppl.derived`); the posterior-predictive data for the first
``predictive_draws`` draws only.
Chunks run in this process, in local worker processes, or on a Dask cluster
(``workers`` / ``scheduler``); either way this process writes the files.

:func:`fit_nuts` does the same with NUTS, one galaxy at a time, adding the
convergence flags ``rhat_max``, ``ess_bulk_min`` and ``divergences``;
:func:`fit_hmc` with batched HMC (:func:`sedppl.infer.hmc.run_hmc`), every
chain of every galaxy of a chunk in one computation, with the same flags.

Summary columns: ``name``; for every latent and derived site (vector sites per
element) ``<site>_p16``, ``_p50``, ``_p84``; ``chi2_dof`` of the data against the
median posterior-predictive model (over the predictive draws) (noise model of the fit, bands/pixels with
ivar 0 left out); ``poor_fit`` (chi2/dof > 3: the posterior-predictive check
failed, e.g. an amortized posterior out of its depth; check with NUTS); ``ood``
(True when the posterior warned that the galaxy lies outside its training
distribution).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from .data import Observation
from .derived import DATA_SITES

#: chi2/dof of the data against the median posterior-predictive model above which a fit is flagged
#: ``poor_fit`` (model mismatch at high S/N gives 1-3; an amortized posterior that failed, far more).
POOR_FIT_CHI2 = 3.0


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
    """Number of galaxies in an observation (1 for unbatched data)."""
    data = obs.band_flux if obs.has_photometry else obs.flux
    return 1 if data.dim() == 1 else data.shape[0]


def summarize(idata, obs: Observation, model, ood: np.ndarray):
    """Summary table of one chunk (``model``: the Pyro model fitted): percentiles of every variable,
    chi2/dof and flags."""
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
    cols["chi2_dof"] = chi2_dof(idata, obs, model)
    cols["poor_fit"] = cols["chi2_dof"] > POOR_FIT_CHI2
    cols["ood"] = ood
    stats = getattr(idata, "sample_stats", None)
    if stats is not None and "pareto_k" in stats:  # importance-sampled: the weights' diagnostics
        cols["is_pareto_k"] = stats["pareto_k"].values[0, 0]
        cols["is_ess"] = stats["importance_ess"].values[0, 0]
    return Table(cols)


def chi2_dof(idata, obs: Observation, model) -> np.ndarray:
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
                               float(getattr(model, "photometry_floor", 0.0)))
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

    from .derived import derived_only

    kw = {} if redshift is None else {"redshift": redshift}
    try:  # masses only, no light (sedppl.derived): prior draws for a corner plot in milliseconds
        pyro.set_rng_seed(seed)
        with torch.no_grad(), derived_only():
            tr = poutine.trace(model).get_trace(n_galaxies=n, **kw)
    except Exception:  # noqa: BLE001 - a model whose own code needs its light
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            tr = poutine.trace(model).get_trace(n_galaxies=n, **kw)
    return {k: v["value"].numpy() for k, v in tr.nodes.items()
            if v["type"] == "sample" and k not in DATA_SITES and v["value"].dim() >= 1
            and v["value"].shape[0] == n}


def _plots(idata, part: Observation, model, label: str, first: int, count: int, folder: Path, truth) -> None:
    from .plotting import plot_fit

    folder.mkdir(parents=True, exist_ok=True)
    phot = getattr(getattr(model, "forward_model", None), "photometry", None)
    names = part.name if isinstance(part.name, list) else [f"galaxy{first + i}" for i in range(n_galaxies(part))]
    for g in range(min(count, n_galaxies(part))):
        z = None if part.redshift is None else float(part.redshift.reshape(-1)[g if part.redshift.numel() > 1 else 0])
        prior = prior_draws(model, 2000, z)
        t = None if truth is None else {k: np.asarray(v)[first: first + n_galaxies(part)] for k, v in truth.items()}
        plot_fit(idata, part, phot, g, folder / f"{names[g]}.png", prior=prior, truth=t,
                 title=f"{names[g]} ({label}, z = {z:.5g})" if z is not None else f"{names[g]} ({label})")


#: Pyro's effect handlers live on one global stack per process, so two threads must not run a
#: model at once: chunks sent to a threaded Dask worker take turns.
_PYRO_LOCK = threading.Lock()


def _fit_chunk(post, part: Observation, seed: int, num_samples: int, threads: int | None = None,
               predictive_draws: int = 100, importance: int = 0):
    """One chunk: (summary table, InferenceData, warnings other than out-of-distribution ones).
    Runs wherever the chunk is sent (this process, a local worker process, a Dask worker)."""
    if threads:
        torch.set_num_threads(threads)
    with _PYRO_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = post.inputs(part, warn=False)
        ood = post.ood_flags(x)
        if importance:
            from .infer.importance import importance_sample

            idata = importance_sample(post, part, num_samples=importance, num_draws=num_samples, seed=seed,
                                      predictive=predictive_draws, warn=False)
        else:
            idata = post.sample(part, num_samples=num_samples, seed=seed, predictive=predictive_draws, check=False)
    table = summarize(idata, part, post.model, ood)
    return table, idata, [str(w.message) for w in caught if "training distribution" not in str(w.message)]


def fit_catalog(obs: Observation, post, out: str | Path, chunk: int = 500, num_samples: int = 1000,
                seed: int = 0, save_draws: bool = True, progress: bool = True, plots: int = 0,
                truth: dict | None = None, workers: int = 1, scheduler: str | None = None,
                processes: bool = True, predictive_draws: int = 100, importance: int = 0):
    """Fit every galaxy of ``obs`` with a neural posterior, resumably, here or on a Dask cluster.

    Arguments:
        obs: A batch observation (catalog or spectra).
        post: :class:`sedppl.infer.npe.NeuralPosterior`.
        out: Output folder (``summary.ecsv``, ``summary.fits``, ``chunks/``).
        chunk: Galaxies per chunk (a chunk is the unit of checkpointing and of parallel work).
        num_samples: Posterior draws per galaxy (derived quantities for all of them).
        seed: Seed; chunk i draws with seed + i, wherever it runs.
        save_draws: Also write each chunk's draws as NetCDF.
        plots: Write a figure (spectrum and/or photometric fit, SFH, ZH, corner over the prior) for the
            first ``plots`` galaxies to ``plots/<name>.png``.
        truth: {site: (N,) true values} (mocks) to mark on the figures.
        workers: Local worker processes (a ``dask.distributed.LocalCluster`` with one torch
            thread each) when > 1; 1 runs the chunks in this process.
        scheduler: Address of a running Dask scheduler (e.g. ``tcp://host:8786``) to send
            the chunks to instead; results come back here and are written by this process.
        processes: With ``workers`` > 1, worker processes (True) or threads (False; they take
            turns, since Pyro's handler stack is per process: for tests and debugging).
        predictive_draws: Posterior-predictive model data (for chi2/dof and the figures) for
            the first this many draws of each galaxy: one full forward simulation each, the
            dominant cost of a catalog fit, and 31 kB a draw for a DESI spectrum in the NetCDF.
        importance: When > 0, correct each galaxy's amortized posterior to the exact one by
            importance sampling with this many proposal draws
            (:func:`sedppl.infer.importance.importance_sample`; one model evaluation a draw); the
            table gains the weights' Pareto k-hat (``is_pareto_k``, reliable below 0.7) and
            effective sample size (``is_ess``).

    Returns:
        The summary table (astropy ``Table``).
    """
    from astropy.table import Table
    from tqdm.auto import tqdm

    out = Path(out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    n = n_galaxies(obs)
    n_chunks = -(-n // chunk)
    path = (lambda i: out / "chunks" / f"summary_{i:05d}.ecsv")  # noqa: E731
    todo = [i for i in range(n_chunks) if not path(i).exists()]
    part = (lambda i: subset(obs, slice(i * chunk, min(n, (i + 1) * chunk))))  # noqa: E731
    bar = tqdm(total=n_chunks, initial=n_chunks - len(todo), disable=not progress, desc="fitting", unit="chunk")

    def finish(i, table, idata, messages):
        if save_draws:  # the draws and the rows first: a failure in plotting loses nothing computed
            nc = out / "chunks" / f"posterior_{i:05d}.nc"
            idata.to_netcdf(str(nc) + ".tmp")
            os.replace(str(nc) + ".tmp", nc)
        table.write(str(path(i)) + ".tmp", format="ascii.ecsv", overwrite=True)
        os.replace(str(path(i)) + ".tmp", path(i))
        if i * chunk < plots:
            _plots(idata, part(i), post.model, post.card.model, i * chunk, plots - i * chunk, out / "plots", truth)
        for m in messages:
            warnings.warn(m)
        bar.update(1)

    if todo and (workers > 1 or scheduler is not None):
        from dask.distributed import Client, LocalCluster, as_completed

        if scheduler is not None:
            client = Client(scheduler)
        else:
            client = Client(LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                                         dashboard_address=None))
        try:
            remote = client.scatter(post, broadcast=True)
            threads = 1 if (scheduler is None and processes) else None  # one torch thread per local process
            futures = {client.submit(_fit_chunk, remote, part(i), seed + i, num_samples, threads, predictive_draws,
                                     importance, pure=False): i
                       for i in todo}
            for fut in as_completed(futures):
                finish(futures[fut], *fut.result())
        finally:
            client.close()
            if scheduler is None:
                client.cluster.close() if client.cluster is not None else None
    else:
        for i in todo:
            finish(i, *_fit_chunk(post, part(i), seed + i, num_samples, None, predictive_draws, importance))
    bar.close()
    tables = [Table.read(path(i)) for i in range(n_chunks)]
    summary = _write_summary(tables, out, f"sedppl fit: {post.card.model} posterior, {num_samples} draws per "
                             "galaxy, 16/50/84th percentiles; units as in docs/conventions.md")
    if summary["ood"].any():
        warnings.warn(f"{int(summary['ood'].sum())} of {len(summary)} galaxies lie outside the posterior's training "
                      "distribution (column 'ood'); check them with --method nuts")
    return summary


def _write_summary(tables: list, out: Path, comment: str):
    """Stack the chunk tables and write ``summary.ecsv`` and ``summary.fits`` atomically."""
    from astropy.table import vstack

    summary = vstack(tables)
    summary.meta["comments"] = [comment]
    for name, fmt in (("summary.ecsv", "ascii.ecsv"), ("summary.fits", "fits")):
        summary.write(str(out / name) + ".tmp", format=fmt, overwrite=True)
        os.replace(str(out / name) + ".tmp", out / name)
    return summary


def fit_nuts(obs: Observation, model, out: str | Path, num_samples: int = 500, warmup_steps: int = 500,
             num_chains: int = 2, seed: int = 0, save_draws: bool = True, progress: bool = True, plots: int = 0,
             truth: dict | None = None, **nuts_kwargs):
    """Fit every galaxy of ``obs`` with NUTS, one galaxy at a time, resumably.

    Each galaxy's draws go to ``chunks/nuts_NNNNN.nc`` and its summary row to
    ``chunks/summary_NNNNN.ecsv`` (atomic writes; a rerun skips finished galaxies).
    The summary has the columns of :func:`fit_catalog` (``ood`` is False: NUTS has no
    training distribution) plus the convergence flags ``rhat_max``, ``ess_bulk_min``
    and ``divergences``.

    Arguments:
        obs: A batch observation.
        model: The Pyro model (e.g. a zoo model).
        out: Output folder.
        num_samples, warmup_steps, num_chains: Per galaxy and chain (see :func:`sedppl.infer.nuts.run_nuts`).
        seed: Galaxy i runs with seed + i.
        plots, truth: As in :func:`fit_catalog`.
        **nuts_kwargs: Passed on to :func:`sedppl.infer.nuts.run_nuts`.

    Returns:
        The summary table (astropy ``Table``).
    """
    from .infer.nuts import run_nuts

    def run(part, i):
        return run_nuts(model, part, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                        seed=seed + i, progress=False, predictive=True, **nuts_kwargs)

    tables = _fit_mcmc(obs, model, Path(out), 1, run, "nuts", "NUTS", progress, plots, truth, save_draws)
    return _write_summary(tables, Path(out), f"sedppl fit --method nuts: {type(model).__name__}, {num_chains} chains x "
                          f"{num_samples} draws per galaxy, 16/50/84th percentiles; units as in docs/conventions.md")


def fit_hmc(obs: Observation, model, out: str | Path, num_samples: int = 500, warmup_steps: int = 500,
            num_chains: int = 4, chunk: int = 20, seed: int = 0, save_draws: bool = True, progress: bool = True,
            plots: int = 0, truth: dict | None = None, predictive: int = 100, **hmc_kwargs):
    """Fit every galaxy of ``obs`` with batched HMC, ``chunk`` galaxies (x chains) per computation, resumably.

    Each chunk's draws go to ``chunks/hmc_NNNNN.nc`` and its rows to
    ``chunks/summary_NNNNN.ecsv`` (NNNNN: the chunk's first galaxy; atomic writes;
    a rerun skips finished chunks). While a chunk runs, its sampler state is saved to
    ``chunks/hmc_NNNNN.ckpt`` (every 25 iterations), so a rerun continues an interrupted
    chunk where it stopped; the file is removed once the chunk is written. Columns as
    :func:`fit_nuts`, the convergence flags computed per galaxy.

    Arguments:
        obs: A batch observation.
        model: The Pyro model (every latent site in its galaxy plate, as the zoo models).
        out: Output folder.
        num_samples, warmup_steps, num_chains: Per galaxy and chain.
        chunk: Galaxies per batched run (the cost of a gradient grows slowly with the batch).
        seed: Chunk starting at galaxy i runs with seed + i.
        plots, truth: As in :func:`fit_catalog`.
        predictive: Draws per chain whose model data are kept (for chi2/dof and the plots).
        **hmc_kwargs: Passed on to :func:`sedppl.infer.hmc.run_hmc` (e.g. ``posterior``,
            ``neutra``, ``dtype``, ``max_steps``).

    Returns:
        The summary table (astropy ``Table``).
    """
    from .infer.hmc import run_hmc

    def run(part, i):  # a chunk's sampler state is saved as it runs, so an interrupted chunk resumes mid-run
        return run_hmc(model, obs=part, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                       seed=seed + i, progress=progress, predictive=predictive,
                       checkpoint=Path(out) / "chunks" / f"hmc_{i:05d}.ckpt", **hmc_kwargs)

    tables = _fit_mcmc(obs, model, Path(out), chunk, run, "hmc", "HMC", progress, plots, truth, save_draws)
    return _write_summary(tables, Path(out), f"sedppl fit --method hmc: {type(model).__name__}, {num_chains} chains "
                          f"x {num_samples} draws per galaxy, 16/50/84th percentiles; units as in docs/conventions.md")


def fit_smc(obs: Observation, model, out: str | Path, num_particles: int = 256, num_runs: int = 2, chunk: int = 20,
            seed: int = 0, save_draws: bool = True, progress: bool = True, plots: int = 0, truth: dict | None = None,
            predictive: int = 100, **smc_kwargs):
    """Fit every galaxy of ``obs`` by tempered SMC (:func:`sedppl.infer.smc.run_smc`), ``chunk`` galaxies
    per computation, resumably (files and columns as :func:`fit_hmc`, whose chains are SMC's
    independent runs here), plus ``log_evidence`` (nats, mean over the runs) and ``log_evidence_sd``
    (their standard deviation).

    Arguments:
        num_particles, num_runs: Particles per run (the draws of each run) and independent runs per galaxy.
        predictive: Particles per run whose model data are kept (for chi2/dof and the plots).
        **smc_kwargs: Passed on to :func:`sedppl.infer.smc.run_smc` (e.g. ``posterior`` to start from an
            amortized posterior, ``dtype``, ``moves``, ``max_steps``).
        Others: as :func:`fit_hmc`.

    Returns:
        The summary table (astropy ``Table``).
    """
    from .infer.smc import run_smc

    def run(part, i):
        return run_smc(model, obs=part, num_particles=num_particles, num_runs=num_runs, seed=seed + i,
                       progress=progress, predictive=predictive, **smc_kwargs)

    tables = _fit_mcmc(obs, model, Path(out), chunk, run, "smc", "SMC", progress, plots, truth, save_draws)
    return _write_summary(tables, Path(out), f"sedppl fit --method smc: {type(model).__name__}, {num_runs} runs "
                          f"x {num_particles} particles per galaxy, 16/50/84th percentiles; log_evidence in nats; "
                          "units as in docs/conventions.md")


def _fit_mcmc(obs: Observation, model, out: Path, chunk: int, run, stem: str, engine: str, progress: bool,
              plots: int, truth, save_draws: bool) -> list:
    """Summary tables of ``run(part, first_galaxy) -> InferenceData`` over chunks of ``obs``, each
    written as it finishes; chunks whose summary exists are read back instead (resume)."""
    from astropy.table import Table
    from tqdm.auto import tqdm

    (out / "chunks").mkdir(parents=True, exist_ok=True)
    n = n_galaxies(obs)
    tables = []
    for i in tqdm(range(0, n, chunk), disable=not progress, desc=engine, unit="galaxy" if chunk == 1 else "chunk"):
        path = out / "chunks" / f"summary_{i:05d}.ecsv"
        if path.exists():
            tables.append(Table.read(path))
            continue
        part = subset(obs, slice(i, min(i + chunk, n)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = run(part, i)
        tables.append(_write_mcmc(idata, part, model, out, f"{stem}_{i:05d}", path, i, plots, truth, engine,
                                  save_draws))
        (out / "chunks" / f"{stem}_{i:05d}.ckpt").unlink(missing_ok=True)  # the sampler state, once written out
        _pass_convergence_warnings(caught, list(range(i, min(i + chunk, n))))
    return tables


def _write_mcmc(idata, part: Observation, model, out: Path, stem: str, path: Path, first: int, plots: int,
                truth, engine: str, save_draws: bool):
    """Summary rows of an MCMC run over the galaxies of ``part`` with per-galaxy convergence flags;
    the draws and the rows are written (atomically) before any figure."""
    from .infer.nuts import check_convergence

    g = n_galaxies(part)
    table = summarize(idata, part, model, np.zeros(g, dtype=bool))
    flags = []
    for j in range(g):
        one = idata.isel(galaxy=j) if g > 1 else idata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flags.append(check_convergence(one))
    for key in ("rhat_max", "ess_bulk_min", "divergences"):
        table[key] = [f[key] for f in flags]
    if "smc" in idata.groups():  # the evidence of each galaxy: mean and spread over the independent runs
        log_z = idata.smc.log_evidence.values  # (run, galaxy)
        table["log_evidence"] = log_z.mean(0)
        table["log_evidence_sd"] = log_z.std(0, ddof=1) if log_z.shape[0] > 1 else np.full(g, np.nan)
    if save_draws:
        nc = out / "chunks" / f"{stem}.nc"
        idata.to_netcdf(str(nc) + ".tmp")
        os.replace(str(nc) + ".tmp", nc)
    table.write(str(path) + ".tmp", format="ascii.ecsv", overwrite=True)
    os.replace(str(path) + ".tmp", path)
    if first < plots:
        _plots(idata, part, model, f"{type(model).__name__}, {engine}", first, min(g, plots - first),
               out / "plots", truth)
    return table


def _pass_convergence_warnings(caught, galaxies: list[int]) -> None:
    """Re-issue the convergence warnings of an MCMC run, naming its galaxies."""
    label = f"galaxy {galaxies[0]}" if len(galaxies) == 1 else f"galaxies {galaxies[0]}-{galaxies[-1]}"
    for w in caught:
        if "converge" in str(w.message):
            warnings.warn(f"{label}: {w.message}", w.category)
