"""Batched HMC on a heavy-tailed prior: Student-t sites in their prior-quantile coordinates vs the identity.

The model is ``tests/models.py::ratio_model`` (also the CI test's): per galaxy three log
SFR ratios with the continuity prior StudentT(2, 0, 0.3), of which the data (sd 0.1)
constrain the first; the other two keep their prior, as the ratios of SFH bins that a
spectrum leaves empty. Every galaxy is sampled by one chain of batched HMC
(``sedppl.infer.hmc.sample_hmc``) in the default coordinates (``student_t_quantiles=True``:
w = Phi^-1(F_t(x)), the prior N(0, 1)) and, as the baseline in the same run, in the
identity coordinates Pyro's NUTS uses. Reported per coordinate system: the worst and
median bulk ESS of the free ratios over the galaxies, the pooled fractions of
|ratio| / 0.3 beyond the Student-t's two-sided 50/80/95/99% quantiles (exact: 0.5, 0.2,
0.05, 0.01), divergences, gradients a draw and wall time; and the ratio of worst ESS.

    python benchmarks/hmc_heavy_tails.py [--n 40] [--warmup 300] [--draws 500] [--threads 2]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import arviz as az
import numpy as np
import torch
from pyro import poutine

from sedppl.data import Observation
from sedppl.infer.hmc import sample_hmc
from sedppl.infer.potential import BatchedPotential, UnconstrainedCoordinates

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.models import ratio_model  # noqa: E402

QUANTILES = ((0.8165, 0.5), (1.8856, 0.2), (4.3027, 0.05), (9.9248, 0.01))  # |t_2| beyond c with probability p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    y = 0.3 * torch.randn(args.n, 1, generator=torch.Generator().manual_seed(0))
    obs = Observation(bands=["b0"], band_flux=y, band_ivar=torch.full((args.n, 1), 100.0))
    trace = poutine.trace(ratio_model).get_trace(obs=obs)
    worst = {}
    for quantiles in (True, False):
        coords = UnconstrainedCoordinates(trace, torch.float64, student_t_quantiles=quantiles)
        pot = BatchedPotential(ratio_model, kwargs={"obs": obs}, coordinates=coords)
        start = pot.flatten({"log_sfr_ratio": torch.cat([y, torch.zeros(args.n, 2)], 1).double()})
        t0 = time.perf_counter()
        res = sample_hmc(pot, start, args.warmup, args.draws, generator=torch.Generator().manual_seed(1),
                         progress=False)
        wall = time.perf_counter() - t0
        r = pot.constrain(res["u"].reshape(-1, pot.dim))[0]["log_sfr_ratio"].reshape(args.draws, args.n, 3)
        free = r[..., 1:].numpy()
        ess = np.array([float(az.ess(free[:, i, j][None])) for i in range(args.n) for j in range(2)])
        worst[quantiles] = ess.min()
        tails = " / ".join(f"{float((np.abs(free) / 0.3 > c).mean()):.3f}" for c, _ in QUANTILES)
        label = "quantile coordinates (default)" if quantiles else "identity (NUTS's; baseline)"
        print(f"{label:32s}: bulk ESS of the free ratios worst {ess.min():.0f}, median {np.median(ess):.0f} "
              f"of {args.draws}; tail fractions {tails} (exact 0.5 / 0.2 / 0.05 / 0.01); "
              f"divergences {int(res['diverging'].sum())}; gradients a draw {float(res['n_steps'].double().mean()):.2f}; "
              f"{wall:.1f} s")
    print(f"worst-galaxy ESS ratio, quantile / identity: {worst[True] / worst[False]:.1f}x")


if __name__ == "__main__":
    main()
