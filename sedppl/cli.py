"""The ``sedppl`` command line.

    sedppl demo [--out DIR] [--z Z] [--seed N]   model a DESI-like mock galaxy from built-in data and fit it
    sedppl simulate --model {specphot,phot} [--n N] [--z Z] [--snr S] [--seed N] [--out FILE]
                                                 mock observations from a zoo model's prior
    sedppl train posterior --model {phot,specphot} [--n-sims N] [--max-epochs E] [--out FILE]
                                                 train (or resume) an amortized posterior, then calibrate it
    sedppl train vae --spectra FILE [--n-latent K] [--no-residual] [--max-epochs E] [--out FILE]
                                                 train (or resume) a VAE whose decoder is the SED model
    sedppl fit INPUT [INPUT ...] [--method npe|hmc|smc|nuts] [--model phot|specphot] [--posterior FILE] [--out DIR]
                                                 posteriors for every galaxy of mock files, SDSS/DESI
                                                 spectrum files, or a catalog
    sedppl compare INPUT [--galaxy I] [--model phot|specphot]
                                                 amortized vs NUTS posterior of one galaxy
    sedppl info                                  the SSP grid and filters sedppl can use

Exit codes: 0 success, 2 bad arguments or input (with a message naming the problem),
3 success, but some galaxies lie outside the posterior's training distribution or
  fail the posterior-predictive check (chi2/dof > 3),
4 success, but MCMC (hmc, smc, nuts) did not converge for some galaxies (R-hat > 1.01, bulk ESS < 100 or divergences).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    import torch
    from astropy.table import Table

    from .data import Observation
    from .dust import MAG_PER_TAU
    from .fitting import chi2_dof, prior_draws, summarize
    from .photometry import nanomaggies_to_ab
    from .plotting import plot_fit, plot_model
    from .posteriors import load_shipped
    from .sfh import mass_weighted_age, sfr_averaged
    from .zoo import SpecPhotModel

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("[sedppl] building the DESI-like model (BC03+MILES, Cloudy nebular, DESI grid, g r z W1 W2) ...",
          flush=True)
    model = SpecPhotModel()
    fm = model.forward_model
    z = torch.tensor(args.z)
    fm.check_redshift(z)
    t_univ = fm.cosmology.age(z).item()
    # Leja et al. (2019) continuity-prior bins at this redshift: 0, 30 Myr, 100 Myr,
    # 4 log-spaced edges up to 0.85 t_univ, then t_univ (lookback, Gyr)
    edges = np.concatenate([[0.0, 0.03], np.geomspace(0.1, 0.85 * t_univ, 5), [t_univ]])
    # a galaxy whose star formation declined: SFR per bin (Msun/yr), youngest first
    sfr = np.array([0.8, 1.0, 1.5, 2.5, 4.0, 6.0, 5.0])
    mass = sfr * np.diff(edges) * 1e9
    logz = np.array([0.1, 0.1, 0.05, 0.0, -0.1, -0.2, -0.3])
    av, av_bc = 0.4, 0.5
    m_t, e_t = torch.tensor(mass, dtype=torch.float32), torch.tensor(edges, dtype=torch.float32)
    with torch.no_grad():
        res = fm(m_t, e_t, torch.tensor(logz, dtype=torch.float32), z, av=av, dust_index=-0.3, av_bc=av_bc,
                 log_u=-2.7, sigma_v=150.0)
    spec = res.spectrum.numpy()
    rng = np.random.default_rng(args.seed)
    sigma = 0.1 * np.median(spec) * np.ones_like(spec)  # S/N ~ 10 per pixel at the median flux
    noisy = spec + rng.normal(0, sigma)
    wave = fm.wave_obs.numpy()
    Table({"wavelength": wave, "flux": noisy, "ivar": 1 / sigma**2, "model": spec},
          meta={"comments": ["sedppl demo: wavelength vacuum Angstrom; flux, model 1e-17 erg/s/cm^2/A; "
                             f"z = {args.z}"]}).write(out / "demo_spectrum.ecsv", overwrite=True)
    phot = res.photometry.numpy()
    Table({"band": model.bands, "flux_nmgy": phot, "mag_ab": nanomaggies_to_ab(res.photometry).numpy()}
          ).write(out / "demo_photometry.ecsv", overwrite=True)
    log_mstar = float(np.log10(res.surviving_mass.item()))
    plot_model(wave, noisy, spec, fm.photometry, phot, edges, sfr, out / "demo.png",
               title=f"sedppl demo: z = {args.z}, log M* = {log_mstar:.2f}")
    print(f"[sedppl] mass formed log10 = {np.log10(res.mass_formed.item()):.3f}, "
          f"surviving (stars + remnants) log10 = {log_mstar:.3f}")
    for b, f in zip(model.bands, phot):
        print(f"[sedppl] {b:8s} {f:10.3f} nmgy  ({22.5 - 2.5 * np.log10(f):.3f} AB)")

    # fit it with the shipped amortized posterior (photometry at S/N 30 a band)
    band_sigma = phot / 30.0
    obs = Observation(redshift=torch.tensor([args.z]), wave=wave, flux=torch.tensor(noisy[None]),
                      ivar=torch.tensor((1 / sigma**2)[None]), bands=model.bands,
                      band_flux=torch.tensor((phot + rng.normal(0, band_sigma))[None]),
                      band_ivar=torch.tensor((1 / band_sigma**2)[None]), name=["demo"])
    post = load_shipped("specphot", model)
    post.sample(obs, num_samples=50, seed=0, check=False)  # warm-up
    t1 = time.perf_counter()
    idata = post.sample(obs, num_samples=1000, seed=1, predictive=100)
    t_fit = time.perf_counter() - t1
    table = summarize(idata, obs, model, post.ood_flags(post.inputs(obs, warn=False)))
    table.write(out / "demo_posterior.ecsv", overwrite=True)
    truth = {"log_stellar_mass": log_mstar, "tau_ism": av / MAG_PER_TAU,
             "mass_weighted_age": float(mass_weighted_age(m_t, e_t)),
             "log_ssfr_100myr": float(torch.log10(sfr_averaged(m_t, e_t, 0.1))) - log_mstar}
    plot_fit(idata, obs, fm.photometry, 0, out / "demo_fit.png", prior=prior_draws(model, 2000, args.z),
             truth={k: np.array([v]) for k, v in truth.items()}, title=f"sedppl demo fit (z = {args.z})")
    print(f"[sedppl] amortized posterior: 1,000 draws + derived quantities + 100 predictive spectra in "
          f"{1e3 * t_fit:.0f} ms; chi2/dof {chi2_dof(idata, obs, model)[0]:.2f}")
    for k, v in truth.items():
        print(f"[sedppl] {k:18s} truth {v:7.3f}   posterior {table[k + '_p50'][0]:7.3f} "
              f"({table[k + '_p16'][0]:.3f} - {table[k + '_p84'][0]:.3f})")
    print(f"[sedppl] wrote demo_spectrum.ecsv, demo_photometry.ecsv, demo.png, demo_posterior.ecsv, demo_fit.png "
          f"to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .photometry import ALIASES, available_filters
    from .sps.grid import load_bc03_miles

    g = load_bc03_miles()
    print(f"SSP grid: {g.name}; {len(g.metallicities)} metallicities Z/Zsun = {[float(m) for m in g.metallicities]} "
          f"(Zsun = {g.zsun}); {len(g.ages)} ages 0-{g.ages[-1] / 1e9:.0f} Gyr; {len(g.wave)} wavelengths "
          f"{g.wave[0]:.1f} A - {g.wave[-1] / 1e4:.0f} um ({'air' if g.air else 'vacuum'})")
    print(f"filters: {', '.join(available_filters())}")
    print(f"aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from .mocks import make_mocks, write_mocks
    from .zoo import PhotometryModel, SpecPhotModel

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.snr <= 0 or args.snr_photometry <= 0:
        raise ValueError("signal-to-noise ratios must be > 0")
    model = SpecPhotModel() if args.model == "specphot" else PhotometryModel()
    lo, hi = model.forward_model.z_range
    if args.z is not None and not lo <= args.z <= hi:
        raise ValueError(f"--z {args.z} is outside the model's range {lo}-{hi}")
    t0 = time.time()
    mock = make_mocks(model, args.n, seed=args.seed, redshift=args.z, snr_spectrum=args.snr,
                      snr_photometry=args.snr_photometry)
    out = write_mocks(mock, args.out, model_name=args.model)
    print(f"wrote {args.n} mock galaxies ({args.model}, z = {'sampled' if args.z is None else args.z}) "
          f"to {out} in {time.time() - t0:.1f} s")
    return 0


def _zoo_model(name: str, sps: str = "exact", phot_rest_range=None):
    from .zoo import PhotometryModel, SpecPhotModel

    cls = SpecPhotModel if name == "specphot" else PhotometryModel
    return cls(sps=sps, phot_rest_range=None if phot_rest_range is None else tuple(phot_rest_range))


def _train_emulator(args: argparse.Namespace) -> int:
    from .emulator_training import DEFAULT_SCHEDULE
    from .sps.emulated import train_branch_emulator

    if args.n_train < 100:
        raise ValueError("--n-train must be >= 100")
    branch = args.branch or ("spec" if args.model == "specphot" else "phot")
    if args.rest_range is not None and branch != "phot":
        raise ValueError("--rest-range widens the photometry grid: use it with --branch phot")
    model = _zoo_model(args.model, phot_rest_range=args.rest_range)
    out = args.out if args.out != "posterior.safetensors" else f"emulator_{args.model}_{branch}.safetensors"
    # cosine: one stage whose rate falls from 1e-3 to 1e-6 over --max-epochs epochs, all of which run
    schedule = {"cosine": ((1e-3, 512, 1e-6),)}.get(args.schedule, DEFAULT_SCHEDULE)
    t0 = time.time()
    emu = train_branch_emulator(model, branch, out, n_train=args.n_train, n_valid=max(100, args.n_train // 10),
                                n_components=args.n_components, n_chunks=args.chunks, seed=args.seed,
                                max_epochs=args.max_epochs, patience=args.patience, schedule=schedule,
                                device=args.device, **({"hidden": tuple(args.hidden)} if args.hidden else {}))
    acc = emu.card.accuracy
    print(f"[sedppl] trained in {time.time() - t0:.0f} s; on {emu.card.n_valid} validation draws |df/f| median "
          f"{acc['median_abs_frac']:.2e}, 99th percentile {acc['p99_abs_frac']:.2e}")
    print(f"[sedppl] wrote {Path(out).with_suffix('.safetensors')} and its card {Path(out).with_suffix('.json')}")
    return 0


def _train(args: argparse.Namespace) -> int:

    import torch

    from .infer.npe_calibration import calibrate, fit_base_scale
    from .infer.npe_training import train_npe

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "emulator":
        return _train_emulator(args)
    if args.what == "vae":
        return _train_vae(args)
    if args.n_sims < 100 or 0 < args.n_calibration < 10 or 0 < args.n_base_fit < 100:
        raise ValueError("--n-sims must be >= 100, --n-calibration 0 or >= 10, --n-base-fit 0 or >= 100")
    model = _zoo_model(args.model)
    name = {"phot": "PhotometryModel", "specphot": "SpecPhotModel"}[args.model]
    t0 = time.time()
    conditions = None
    if args.model == "specphot":
        from .infer.conditions import ObservingConditions

        # spectra alone (no photometry), other spectrographs' coverage (e.g. SDSS on the DESI grid),
        # bright nearby galaxies (S/N up to 100 per pixel)
        conditions = ObservingConditions(snr_spectrum=(0.5, 100.0), masked_fraction=0.15, edge_fraction=0.1,
                                         no_photometry_probability=0.15, photometry_floor=model.photometry_floor)
    kw = dict(n_sims=args.n_sims, n_valid=max(100, args.n_sims // 20), model_name=name, conditions=conditions,
              max_epochs=args.max_epochs, patience=args.patience, n_sims_log_z=args.n_sims_log_z,
              distance_inputs=args.model == "specphot", progress=True,
              schedule={"staged": "plateau"}.get(args.schedule, args.schedule), lr=args.lr,
              interleaved_transforms=args.interleaved)
    if args.ensemble > 1:
        from .infer.ensemble import train_npe_ensemble

        if args.init_from:
            raise ValueError("--init-from starts one posterior from another; it does not combine with --ensemble")
        post = train_npe_ensemble(model, args.out, members=args.ensemble, seed=args.seed, **kw)
        print(f"[sedppl] trained an ensemble of {args.ensemble} in {time.time() - t0:.0f} s: epochs "
              f"{[m.card.epochs for m in post.members]}, validation losses "
              f"{[round(m.card.valid_loss, 3) for m in post.members]}")
    else:
        post = train_npe(model, args.out, seed=args.seed, init_from=args.init_from, **kw)
        print(f"[sedppl] trained in {time.time() - t0:.0f} s: {post.card.epochs} epochs, "
              f"validation loss {post.card.valid_loss:.3f}")
    if args.n_base_fit:
        members = post.members if args.ensemble > 1 else [post]
        scales = [fit_base_scale(m, n_sims=args.n_base_fit) for m in members]
        if not args.n_calibration:  # else saved once, with the calibration below
            post.save(args.out)
        print(f"[sedppl] base scale refitted on {args.n_base_fit} fresh simulations: "
              f"{', '.join(f'{v:.4f}' for v in scales)} (1: the flow was calibrated as trained)")
    if args.n_calibration:
        t1 = time.time()
        cal = calibrate(post, n_sims=args.n_calibration, progress=True)
        cal["seconds"] = round(time.time() - t1, 1)
        if args.ensemble > 1:
            post.calibration = cal
        else:
            post.card.calibration = cal
        post.save(args.out)
        print(f"[sedppl] calibration on {cal['n_sims']} held-out simulations: largest coverage error "
              f"{cal['max_coverage_error']:.3f} (HPD and TARP, levels 0.05-0.95); smallest SBC p-value "
              f"{cal['min_sbc_pvalue']:.3g}")
    if args.ensemble > 1:
        print(f"[sedppl] wrote the ensemble index {Path(args.out).with_suffix('.json')} and its members")
    else:
        print(f"[sedppl] wrote {Path(args.out).with_suffix('.safetensors')} and its card "
              f"{Path(args.out).with_suffix('.json')}")
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from .infer.vae_training import train_vae
    from .inputs import read_input
    from .zoo import SpecPhotModel

    if args.model != "specphot":
        raise ValueError("the VAE encodes spectra: use --model specphot")
    if not args.spectra:
        raise ValueError("train vae needs --spectra FILE (spectra with redshifts, e.g. from `sedppl simulate`)")
    model = SpecPhotModel()
    obs, _ = read_input(args.spectra, model)
    if not obs.has_spectrum or obs.redshift is None:
        raise ValueError(f"{args.spectra}: the VAE needs spectra with known redshifts")
    grid = model.forward_model.wave_obs.numpy()
    if obs.wave.shape[0] != len(grid) or not np.allclose(obs.wave.numpy(), grid, atol=1e-3):
        model = SpecPhotModel(wave=obs.wave.numpy(), bands=obs.bands or model.bands)
    out = args.out if args.out != "posterior.safetensors" else "vae.safetensors"
    sims = args.n_sims if args.n_sims != 100_000 else 10_000  # the NPE default is not the VAE's
    if sims < 10:
        raise ValueError("--n-sims must be >= 10")
    t0 = time.time()
    vae = train_vae(model, obs, out, model_name="SpecPhotModel", residual=not args.no_residual,
                    n_latent=args.n_latent, max_epochs=args.max_epochs, patience=args.patience,
                    sleep_sims=sims, final_sleep_sims=sims, seed=args.seed)
    c = vae.card
    print(f"[sedppl] trained in {time.time() - t0:.0f} s: {c['epochs']} epochs, validation -ELBO "
          f"{c['valid_loss_per_galaxy']:.1f} per galaxy")
    print(f"[sedppl] wrote {Path(out).with_suffix('.safetensors')} and its card {Path(out).with_suffix('.json')}")
    return 0


def _read_input(args: argparse.Namespace, model):
    from .inputs import read_input

    split = (lambda v: [c.strip() for c in v.split(",")] if v else None)  # noqa: E731
    catalog = None
    if args.bands is not None:
        catalog = dict(bands=split(args.bands), flux_columns=split(args.flux_columns) or [],
                       error_columns=split(args.error_columns) or [], unit=args.unit,
                       redshift_column=args.z_column, id_column=args.id_column, ebv_column=args.ebv_column)
    elif args.ebv_column is not None:
        raise ValueError("--ebv-column names a catalog column: give it with --bands, --flux-columns, --error-columns")
    ebv = None
    if args.ebv is not None:
        try:
            ebv = [float(v) for v in split(args.ebv)]
        except ValueError as err:
            raise ValueError(f"--ebv takes numbers (mag), comma-separated: {args.ebv!r}") from err
    return read_input(args.input, model, catalog=catalog, out=args.out, ebv=ebv)


def _posterior(args: argparse.Namespace, model):
    """The amortized posterior of ``--posterior`` (a file: one posterior or an ensemble's index), else the
    one shipped for ``--model``."""
    from .infer.ensemble import load_posterior
    from .posteriors import load_shipped

    return load_posterior(args.posterior, model) if args.posterior else load_shipped(args.model, model)


def _fit(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from .fitting import fit_catalog, fit_hmc, fit_nuts, fit_smc

    chunk = args.chunk if args.chunk is not None else 20 if args.method == "hmc" else 500
    if args.draws < 10 or chunk < 1:
        raise ValueError("--draws must be >= 10 and --chunk >= 1")
    if args.importance and (args.method != "npe" or args.importance < 100):
        raise ValueError("--importance N corrects the npe posterior: use it with --method npe and N >= 100")
    model = _zoo_model(args.model, args.sps)
    obs, truth = _read_input(args, model)
    if args.method == "smc" and args.chunk is None:  # every particle of every run is a row of one batch
        chunk = 1 if obs.has_spectrum else max(1, 5120 // (args.draws * args.chains))
    t0 = time.time()
    if args.method in ("nuts", "hmc", "smc"):
        common = dict(num_samples=args.draws, warmup_steps=args.warmup, num_chains=args.chains, seed=args.seed,
                      save_draws=not args.no_draws, plots=args.plots, truth=truth)
        if args.method == "nuts":
            table = fit_nuts(obs, model, args.out, max_tree_depth=args.max_tree_depth, **common)
        elif args.method == "smc":  # from the amortized posterior (its flow's coordinates) unless --from-prior
            dtype = torch.float64 if obs.has_spectrum else torch.float32
            post = None if args.from_prior else _posterior(args, model)
            table = fit_smc(obs, model, args.out, num_particles=args.draws, num_runs=args.chains, chunk=chunk,
                            seed=args.seed, save_draws=not args.no_draws, plots=args.plots, truth=truth, dtype=dtype,
                            moves=args.moves, max_steps=args.max_steps or 32, posterior=post)
        else:  # starts from the amortized posterior's best draws; spectra in double precision
            post = _posterior(args, model)
            dtype = torch.float64 if obs.has_spectrum else torch.float32
            table = fit_hmc(obs, model, args.out, chunk=chunk, posterior=post, neutra=False, dtype=dtype,
                            max_steps=args.max_steps or 128, **common)
        # the thresholds of sedppl.infer.nuts.check_convergence; with one chain R-hat is NaN and ESS decides
        bad = int(((table["rhat_max"] > 1.01) | (table["ess_bulk_min"] < 100) | (table["divergences"] > 0)).sum())
        print(f"[sedppl] {len(table)} galaxies fitted with {args.method.upper()} in {time.time() - t0:.1f} s "
              f"({args.chains} {'runs' if args.method == 'smc' else 'chains'} x "
              f"{args.draws} {'particles' if args.method == 'smc' else 'draws'}); median chi2/dof {np.nanmedian(table['chi2_dof']):.2f}; "
              f"wrote {Path(args.out) / 'summary.ecsv'}")
        if bad:
            print(f"[sedppl] {bad} galaxies with R-hat > 1.01, bulk ESS < 100 or divergences (columns rhat_max, "
                  "ess_bulk_min, divergences): run longer chains" + (" (smc: more particles)" if
                                                                    args.method == "smc" else ""), file=sys.stderr)
            return 4
        return 0
    post = _posterior(args, model)
    if args.compile:
        if args.workers > 1 or args.scheduler:
            raise ValueError("--compile compiles the flow in this process: use it with --workers 1 and no --scheduler")
        post.compile()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*outside the posterior's training distribution.*")
        table = fit_catalog(obs, post, args.out, chunk=chunk, num_samples=args.draws, seed=args.seed,
                            save_draws=not args.no_draws, plots=args.plots, truth=truth, workers=args.workers,
                            scheduler=args.scheduler, predictive_draws=args.predictive_draws,
                            importance=args.importance)
    n_ood, n_poor = int(table["ood"].sum()), int(table["poor_fit"].sum())
    print(f"[sedppl] {len(table)} galaxies fitted in {time.time() - t0:.1f} s ({args.draws} draws each); "
          f"median chi2/dof {np.nanmedian(table['chi2_dof']):.2f}; wrote {Path(args.out) / 'summary.ecsv'}")
    if n_ood or n_poor:
        print(f"[sedppl] {n_ood} galaxies lie outside the posterior's training distribution (column 'ood') and "
              f"{n_poor} fail the posterior-predictive check (chi2/dof > 3, column 'poor_fit'); check them with "
              "--method nuts", file=sys.stderr)
        return 3
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from .diagnostics import compare_posteriors
    from .fitting import n_galaxies, subset
    from .infer.nuts import check_convergence, run_nuts
    from .plotting import plot_compare

    model = _zoo_model(args.model)
    obs, _ = _read_input(args, model)
    if not 0 <= args.galaxy < n_galaxies(obs):
        raise ValueError(f"--galaxy {args.galaxy} is not in the file's {n_galaxies(obs)} galaxies")
    one = subset(obs, slice(args.galaxy, args.galaxy + 1))
    post = _posterior(args, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    npe = post.sample(one, num_samples=args.npe_draws, seed=args.seed)
    t_npe = time.time() - t0
    t0 = time.time()
    nuts = run_nuts(model, one, num_samples=args.draws, warmup_steps=args.warmup, num_chains=args.chains,
                    seed=args.seed, max_tree_depth=args.max_tree_depth, progress=True)
    t_nuts = time.time() - t0
    conv = check_convergence(nuts)
    names = [p for p in args.params.split(",") if p in npe.posterior and p in nuts.posterior]
    if not names:
        raise ValueError(f"none of --params {args.params} is a scalar site of the {args.model} model")
    flat = (lambda idata: {p: idata.posterior[p].values.reshape(-1) for p in names})  # noqa: E731
    stats = compare_posteriors(flat(npe), flat(nuts), seed=args.seed)
    npe.to_netcdf(str(out / "npe.nc"))
    nuts.to_netcdf(str(out / "nuts.nc"))
    record = {"galaxy": args.galaxy, "npe_seconds": round(t_npe, 3), "nuts_seconds": round(t_nuts, 1),
              "nuts_convergence": conv, **stats}
    (out / "compare.json").write_text(json.dumps(record, indent=1))
    plot_compare(flat(npe), flat(nuts), out / "compare.png", stats=stats,
                 title=f"{args.input} galaxy {args.galaxy}: NPE {t_npe:.2f} s, NUTS {t_nuts:.0f} s")
    print(f"{'parameter':>22}  {'shift [sd]':>10}  {'width ratio':>11}")
    for p in names:
        print(f"{p:>22}  {stats['shift'][p]:+10.2f}  {stats['width_ratio'][p]:11.2f}")
    print(f"classifier two-sample accuracy {stats['c2st_accuracy']:.3f} (null sd {stats['c2st_null_sd']:.3f}); "
          f"NPE {t_npe:.2f} s, NUTS {t_nuts:.0f} s (R-hat max {conv['rhat_max']:.3f}, "
          f"{conv['divergences']} divergences); wrote {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sedppl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="model a DESI-like mock galaxy (spectrum, photometry, plot) and fit it with "
                                    "the shipped amortized posterior")
    d.add_argument("--out", default="out", help="output directory (default: out)")
    d.add_argument("--z", type=float, default=0.1, help="redshift, 0.002-1.1 (default 0.1)")
    d.add_argument("--seed", type=int, default=0, help="seed of the mock noise")
    d.set_defaults(func=_demo)
    s = sub.add_parser("simulate", help="mock observations drawn from a zoo model's prior, to a FITS file")
    s.add_argument("--model", choices=["specphot", "phot"], default="specphot",
                   help="specphot: DESI-like spectrum + grzW1W2; phot: SDSS ugriz (default specphot)")
    s.add_argument("--n", type=int, default=10, help="number of galaxies (default 10)")
    s.add_argument("--z", type=float, default=None,
                   help="redshift of all galaxies (then known to a fit); default: drawn from "
                        "the model's prior and left for the fit to infer")
    s.add_argument("--snr", type=float, default=3.0, help="median S/N per spectral pixel (default 3)")
    s.add_argument("--snr-photometry", type=float, default=30.0, help="S/N per band (default 30)")
    s.add_argument("--seed", type=int, default=0, help="seed of truths and noise")
    s.add_argument("--out", default="mocks.fits", help="output FITS file (default mocks.fits)")
    s.set_defaults(func=_simulate)
    t = sub.add_parser("train", help="train an amortized posterior or an SPS emulator for a zoo model "
                                     "(resumes if interrupted)")
    t.add_argument("what", choices=["posterior", "emulator", "vae"],
                   help="posterior: amortized NPE posterior; emulator: the older stars' light of one rest-frame "
                        "grid, from the exact synthesis (sedppl.sps.emulated); vae: a variational autoencoder "
                        "of --spectra whose decoder is the specphot model plus a learned rest-frame "
                        "correction (sedppl.infer.vae)")
    t.add_argument("--model", choices=["phot", "specphot"], default="phot",
                   help="phot: SDSS ugriz (SEDflow-like); specphot: DESI-like spectrum + grzW1W2")
    t.add_argument("--n-sims", type=int, default=100_000,
                   help="prior-predictive simulations (default 100000; vae: of its encoder's sleep phase, "
                        "default 10000)")
    t.add_argument("--max-epochs", type=int, default=200, help="epoch cap (default 200)")
    t.add_argument("--patience", type=int, default=15, help="epochs without improvement before stopping")
    t.add_argument("--n-sims-log-z", type=int, default=0,
                   help="further simulations with redshifts uniform in log z (denser at low z; default 0)")
    t.add_argument("--ensemble", type=int, default=1,
                   help="train this many posteriors independently (own simulations and seeds) and save them "
                        "as an equal-weight mixture: wider where the members disagree (default 1: one posterior)")
    t.add_argument("--init-from", default=None,
                   help="start from the weights of a trained posterior of the same model (.safetensors)")
    t.add_argument("--interleaved", type=int, default=0,
                   help="posterior: further spline coupling transforms whose groups are the even and the odd "
                        "parameters, so that neighbouring ones (e.g. tau_ism and dust_index) are conditioned on "
                        "each other; they start as the identity and may be added with --init-from (default 0)")
    t.add_argument("--n-base-fit", type=int, default=2000,
                   help="fresh simulations to refit the width of the flow's base distribution on after "
                        "training (maximum likelihood; sedppl.infer.npe_calibration.fit_base_scale; 0: skip)")
    t.add_argument("--n-calibration", type=int, default=1000,
                   help="held-out simulations for the calibration figures on the card (0: skip)")
    t.add_argument("--seed", type=int, default=0, help="seed of simulations, noise and initialisation")
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    t.add_argument("--out", default="posterior.safetensors",
                   help="output weights (+ .json card); emulator default: emulator_MODEL_BRANCH.safetensors")
    t.add_argument("--branch", choices=["spec", "phot"], default=None,
                   help="emulator: the spectrum's fine grid or photometry's coarse grid (default: spec for "
                        "specphot, phot for phot)")
    t.add_argument("--n-train", type=int, default=60_000, help="emulator: training draws (default 60000)")
    t.add_argument("--n-components", type=int, default=64,
                   help="emulator: PCA components (per wavelength chunk; default 64)")
    t.add_argument("--chunks", type=int, default=1,
                   help="emulator: wavelength chunks of equal width in ln lambda, each with its own PCA and "
                        "network, blended where neighbours overlap (default 1)")
    t.add_argument("--rest-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="emulator, photometry grid: rest-frame vacuum Angstrom to cover beyond what the bands "
                        "need, whole pixels added (the shipped ones: 2000 60000); the emulator then serves any "
                        "model whose grid is a run of its pixels")
    t.add_argument("--schedule", choices=["staged", "cosine"], default="staged",
                   help="emulator: staged: four (learning rate, batch) stages, each ended by --patience; cosine: "
                        "one stage, rate 1e-3 falling to 1e-6 along a cosine over all --max-epochs epochs (the "
                        "shipped DESI photometry emulator's only stage: 493 epochs); posterior: staged: the rate "
                        "halves when the validation loss stalls; cosine: it falls from --lr to --lr/1000 over "
                        "all --max-epochs epochs (a fine-tuning stage after --init-from)")
    t.add_argument("--lr", type=float, default=1e-3,
                   help="posterior: starting learning rate (default 1e-3)")
    t.add_argument("--hidden", type=int, nargs="+", default=None, metavar="WIDTH",
                   help="emulator: widths of the network's hidden layers (per chunk; default 256 256 256; the "
                        "shipped ones: 512 512 512 512)")
    t.add_argument("--device", default="cpu",
                   help="emulator: device the network is fitted on, e.g. cuda (default cpu)")
    t.add_argument("--spectra", default=None,
                   help="vae: training spectra with redshifts (a `sedppl simulate` file, SDSS spec or DESI coadd)")
    t.add_argument("--n-latent", type=int, default=2,
                   help="vae: latent variables of the learned correction per galaxy (default 2)")
    t.add_argument("--no-residual", action="store_true",
                   help="vae: physics only (no learned correction): plain amortized variational inference")
    t.set_defaults(func=_train)
    f = sub.add_parser("fit", help="posteriors for every galaxy of a mock file, spectrum file or photometry catalog "
                                   "(resumable)")
    f.add_argument("input", nargs="+",
                   help="a file from `sedppl simulate`, an SDSS spec-*.fits or DESI coadd-*.fits file "
                        "(use --model specphot), or a photometry catalog (FITS/ECSV/CSV); several files of one "
                        "kind make one batch, galaxies numbered in the order given (e.g. many SDSS spec files)")
    f.add_argument("--method", choices=["npe", "hmc", "smc", "nuts"], default="npe",
                   help="npe: amortized posterior, milliseconds a galaxy (default); hmc: MCMC, every chain of "
                        "--chunk galaxies in one batched computation, started from the amortized posterior's best "
                        "draws (spectra in double precision); smc: tempered sequential Monte Carlo from the "
                        "amortized posterior to the exact one (or from the prior: --from-prior), --chains "
                        "independent runs of --draws particles (multimodal posteriors; adds the log evidence); "
                        "nuts: Pyro's NUTS, one galaxy at a time")
    f.add_argument("--model", choices=["phot", "specphot"], default="phot", help="zoo model (default phot)")
    f.add_argument("--posterior", default=None, help="a trained posterior (.safetensors); default: the shipped one")
    f.add_argument("--sps", choices=["exact", "emulated"], default="exact",
                   help="stellar synthesis of the model: exact (default) or the shipped emulator of the model's "
                        "grid (phot: photometry; specphot: the spectrum, photometry exact)")
    f.add_argument("--out", default="fit", help="output folder (default fit); a rerun resumes")
    f.add_argument("--draws", type=int, default=1000,
                   help="posterior draws per galaxy (npe) or per chain (hmc, nuts) (default 1000)")
    f.add_argument("--predictive-draws", type=int, default=100,
                   help="npe: posterior-predictive model data (chi2/dof, figures) for this many draws a galaxy "
                        "(default 100; each costs a forward simulation)")
    f.add_argument("--importance", type=int, default=0, metavar="N",
                   help="npe: correct each galaxy's amortized posterior to the exact one by importance sampling "
                        "with N proposal draws (e.g. 20000: ~3 s a galaxy for the phot model); the table gains "
                        "the weights' Pareto k-hat (is_pareto_k, reliable below 0.7) and ESS (is_ess)")
    f.add_argument("--warmup", type=int, default=500, help="hmc, nuts: warmup steps per chain (default 500)")
    f.add_argument("--chains", type=int, default=2, help="hmc, nuts: chains per galaxy (default 2)")
    f.add_argument("--max-tree-depth", type=int, default=8, help="nuts: maximum tree depth (default 8)")
    f.add_argument("--max-steps", type=int, default=None,
                   help="hmc, smc: most leapfrog steps a transition (the batch waits for its longest; default 128 "
                        "for hmc, 32 for smc)")
    f.add_argument("--moves", type=int, default=5, help="smc: HMC moves of every particle per tempering step "
                                                        "(default 5)")
    f.add_argument("--from-prior", action="store_true",
                   help="smc: start from prior draws and temper the likelihood, without the amortized posterior "
                        "(slower; for galaxies outside its training range, or as an independent check)")
    f.add_argument("--chunk", type=int, default=None,
                   help="galaxies per checkpointed chunk (default 500; hmc: galaxies per batched run, default 20; "
                        "smc: default 1 for spectra, else 5120 / (draws x chains))")
    f.add_argument("--seed", type=int, default=0, help="seed of the draws")
    f.add_argument("--compile", action="store_true",
                   help="npe: draw through a torch.compile-d flow (1.5-2.5 minutes to compile, seconds once "
                        "cached on disk; then 2-4x faster: "
                        "for catalogs; needs a C++ compiler)")
    f.add_argument("--workers", type=int, default=1,
                   help="npe: local worker processes for the chunks (a Dask LocalCluster; default 1: this process)")
    f.add_argument("--scheduler", default=None,
                   help="npe: address of a Dask scheduler (e.g. tcp://host:8786) to send the chunks to")
    f.add_argument("--plots", type=int, default=0,
                   help="figures (SED fit, SFH, corner over the prior) for the first N galaxies, in OUT/plots")
    f.add_argument("--no-draws", action="store_true", help="write the summary table only, not the NetCDF draws")
    f.add_argument("--bands", default=None, help="catalog: comma-separated filters, e.g. sdss_u,sdss_g,...")
    f.add_argument("--flux-columns", default=None, help="catalog: comma-separated flux (or magnitude) columns")
    f.add_argument("--error-columns", default=None, help="catalog: comma-separated error columns")
    f.add_argument("--unit", default="nanomaggies", help="catalog: nanomaggies, microjansky or ab_mag")
    f.add_argument("--z-column", default=None, help="catalog: redshift column")
    f.add_argument("--id-column", default=None, help="catalog: galaxy name column")
    _ebv_arguments(f)
    f.set_defaults(func=_fit)
    c = sub.add_parser("compare", help="amortized (NPE) vs NUTS posterior of one galaxy: shifts, widths, "
                                       "classifier test, overlay plot")
    c.add_argument("input", help="a mock file, SDSS/DESI spectrum file or catalog (as for fit)")
    c.add_argument("--galaxy", type=int, default=0, help="row of the galaxy in the file (default 0)")
    c.add_argument("--model", choices=["phot", "specphot"], default="phot", help="zoo model (default phot)")
    c.add_argument("--posterior", default=None, help="a trained posterior (.safetensors); default: the shipped one")
    c.add_argument("--params", default="log_stellar_mass,log_ssfr_100myr,mass_weighted_age,tau_ism,tau_bc,dust_index",
                   help="comma-separated scalar sites to compare")
    c.add_argument("--npe-draws", type=int, default=4000, help="NPE draws (default 4000)")
    c.add_argument("--draws", type=int, default=500, help="NUTS draws per chain (default 500)")
    c.add_argument("--warmup", type=int, default=500, help="NUTS warmup per chain (default 500)")
    c.add_argument("--chains", type=int, default=2, help="NUTS chains (default 2)")
    c.add_argument("--max-tree-depth", type=int, default=8, help="NUTS maximum tree depth (default 8)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="compare", help="output folder (default compare)")
    for flag in ("--bands", "--flux-columns", "--error-columns", "--z-column", "--id-column"):
        c.add_argument(flag, default=None, help="catalog columns, as for fit")
    c.add_argument("--unit", default="nanomaggies", help="catalog: nanomaggies, microjansky or ab_mag")
    _ebv_arguments(c)
    c.set_defaults(func=_compare)
    i = sub.add_parser("info", help="the SSP grid and the filters available")
    i.set_defaults(func=_info)
    return p


def _ebv_arguments(p: argparse.ArgumentParser) -> None:
    """--ebv and --ebv-column: the Milky Way foreground extinction of the input."""
    p.add_argument("--ebv", default=None, metavar="E[,E,...]",
                   help="Milky Way E(B-V) in mag (e.g. from the SFD 1998 map): one value for every galaxy or one per "
                        "galaxy, comma-separated; data are corrected for it (CCM89 + O'Donnell 94, R_V 3.1). DESI "
                        "coadds are corrected with their FIBERMAP's EBV unless this is given; SDSS files carry none")
    p.add_argument("--ebv-column", default=None, help="catalog: column of Milky Way E(B-V) (mag) to correct for")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sedppl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
