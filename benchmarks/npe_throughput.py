"""Catalog throughput of the amortized posterior: N galaxies x 1,000 draws, in memory.

Issue goal: 100,000 galaxies x 1,000 draws in <= 20 minutes on this 2-core CPU.
The shipped SDSS ugriz posterior draws for mocks from ``PhotometryModel``'s prior
(z 0.01-0.2, S/N 30 per band) in chunks of 100 galaxies; each chunk's draws are
reduced to the summary a catalog keeps (16/50/84th percentiles of every latent
parameter and, with ``--derived``, of the derived quantities) and dropped, so
memory stays flat. Baseline in the same run: the same chunks with zuko's own
spline and autoregressive inverse on the first ``--baseline`` galaxies. No file
input/output (``benchmarks/catalog.py`` measures the whole ``sedppl fit``).

    python benchmarks/npe_throughput.py [--galaxies 100000] [--derived] [--baseline 1000] [--compile]
                                        [--eager-galaxies N]

With ``--compile --eager-galaxies 1000``, the eager run (the compiled run's baseline) covers only
the first 1,000 galaxies, so that a 100,000-galaxy compiled run fits a session.
"""

from __future__ import annotations

import argparse
import copy
import functools
import resource
import time

import numpy as np
import torch
import zuko
from zuko.flows.autoregressive import MaskedAutoregressiveTransform

from _timing import start

from sedppl.data import Observation
from sedppl.mocks import make_mocks
from sedppl.posteriors import load_shipped


def chunk(obs: Observation, i: int, j: int) -> Observation:
    """Galaxies i..j-1 of a photometric batch."""
    return Observation(redshift=obs.redshift[i:j], bands=obs.bands, band_flux=obs.band_flux[i:j],
                       band_ivar=obs.band_ivar[i:j])


def run(post, obs: Observation, n: int, derived: bool, step: int = 100) -> tuple[float, np.ndarray]:
    """Seconds to draw 1,000 times for each of the first n galaxies and summarise; the summaries."""
    rows = []
    t = time.perf_counter()
    for i in range(0, n, step):
        idata = post.sample(chunk(obs, i, min(n, i + step)), 1000, derived=derived, log_q=False, check=False,
                            seed=i)
        p = idata.posterior
        q = [np.percentile(p[k].values[0].reshape(1000, p[k].shape[2], -1), (16, 50, 84), axis=0)
             for k in p.data_vars]
        rows.append(np.concatenate(q, axis=-1))  # (3, galaxies, columns)
    return time.perf_counter() - t, np.concatenate(rows, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--galaxies", type=int, default=100_000)
    ap.add_argument("--derived", action="store_true")
    ap.add_argument("--baseline", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="then the same galaxies through NeuralPosterior.compile() (TorchInductor), same run")
    ap.add_argument("--eager-galaxies", type=int, default=None,
                    help="galaxies of the eager run (default: all); with --compile, the compiled run's baseline")
    args = ap.parse_args()
    start(args.threads)
    post = load_shipped("phot")
    t = time.perf_counter()
    z = torch.empty(args.galaxies).uniform_(0.01, 0.2, generator=torch.Generator().manual_seed(0))
    mock = make_mocks(post.model, args.galaxies, seed=7, redshift=z, snr_photometry=30)
    print(f"{args.galaxies} mocks simulated in {time.perf_counter() - t:.1f} s")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_eager = min(args.eager_galaxies or args.galaxies, args.galaxies)
    seconds, table = run(post, mock.obs, n_eager, args.derived)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    per = seconds / n_eager
    print(f"sedppl, eager: {n_eager} galaxies x 1000 draws{' + derived' if args.derived else ''}: {seconds:.1f} s "
          f"({per * 1e3:.2f} ms a galaxy; 100,000 galaxies at this rate: {per * 1e5 / 60:.1f} min); "
          f"peak RSS {rss:.2f} GiB (after the mocks: {rss0:.2f} GiB); summary table {table.shape}")
    med = table[1]
    print(f"  finite summaries: {np.isfinite(table).all()}; median of the per-galaxy medians, first column: "
          f"{np.median(med[:, 0]):.3f} (truth median {float(mock.truth['log_mass'][:n_eager].median()):.3f})")
    baseline = copy.deepcopy(post)
    for m in baseline.flow.modules():
        if isinstance(m, MaskedAutoregressiveTransform):
            m.__class__ = MaskedAutoregressiveTransform
            m.univariate = functools.partial(zuko.transforms.MonotonicRQSTransform, **m.univariate.keywords)
    n = min(args.baseline, args.galaxies)
    t_fast, _ = run(post, mock.obs, n, args.derived)
    t_zuko, _ = run(baseline, mock.obs, n, args.derived)
    print(f"same run, first {n} galaxies: sedppl {t_fast / n * 1e3:.2f} ms a galaxy, zuko's spline and inverse "
          f"{t_zuko / n * 1e3:.2f} ms a galaxy ({t_zuko / t_fast:.2f}x)")
    if args.compile:  # the same galaxies again through post.compile(); its first call compiles
        post.compile()
        t = time.perf_counter()
        run(post, mock.obs, 100, args.derived)
        t_first = time.perf_counter() - t
        t_comp, table_c = run(post, mock.obs, args.galaxies, args.derived)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        per_c = t_comp / args.galaxies
        print(f"compiled (post.compile()): first chunk of 100 with the compile {t_first:.1f} s; then {args.galaxies} "
              f"galaxies {t_comp:.1f} s ({per_c * 1e3:.2f} ms a galaxy, {t_fast / n / per_c:.2f}x the eager "
              f"rerun on the first {n} galaxies per galaxy; peak RSS {rss:.2f} GiB; "
              f"this run with the compile: {(t_comp + t_first) / 60:.1f} min; "
              f"100,000 galaxies at this rate, with the compile: {(per_c * 1e5 + t_first) / 60:.1f} min); "
              f"summaries finite: {np.isfinite(table_c).all()}")


if __name__ == "__main__":
    main()
