"""Amortized posterior vs MCMC on the same mock galaxies, and what batched HMC costs.

Draws ``--n`` mocks from a zoo model's prior (z = 0.1), samples every one of them
with batched HMC (``sedppl.infer.hmc.run_hmc``: all chains of all galaxies in one
computation; ``--neutra`` runs the chains in the shipped flow's coordinates),
then compares the shipped amortized posterior with the MCMC posterior galaxy by
galaxy (``sedppl.diagnostics.compare_posteriors``): mean shift in MCMC standard
deviations and width ratio, for log stellar mass, log SFR (100 Myr) and the
dust parameters (issue goal: |shift| < 0.3, width 0.8-1.25), and the coverage
of the true values by the MCMC intervals.

The baseline measured in the same run is the cost of one gradient of the
potential for a single galaxy (what Pyro's NUTS pays per leapfrog step) against
the cost per galaxy inside the batch.

    python benchmarks/npe_vs_hmc.py [--model phot] [--n 20] [--chains 2] [--warmup 300] [--draws 300]
                                    [--neutra] [--sampler hmc|smc] [--max-steps 32] [--seed 11] [--threads 2]
                                    [--dtype float64] [--laplace-mass] [--checkpoint F] [--save F.nc]

With ``--sampler smc`` the reference is tempered SMC (:mod:`sedppl.infer.smc`):
``--chains`` independent runs of ``--draws`` particles per galaxy (no warmup).
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch

from sedppl.diagnostics import compare_posteriors
from sedppl.infer.hmc import run_hmc
from sedppl.infer.potential import BatchedPotential, physics_dtype
from sedppl.infer.smc import run_smc
from sedppl.mocks import galaxy, make_mocks
from sedppl.posteriors import load_shipped

from npe_vs_importance import PARAMS, SFR_FLOOR, reference_moments  # the script beside this one


def gradient_seconds(model, obs, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    with physics_dtype(model, dtype):
        pot = BatchedPotential(model, kwargs={"obs": obs}, dtype=dtype)
        u = pot.prior_draw()
        pot.value_and_grad(u)
        t = time.perf_counter()
        for _ in range(repeats):
            pot.value_and_grad(u)
    return (time.perf_counter() - t) / repeats


def draws(idata, g: int, sfr_floor: float = SFR_FLOOR) -> dict[str, np.ndarray]:
    """{parameter: draws (L,)} of galaxy g, with log10 of the SFR (Msun/yr) floored at ``sfr_floor``.

    The floor sets how far the lower tail of log SFR reaches for a galaxy whose recent
    SFR the data leave free, and with it that parameter's standard deviation: two
    posteriors are compared with the same floor."""
    post = idata.posterior
    out = {}
    for p in PARAMS:
        v = post["sfr_100myr"] if p == "log_sfr_100myr" else post[p]
        v = v.values[:, :, g].reshape(-1)
        out[p] = np.log10(np.clip(v, sfr_floor, None)) if p == "log_sfr_100myr" else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="phot")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--neutra", action="store_true")
    ap.add_argument("--sampler", choices=["hmc", "smc"], default="hmc",
                    help="reference sampler: batched HMC, or tempered SMC (--chains runs x --draws particles)")
    ap.add_argument("--max-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--snr", type=float, default=20.0, help="S/N per band (and per spectral pixel / 7)")
    ap.add_argument("--save", default=None, help="write the MCMC InferenceData to this netCDF file")
    ap.add_argument("--importance", type=int, default=0,
                    help="also build the importance-sampling reference with this many draws a galaxy "
                         "(npe_vs_importance.py) and compare the MCMC and the amortized posterior with it")
    ap.add_argument("--progress", action="store_true", help="show the sampler's progress bar")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="precision of the physics during HMC (float64 for spectra: docs/inference.md)")
    ap.add_argument("--laplace-mass", action="store_true",
                    help="with --neutra: start the mass matrices at each mode's Laplace covariance in the flow's "
                         "coordinates (run_hmc's laplace_mass)")
    ap.add_argument("--checkpoint", default=None,
                    help="HMC: save the sampler's state to this file as it runs and continue from it if it exists "
                         "(the wall time printed is then this process's only)")
    ap.add_argument("--load", default=None,
                    help="read the MCMC InferenceData of an earlier run (--save) instead of sampling; pass "
                         "that run's --model, --n, --seed and --snr so that the mocks are the same")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    post = load_shipped(args.model)
    model = post.model
    mock = make_mocks(model, args.n, seed=args.seed, redshift=0.1, snr_photometry=args.snr,
                      snr_spectrum=args.snr / 7)
    import arviz as az

    if args.load:
        idata, wall = az.from_netcdf(args.load), float("nan")
        if idata.posterior.sizes["galaxy"] != args.n:
            raise SystemExit(f"{args.load} holds {idata.posterior.sizes['galaxy']} galaxies, not --n {args.n}")
        print(f"MCMC read from {args.load} (wall time and settings as in the run that wrote it)")
    else:
        one = gradient_seconds(model, _first(mock.obs), dtype=getattr(torch, args.dtype))
        many = gradient_seconds(model, mock.obs.tile(args.chains), dtype=getattr(torch, args.dtype))
        b = args.n * args.chains
        print(f"gradient of the potential: 1 galaxy {one * 1e3:.1f} ms; {b} targets in one batch "
              f"{many * 1e3:.1f} ms = {many / b * 1e3:.2f} ms a target (batching gain {one * b / many:.1f}x)")
        t = time.perf_counter()
        if args.sampler == "smc":
            idata = run_smc(model, obs=mock.obs, num_particles=args.draws, num_runs=args.chains, seed=args.seed,
                            max_steps=args.max_steps, progress=args.progress)
        else:
            idata = run_hmc(model, obs=mock.obs, num_samples=args.draws, warmup_steps=args.warmup,
                            num_chains=args.chains, seed=args.seed, posterior=post if args.neutra else None,
                            max_steps=args.max_steps, progress=args.progress, dtype=getattr(torch, args.dtype),
                            laplace_mass=args.laplace_mass, checkpoint=args.checkpoint)
        wall = time.perf_counter() - t
        if args.save:  # before any comparison, so that a failure there loses no draws
            idata.to_netcdf(args.save)
    ss = idata.sample_stats
    n_grad = int(ss["n_steps"].sum())
    summ = az.summary(idata, var_names=list(post.space.names) + ["log_stellar_mass"], kind="diagnostics")
    if args.sampler == "smc":
        log_z = idata.smc.log_evidence.values
        print(f"SMC: {args.n} galaxies x {args.chains} runs x {args.draws} particles: wall {wall:.0f} s, "
              f"{int(ss['n_steps'].max())} gradients a particle, tempering steps "
              f"{int(idata.smc.stages.min())}-{int(idata.smc.stages.max())}; log Z spread between runs "
              f"(median, max) {np.median(log_z.std(0, ddof=1)):.2f}, {log_z.std(0, ddof=1).max():.2f} nats")
    else:
        print(f"HMC ({'flow coordinates' if args.neutra else 'unconstrained, Laplace start'}): {args.n} galaxies x "
              f"{args.chains} chains x ({args.warmup} + {args.draws}): wall {wall:.0f} s, "
              f"{n_grad / ss['n_steps'].size:.1f} gradients a draw (sampling), step size median "
              f"{float(ss['step_size'].median()):.3f}, "
              f"divergences {int(ss['diverging'].sum())}")
    print(f"  R-hat max {summ['r_hat'].max():.3f}; bulk ESS min {summ['ess_bulk'].min():.0f}, median "
          f"{summ['ess_bulk'].median():.0f}; bulk ESS per second per galaxy (median) "
          f"{summ['ess_bulk'].median() / wall:.3f} (all galaxies together: {summ['ess_bulk'].median() * args.n / wall:.2f})")
    rhat_gal = np.array([float(az.rhat(idata.isel(galaxy=g), var_names=list(post.space.names)).to_array().max())
                         for g in range(args.n)])
    t = time.perf_counter()
    amort = post.sample(mock.obs, num_samples=4000, seed=args.seed)
    print(f"amortized posterior: 4,000 draws + derived for {args.n} galaxies in {time.perf_counter() - t:.1f} s")
    shifts, widths, inside68, inside95 = [], [], [], []
    for g in range(args.n):
        ref, amo = draws(idata, g), draws(amort, g)
        cmp = compare_posteriors(amo, ref, seed=g)
        shifts.append([cmp["shift"][p] for p in PARAMS])
        widths.append([cmp["width_ratio"][p] for p in PARAMS])
        truth = {p: float(np.log10(max(mock.truth["sfr_100myr"][g], SFR_FLOOR)) if p == "log_sfr_100myr"
                          else mock.truth[p][g]) for p in PARAMS}
        inside68.append([abs(np.mean(ref[p] <= truth[p]) - 0.5) < 0.34 for p in PARAMS])
        inside95.append([abs(np.mean(ref[p] <= truth[p]) - 0.5) < 0.475 for p in PARAMS])
    shifts, widths = np.array(shifts), np.array(widths)
    good = rhat_gal <= 1.01
    print(f"galaxies with R-hat <= 1.01: {good.sum()} of {args.n}")
    print(f"{'parameter':18s} {'|shift|<0.3':>12s} {'width 0.8-1.25':>15s} {'median |shift|':>15s} "
          f"{'median width':>13s} {'truth in 68%':>13s} {'in 95%':>7s}")
    for j, p in enumerate(PARAMS):
        ok_s = np.abs(shifts[:, j]) < 0.3
        ok_w = (widths[:, j] > 0.8) & (widths[:, j] < 1.25)
        print(f"{p:18s} {ok_s.sum():>6d} of {args.n:<3d} {ok_w.sum():>9d} of {args.n:<3d} "
              f"{np.median(np.abs(shifts[:, j])):>15.2f} {np.median(widths[:, j]):>13.2f} "
              f"{np.mean(np.array(inside68)[:, j]):>13.2f} {np.mean(np.array(inside95)[:, j]):>7.2f}")
    if args.importance:
        against_importance(post, mock, idata, amort, good, args)


def against_importance(post, mock, idata, amort, converged: np.ndarray, args) -> None:
    """The MCMC and the amortized posterior against the importance-sampling reference, galaxy by galaxy."""
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    rows = []  # per galaxy and parameter: (MCMC shift, MCMC width ratio, NPE shift, NPE width ratio), IS sd units
    ess = []
    for g in range(args.n):  # log SFR floored at SFR_FLOOR on all three sides, as in the tables above
        ref, _, e = reference_moments(post, galaxy(mock, g).obs, args.importance)
        mc, am = draws(idata, g), draws(amort, g)
        rows.append([[(x[p].mean() - ref[p][0]) / ref[p][1] if k == 0 else x[p].std() / ref[p][1]
                      for x in (mc, am) for k in (0, 1)] for p in PARAMS])
        ess.append(e)
    rows, ess = np.array(rows), np.array(ess)
    usable = ess >= 200
    use = converged & usable
    print(f"importance-sampling reference ({args.importance} draws a galaxy): {time.perf_counter() - t:.0f} s, "
          f"ESS median {np.median(ess):.0f}, min {ess.min():.0f}; {usable.sum()} galaxies with ESS >= 200, "
          f"{use.sum()} of them with MCMC R-hat <= 1.01")
    print(f"{'parameter':18s} {'MCMC vs IS, R-hat<=1.01':>24s} {'MCMC vs IS, all':>17s}   "
          f"{'|shift|<0.3 and width 0.8-1.25: NPE vs IS':>42s} {'NPE vs MCMC, R-hat<=1.01':>25s}")
    mc_s, mc_w, am_s, am_w = (rows[..., k] for k in range(4))

    def span(s, w):
        return f"{np.abs(s).max():.2f} {w.min():.2f}-{w.max():.2f}" if len(s) else "-"

    for j, p in enumerate(PARAMS):
        good = (np.abs(am_s[:, j]) < 0.3) & (am_w[:, j] > 0.8) & (am_w[:, j] < 1.25)
        r = am_w[:, j] / mc_w[:, j]
        vs_mc = (np.abs((am_s[:, j] - mc_s[:, j]) / mc_w[:, j]) < 0.3) & (r > 0.8) & (r < 1.25)
        print(f"{p:18s} {span(mc_s[use, j], mc_w[use, j]):>24s} {span(mc_s[usable, j], mc_w[usable, j]):>17s}   "
              f"{good[usable].sum():>33d} of {usable.sum():<5d} {vs_mc[use].sum():>18d} of {use.sum()}")
    print("(MCMC vs IS: largest |shift| of the MCMC mean in IS standard deviations, range of the MCMC/IS width ratio)")


def _first(obs):
    from sedppl.mocks import Mock, galaxy

    return galaxy(Mock(obs, {}, None, None), 0).obs


if __name__ == "__main__":
    main()
