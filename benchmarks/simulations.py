"""Prior-predictive simulations of the DESI-like zoo model, and the velocity broadening inside them.

The spectrum + photometry zoo model (``SpecPhotModel``: DESI 3600-9824 A at 0.8 A,
R = 3000, z 0.002-1.1, sigma_v ~ U(30, 400) km/s) is run forward from its prior in
batches (the amortized posterior's training simulations). In the same run, the
velocity broadening alone, for the same batch of dispersions:

* FFT convolution on the rest-frame ln(lambda) grid (``broaden_velocity``, what the model does);
* the baseline: a per-galaxy band matrix of pixel-integrated Gaussians on the observed
  grid (``lsf_band`` + ``apply_band``, what the model did before), whose half-width
  reaches ~80 pixels at 400 km/s.

    python benchmarks/simulations.py [--batch 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import pyro
import torch

from _timing import repeat_times

from sedppl.instrument import apply_band, broaden_velocity, lsf_band, velocity_sigma
from sedppl.zoo import SpecPhotModel


def best_of(fn, repeats: int = 3) -> float:
    return min(repeat_times(fn, repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = SpecPhotModel()
    n = args.batch
    pyro.set_rng_seed(0)
    with torch.no_grad():
        t_sim = best_of(lambda: model(n_galaxies=n))
    gen = torch.Generator().manual_seed(0)
    sigma = 30 + 370 * torch.rand(n, generator=gen)
    branch = model.forward_model.spec
    rest = torch.rand(n, branch.wave.shape[0], generator=gen)
    wave_obs = model.forward_model.wave_obs
    obs = torch.rand(n, wave_obs.shape[0], generator=gen)
    with torch.no_grad():
        t_fft = best_of(lambda: broaden_velocity(rest, branch.dlnlam, sigma))
        t_band = best_of(lambda: apply_band(obs, lsf_band(wave_obs, velocity_sigma(wave_obs, sigma))), repeats=1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.threads} threads")
    print(f"SpecPhotModel prior simulations, batch {n}: {t_sim:.2f} s -> {n / t_sim:,.0f} simulations/s "
          f"({1e3 * t_sim / n:.2f} ms each)")
    print(f"velocity broadening of {n} spectra: FFT on the rest grid ({branch.wave.shape[0]} px) "
          f"{1e3 * t_fft:.0f} ms; band matrix on the observed grid ({wave_obs.shape[0]} px) {1e3 * t_band:.0f} ms; "
          f"ratio band / FFT {t_band / t_fft:.1f}")
    print(f"sigma_v range {float(sigma.min()):.0f}-{float(sigma.max()):.0f} km/s; "
          f"median {float(np.median(sigma.numpy())):.0f}")


if __name__ == "__main__":
    main()
