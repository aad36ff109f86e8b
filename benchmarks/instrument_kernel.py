"""The instrumental-resolution kernel of the DESI-like model: the current one against its first form.

``SpecPhotModel`` broadens each galaxy's observed spectrum by the instrument's
sigma less the templates' own (which moves with the redshift), so it builds a
band matrix per galaxy (``sedppl.instrument.gaussian_band``, DESI's 7,781 pixels)
on every evaluation, and looks the templates' resolution up at the rest-frame
wavelengths (``sedppl.resample.interp1d``). Baseline, in the same run: the
first form of both, kept below (two erf per pixel and diagonal, a cut by
pixel centres, masks multiplied in; a binary search on the rest-frame grid).
Times (medians of 7 after a warm-up, float32):

* the kernel alone for 1 and 100 galaxies, and its largest difference from the baseline;
* the whole ``SpecPhotModel`` physics (exact synthesis) for 1 and 100 galaxies, with and
  without a backward pass, with the baseline swapped in.

    python benchmarks/instrument_kernel.py [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import repeat_times, start
from emulated_sps import _inputs, _physics

import sedppl.forward as forward
import sedppl.instrument as instrument
from sedppl.zoo import SpecPhotModel


def baseline_band(wave, sigma, half_width, n_sigma=5.0):
    """The first ``gaussian_band``: pixels kept by their centres' distance."""
    m = wave.shape[-1]
    edges = torch.cat([wave[:1] - 0.5 * (wave[1] - wave[0]), 0.5 * (wave[1:] + wave[:-1]),
                       wave[-1:] + 0.5 * (wave[-1] - wave[-2])])
    offs = torch.arange(-half_width, half_width + 1)
    idx = (torch.arange(m)[None, :] + offs[:, None]).clamp(0, m - 1)
    lo = edges[idx] - wave[None, :]
    hi = edges[idx + 1] - wave[None, :]
    s = sigma[..., None, :].clamp(min=1e-12) * math.sqrt(2.0)
    w = 0.5 * (torch.erf(hi / s) - torch.erf(lo / s))
    valid = ((torch.arange(m)[None, :] + offs[:, None]) >= 0) & ((torch.arange(m)[None, :] + offs[:, None]) < m)
    near = ((wave[idx] - wave[None, :]).abs() <= n_sigma * sigma[..., None, :]) | (offs[:, None] == 0)
    w = w * valid * near
    return w / w.sum(-2, keepdim=True)


def baseline_interp(x, xp, fp, log_step=None):
    """The first ``interp1d``: a binary search whatever the grid."""
    j = (torch.searchsorted(xp, x.detach().contiguous(), right=True) - 1).clamp(0, xp.numel() - 2)
    u = ((x - xp[j]) / (xp[j + 1] - xp[j])).clamp(0.0, 1.0)
    return fp[j] + u * (fp[j + 1] - fp[j])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    start(args.threads)
    current = (instrument.gaussian_band, forward.interp1d)
    baseline = (baseline_band, baseline_interp)
    wave = torch.linspace(3600.0, 9824.0, 7781)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 100):
        sigma = 0.3 + 0.7 * torch.rand(n, 7781, generator=gen)
        t = [np.median(repeat_times(lambda f=f: f(wave, sigma, 4), 7)) * 1e3 for f in (baseline_band, current[0])]
        diff = float((baseline_band(wave, sigma, 4) - current[0](wave, sigma, 4)).abs().max())
        print(f"kernel, {n:3d} galaxies: baseline {t[0]:7.2f} ms, current {t[1]:7.2f} ms, ratio {t[0] / t[1]:5.2f}; "
              f"largest weight difference {diff:.1e}")
    model = SpecPhotModel()
    for n in (1, 100):
        tr, *_ = _inputs(model, n, seed=11)
        for grad in (False, True):
            t = []
            for band, interp in (baseline, current):
                instrument.gaussian_band, forward.interp1d = band, interp
                fn = _physics(model, tr, n, grad)
                t.append(np.median(repeat_times(fn, 7)) * 1e3)
            instrument.gaussian_band, forward.interp1d = current
            label = "physics" + (" + gradient" if grad else "")
            print(f"SpecPhotModel {label:18s} {n:3d} galaxies: baseline {t[0]:8.2f} ms, current {t[1]:8.2f} ms, "
                  f"ratio {t[0] / t[1]:5.2f}")


if __name__ == "__main__":
    main()
