"""Simulation-based calibration of batched HMC on a small model, and what it costs.

Draws ``--n`` delayed-tau galaxies (``tests/models.py``: log mass formed uniform in
9.5-11.5, A_V uniform in 0-2 mag, z uniform in 0.05-0.2; ugriz with noise that does
not depend on the truth, r-band S/N ~1-90) from the model's prior, samples all of
them with batched HMC (``sedppl.infer.hmc.run_hmc``) and tests that the rank
fractions of the truths among each galaxy's own ESS-thinned draws are uniform
(``sedppl.diagnostics.sbc_rank_fractions``, chi-square with 20 bins), with the
central 68% / 95% coverage, divergences, R-hat and ESS. The CI test
(tests/infer/test_hmc.py::test_hmc_passes_simulation_based_calibration) is this at
100 galaxies and 2 x (150 + 200); this script is the larger, more powerful run.

The baseline measured in the same run is the gradient of one galaxy alone (what
Pyro's NUTS pays per leapfrog step) against the cost per galaxy inside the batch.

    python benchmarks/sbc_hmc.py [--n 200] [--chains 2] [--warmup 300] [--draws 500] [--max-steps 16]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time
import warnings

import arviz as az
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from _timing import repeat_times  # noqa: E402

from sedppl.data import Observation  # noqa: E402
from sedppl.diagnostics import (central_interval_coverage, coverage_tolerance, sbc_rank_fractions,  # noqa: E402
                                uniformity_pvalue)
from sedppl.infer.hmc import run_hmc  # noqa: E402
from sedppl.infer.potential import BatchedPotential  # noqa: E402
from sedppl.sps.grid import load_bc03_miles  # noqa: E402
from tests.models import DelayedTau, sbc_simulations  # noqa: E402


def _gradient_ms(model, obs: Observation, repeats: int = 10) -> float:
    pot = BatchedPotential(model, (), {"obs": obs})
    u = pot.prior_draw()
    return 1e3 * float(np.mean(repeat_times(lambda: pot.value_and_grad(u), repeats)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--max-steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    model = DelayedTau(load_bc03_miles(), log_mass_range=(9.5, 11.5))
    obs, truth = sbc_simulations(model, a.n, seed=a.seed)
    one = Observation(redshift=obs.redshift[:1], bands=obs.bands, band_flux=obs.band_flux[:1],
                      band_ivar=obs.band_ivar[:1])
    g1, gb = _gradient_ms(model, one), _gradient_ms(model, obs.tile(a.chains))
    targets = a.n * a.chains
    print(f"gradient: one galaxy {g1:.1f} ms; {targets} targets in one batch {gb:.1f} ms "
          f"({gb / targets:.2f} ms a target, {g1 * targets / gb:.1f}x)")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = run_hmc(model, obs=obs, num_samples=a.draws, warmup_steps=a.warmup, num_chains=a.chains,
                        seed=a.seed, map_restarts=1, map_steps=50, max_steps=a.max_steps, progress=True)
    wall = time.perf_counter() - t0
    stats = idata.sample_stats
    print(f"{a.n} galaxies x {a.chains} chains x ({a.warmup} + {a.draws}): {wall:.1f} s; "
          f"{float(stats['n_steps'].mean()):.1f} gradients a draw (mean over targets); "
          f"divergences {int(stats['diverging'].sum())} of {stats['diverging'].size}")
    for name in ("log_mass", "av", "log_stellar_mass"):
        draws = idata.posterior[name].values.transpose(2, 0, 1)
        ess = az.ess(idata, var_names=[name])[name].values
        rhat = az.rhat(idata, var_names=[name])[name].values
        t = truth[name].numpy()
        u = sbc_rank_fractions(t, draws, ess)
        cov = central_interval_coverage(t, draws.reshape(a.n, -1), (0.68, 0.95))
        hist = np.bincount(np.minimum((u * 10).astype(int), 9), minlength=10)
        print(f"{name}: SBC uniformity p = {uniformity_pvalue(u):.3f}; rank-fraction deciles {hist.tolist()}; "
              f"coverage 68% {cov[0]:.3f} (+-{coverage_tolerance(0.68, a.n):.3f} at 3 sd), "
              f"95% {cov[1]:.3f} (+-{coverage_tolerance(0.95, a.n):.3f}); R-hat median {np.median(rhat):.3f}, "
              f"max {rhat.max():.3f}, > 1.01 for {int((rhat > 1.01).sum())}; bulk ESS median "
              f"{np.median(ess):.0f}, min {ess.min():.0f}")


if __name__ == "__main__":
    main()
