"""The amortized posterior against the exact posterior of the same galaxies, by importance sampling.

MCMC on the zoo models has not converged within hours (benchmarks/RESULTS.md), so
this script builds the reference another way: for each of ``--mocks`` ugriz mocks
(S/N 30 per band, z = 0.1) it draws ``--draws`` parameters from a defensive
version of the shipped posterior itself (the flow with a base that is half
N(0, 1), half N(0, 1.5^2): the same bijection, wider tails) and weights them by
p(theta, x) / q(theta | x), the model's exact log joint (prior and likelihood,
exact synthesis) over the proposal density. The weighted draws are the exact
posterior up to Monte Carlo error, which the weights' effective sample size
states (a reference counts only with ESS >= ``--min-ess``). The amortized
posterior is represented by the draws that came from its own base (exactly q),
so both sides share draws (paired; less noise).

Reported per mock and parameter (log stellar mass, log SFR over 100 Myr,
tau_bc, tau_ism, dust index): the shift of the amortized mean in reference
standard deviations and the ratio of widths, against the issue's goals
(|shift| < 0.3, width ratio 0.8-1.25). Then times
:func:`sedppl.infer.importance.importance_sample` (the user-facing form) on one
galaxy and on all of them.

    python benchmarks/npe_vs_importance.py [--mocks 20] [--draws 20000] [--seed 12] [--sfr-floor 1e-6]
                                            [--posterior FILE]

``--posterior`` measures a trained ugriz posterior file instead of the shipped one
(e.g. a candidate from ``sedppl train posterior --model phot``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _timing import start

from sedppl.infer.importance import defensive_draws, importance_sample, log_joint
from sedppl.infer.npe import NeuralPosterior
from sedppl.mocks import galaxy, make_mocks
from sedppl.posteriors import load_shipped

PARAMS = ["log_stellar_mass", "log_sfr_100myr", "tau_bc", "tau_ism", "dust_index"]
#: Floor of the SFR (Msun/yr) before its log10, here and in npe_vs_hmc.py (before 2026-12-06: 1e-30, which
#: lets the lower tail of a galaxy whose recent SFR is free dominate the standard deviation of log SFR).
SFR_FLOOR = 1e-6


def weighted(f: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    m = float((w * f).sum())
    return m, float(np.sqrt((w * (f - m) ** 2).sum()))


def reference_moments(post: NeuralPosterior, obs, draws: int, sfr_floor: float = SFR_FLOOR) -> tuple[dict, dict, float]:
    """Importance-sampling reference of one galaxy: ({param: (mean, sd)} of the exact
    posterior, the same of the amortized posterior from the paired draws, the weights' ESS);
    log SFR of the SFR (Msun/yr) floored at ``sfr_floor``."""
    model = post.model
    own = np.arange(draws) < draws - round(0.5 * draws)  # drawn from the flow's own base
    x = post.inputs(obs, warn=False)
    u, log_prop = defensive_draws(post, x, draws, defensive=0.5, wide=1.5)
    values, logdet = post.space.to_constrained(u)
    logw = (log_joint(model, values, obs) - (log_prop - logdet).double())[:, 0]
    w = torch.softmax(logw, 0).numpy()
    p = post.package(obs, x, u, None, derived=True).posterior
    ref, npe = {}, {}
    for name in PARAMS:
        f = (np.log10(np.maximum(p["sfr_100myr"].values[0, :, 0], sfr_floor)) if name == "log_sfr_100myr"
             else p[name].values[0, :, 0]).astype(np.float64)
        ref[name] = weighted(f, w)
        npe[name] = (float(f[own].mean()), float(f[own].std()))
    return ref, npe, float(1 / (w**2).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mocks", type=int, default=20)
    ap.add_argument("--draws", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--min-ess", type=float, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sfr-floor", type=float, default=SFR_FLOOR,
                    help="floor of the SFR (Msun/yr) before its log10 (before 2026-12-06: 1e-30)")
    ap.add_argument("--posterior", default=None, help="a trained ugriz posterior (default: the shipped one)")
    args = ap.parse_args()
    start(args.threads)
    post = load_shipped("phot")
    if args.posterior:
        post = NeuralPosterior.load(args.posterior, post.model)
    model = post.model
    mocks = make_mocks(model, args.mocks, seed=args.seed, redshift=0.1, snr_photometry=30)
    torch.manual_seed(args.seed)
    shifts, widths, ess_all = [], [], []
    t0 = time.perf_counter()
    for i in range(args.mocks):
        ref, npe, ess = reference_moments(post, galaxy(mocks, i).obs, args.draws, args.sfr_floor)
        row_s = [(npe[name][0] - ref[name][0]) / ref[name][1] for name in PARAMS]
        row_w = [npe[name][1] / ref[name][1] for name in PARAMS]
        shifts.append(row_s)
        widths.append(row_w)
        ess_all.append(ess)
        print(f"mock {i:2d}: IS ESS {ess:7.0f} of {args.draws}; shift " + " ".join(f"{v:+.2f}" for v in row_s)
              + "; width ratio " + " ".join(f"{v:.2f}" for v in row_w), flush=True)
    shifts, widths, ess_all = np.array(shifts), np.array(widths), np.array(ess_all)
    ok = ess_all >= args.min_ess
    print(f"{time.perf_counter() - t0:.0f} s; {ok.sum()} of {args.mocks} mocks with IS ESS >= {args.min_ess:.0f} "
          f"(ESS median {np.median(ess_all):.0f}, min {ess_all.min():.0f})")
    for j, name in enumerate(PARAMS if ok.any() else []):  # nothing to compare without a usable reference
        s, r = shifts[ok, j], widths[ok, j]
        good = (np.abs(s) < 0.3) & (r > 0.8) & (r < 1.25)
        print(f"  {name:17s} |shift| median {np.median(np.abs(s)):.2f}, max {np.abs(s).max():.2f}; width ratio "
              f"median {np.median(r):.2f} ({r.min():.2f}-{r.max():.2f}); both goals met for {good.sum()} of {ok.sum()}")
    # the user-facing function on the same galaxies: PSIS weights, 1,000 resampled draws with derived quantities
    for label, obs, n in (("1 galaxy", galaxy(mocks, 0).obs, 1), (f"{args.mocks} galaxies", mocks.obs, args.mocks)):
        t = time.perf_counter()
        idata = importance_sample(post, obs, num_samples=args.draws, seed=0, warn=False)
        dt = time.perf_counter() - t
        k, ess = idata.sample_stats["pareto_k"].values[0, 0], idata.sample_stats["importance_ess"].values[0, 0]
        print(f"importance_sample, {label}, {args.draws} draws each: {dt:.2f} s ({dt / n:.2f} s a galaxy); "
              f"Pareto k-hat {k.min():.2f}-{k.max():.2f}, ESS {ess.min():.0f}-{ess.max():.0f}")


if __name__ == "__main__":
    main()
