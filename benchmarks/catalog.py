"""A catalog of simulated galaxies through ``sedppl fit --method npe``: wall time, peak memory, and the
share of the time spent outside the flow.

Galaxies: ``--n`` mocks (default 10,000) from the photometry-only zoo model's prior at z = 0.1,
S/N 30 per band, written to a mock FITS file by ``sedppl simulate``. Then, in the same run:

* ``sedppl fit MOCKS --method npe --model phot --draws 1000 --chunk 1000`` (shipped posterior;
  figures off; posterior-predictive photometry for 100 draws a galaxy, the default), as a
  subprocess: its wall time and peak resident memory;
* with ``--no-draws-run``, also the same command with ``--no-draws`` (summary table only);
* the baseline: the flow alone (``NeuralPosterior.sample(..., derived=False)``: inputs,
  context and 1,000 draws per galaxy) over the same galaxies in chunks of 1,000, in this process.

The share outside the flow is 1 - flow / fit: reading, the derived quantities (masses only,
sedppl.derived), the posterior-predictive photometry (100 forward simulations a galaxy),
summary percentiles and writing.

    python benchmarks/catalog.py [--n 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS of the child in GiB) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if r.returncode not in (0, 3):  # 3: some galaxies flagged (ood / poor_fit), the fit itself completed
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}")
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the largest child so far
    return wall, max(peak, before) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-draws-run", action="store_true", help="also time a run with --no-draws")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mocks = tmp / "mocks.fits"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sedppl.cli", "simulate", "--model", "phot", "--n", str(args.n),
                        "--z", "0.1", "--snr-photometry", "30", "--seed", "1", "--out", str(mocks)],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        t_sim = time.perf_counter() - t
        fit = [sys.executable, "-m", "sedppl.cli", "fit", str(mocks), "--method", "npe", "--model", "phot",
               "--draws", "1000", "--chunk", "1000"]
        wall, peak = run(fit + ["--out", str(tmp / "fit")])
        wall_nd = run(fit + ["--out", str(tmp / "fit_nodraws"), "--no-draws"])[0] if args.no_draws_run else None
        size = sum(p.stat().st_size for p in (tmp / "fit").rglob("*") if p.is_file()) / 2**30

        from sedppl.fitting import subset
        from sedppl.mocks import read_mocks
        from sedppl.posteriors import load_shipped

        obs = read_mocks(mocks).obs
        post = load_shipped("phot")
        post.sample(subset(obs, slice(0, 100)), 1000, derived=False, check=False)  # warm-up
        t = time.perf_counter()
        for i in range(0, args.n, 1000):
            post.sample(subset(obs, slice(i, min(args.n, i + 1000))), 1000, derived=False, seed=i, check=False)
        flow = time.perf_counter() - t
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.threads} threads")
    print(f"{args.n} galaxies (simulated in {t_sim:.1f} s), 1,000 draws each")
    print(f"sedppl fit --method npe:            {wall:8.1f} s  ({1e3 * wall / args.n:.2f} ms/galaxy), "
          f"peak RSS {peak:.2f} GiB, outputs {size:.2f} GiB")
    if wall_nd is not None:
        print(f"sedppl fit --method npe --no-draws: {wall_nd:8.1f} s  ({1e3 * wall_nd / args.n:.2f} ms/galaxy), "
              f"ratio to the flow {wall_nd / flow:.2f}, share outside the flow {1 - flow / wall_nd:.0%}")
    print(f"baseline, flow alone (in process):  {flow:8.1f} s  ({1e3 * flow / args.n:.2f} ms/galaxy)")
    print(f"ratio fit / flow: {wall / flow:.2f}; share outside the flow: {1 - flow / wall:.0%}")


if __name__ == "__main__":
    main()
