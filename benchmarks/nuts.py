"""NUTS on the default spectrum + photometry model for one mock galaxy.

One mock from ``SpecPhotModel``'s prior at z = 0.1 (median S/N 3 per 0.8 A pixel,
S/N 30 photometry). Runs ``run_nuts`` (MAP start, Laplace-preconditioned dense
mass matrix, TorchScript potential) and reports wall time, bulk ESS (minimum
over every latent parameter), ESS per second and gradient evaluations. The
baseline measured in the same run is the cost of one gradient of the potential
without TorchScript (Pyro's default), so the report can say how much of the
time is gradients and what the settings bought.

    python benchmarks/nuts.py [--chains 4] [--draws 1000] [--warmup 1000] [--seed 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import arviz as az
import pyro
import torch
from pyro.ops.integrator import potential_grad

import pyro.infer.mcmc.util as mcmc_util
from sedppl.infer.nuts import run_nuts
from sedppl.mocks import make_mocks
from sedppl.zoo import SpecPhotModel


def gradient_ms(model, obs, jit: bool, repeats: int = 20) -> float:
    params, potential_fn, _, _ = mcmc_util.initialize_model(model, model_kwargs={"obs": obs}, jit_compile=jit,
                                                           skip_jit_warnings=True)
    for _ in range(5):  # TorchScript's profiling executor optimises after a few calls
        potential_grad(potential_fn, params)
    t = time.perf_counter()
    for _ in range(repeats):
        potential_grad(potential_fn, params)
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    model = SpecPhotModel()
    mock = make_mocks(model, 1, seed=args.seed)
    g_plain, g_jit = gradient_ms(model, mock.obs, False), gradient_ms(model, mock.obs, True)
    print(f"gradient of the potential: {g_plain:.1f} ms (Pyro default), {g_jit:.1f} ms (TorchScript), "
          f"ratio {g_plain / g_jit:.2f}")
    pyro.set_rng_seed(args.seed)
    t = time.perf_counter()
    idata = run_nuts(model, obs=mock.obs, num_samples=args.draws, warmup_steps=args.warmup,
                     num_chains=args.chains, seed=args.seed, predictive=False, progress=False)
    wall = time.perf_counter() - t
    latents = [k for k in ("log_mass", "log_sfr_ratio", "zh_logit_now", "zh_logit_step", "tau_bc", "tau_ism",
                           "dust_index", "log_u", "sigma_v") if k in idata.posterior]
    summ = az.summary(idata, var_names=latents, kind="diagnostics")
    ss = idata.sample_stats
    n_grad = int(ss["n_steps"].sum())
    ess = float(summ["ess_bulk"].min())
    print(f"{args.chains} chains x ({args.warmup} warmup + {args.draws} draws): wall {wall:.0f} s "
          f"(goal 300 s: ratio {wall / 300:.2f})")
    print(f"bulk ESS min {ess:.0f} (goal 400), ESS/s {ess / wall:.2f}, R-hat max {summ['r_hat'].max():.3f}, "
          f"divergences {int(ss['diverging'].sum())}")
    print(f"gradient evaluations in sampling: {n_grad} ({n_grad / ss['n_steps'].size:.1f} per draw, "
          f"step size {float(ss['step_size'].mean()):.3f})")
    truth = {k: v.numpy().ravel() for k, v in mock.truth.items()}
    for k in ("log_stellar_mass", "sfr_100myr", "tau_bc", "tau_ism", "dust_index"):
        v = idata.posterior[k].values.reshape(-1)
        print(f"  {k}: truth {truth[k][0]:.3f}, posterior {v.mean():.3f} +- {v.std():.3f}")


if __name__ == "__main__":
    main()
