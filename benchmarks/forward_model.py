"""Speed and memory of the exact forward model against bagpipes, in the same run.

A batch of galaxies (7 continuity-prior bins ending at t_univ(z), random SFRs and
metallicities, Calzetti dust, nebular emission, 0.05 < z < 0.55) on DESI's grid
(3600-9824 A at 0.8 A) with g, r, z, W1, W2 photometry. sedppl models the whole
batch in one call; bagpipes' ``model_galaxy.update()`` models the same galaxies
one at a time (a subset: it is slow), with the same spectral grid and filters.

    python benchmarks/forward_model.py [--batch 1000] [--bagpipes 40]

Prints spectra per second for both, their ratio, and peak memory.
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

import numpy as np
import torch

from sedppl.surveys import DESI_BANDS, DESI_WAVE


def galaxies(n: int, cosmology, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.05, 0.55, n)
    t_univ = cosmology.age(torch.tensor(z, dtype=torch.float64)).numpy()
    edges = np.stack([np.concatenate([[0.0, 0.03], np.geomspace(0.1, 0.85 * t, 5), [t]]) for t in t_univ])
    sfr = 10 ** rng.uniform(-1, 1, (n, 7))
    mass = sfr * np.diff(edges, axis=1) * 1e9
    logz = rng.uniform(-1.0, 0.3, (n, 7))
    av = rng.uniform(0, 1.5, n)
    return z, edges, mass, logz, av


def time_sedppl(fm, gal, repeats: int = 3, grad: bool = False) -> float:
    z, edges, mass, logz, av = (torch.tensor(x, dtype=torch.float32) for x in gal)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if grad:
            m = mass.clone().requires_grad_()
            out = fm(m, edges, logz, z, av=av, log_u=-2.5)
            (out.spectrum.sum() + out.photometry.sum()).backward()
        else:
            with torch.no_grad():
                fm(mass, edges, logz, z, av=av, log_u=-2.5)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_bagpipes(gal, n: int, k5500: float) -> float:
    import bagpipes as pipes
    import speclite.filters

    from sedppl.photometry import ALIASES

    tmp = tempfile.mkdtemp()
    filt_list = []
    for b in DESI_BANDS:
        f = speclite.filters.load_filter(ALIASES[b])
        path = os.path.join(tmp, b + ".txt")
        np.savetxt(path, np.column_stack([f.wavelength, f.response]))
        filt_list.append(path)
    z, edges, mass, logz, av = gal

    def components(i):
        e = edges[i] * 1e9
        ages, vals = [], []
        for a, b, m in zip(e[:-1], e[1:], mass[i]):
            ages += [a * (1 + 1e-6), b * (1 - 1e-6)]
            vals += [m / (b - a)] * 2
        return {"redshift": float(z[i]), "t_bc": 0.01,
                "custom": {"history": np.column_stack([ages, vals]), "massformed": np.log10(mass[i].sum()),
                           "metallicity": float(10 ** np.mean(logz[i]))},
                "dust": {"type": "Calzetti", "Av": float(av[i] * 4.05 / k5500)}, "nebular": {"logU": -2.5}}

    model = pipes.model_galaxy(components(0), filt_list=filt_list, spec_wavs=DESI_WAVE)
    t0 = time.perf_counter()
    for i in range(n):
        model.update(components(i))
    return (time.perf_counter() - t0) / n


def fresh_load_seconds() -> float:
    code = ("import time; t = time.perf_counter(); from sedppl.sps.grid import load_bc03_miles; "
            "load_bc03_miles(); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--bagpipes", type=int, default=40, help="galaxies to time with bagpipes (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from sedppl import dust
    from sedppl.forward import ForwardModel

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; date {time.strftime('%Y-%m-%d')}")
    print(f"fresh-process load of the cached BC03+MILES grid: {fresh_load_seconds():.2f} s")
    rates = {}
    for label, rank in (("exact", None), ("rank-256 SSPs", 256)):
        t0 = time.perf_counter()
        fm = ForwardModel(wave_obs=DESI_WAVE, bands=DESI_BANDS, z_range=(0.01, 0.6), nebular=True, ssp_rank=rank)
        print(f"[{label}] ForwardModel construction (rebinning, nebular grids, filters): "
              f"{time.perf_counter() - t0:.1f} s")
        gal = galaxies(args.batch, fm.cosmology)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t_batch = time_sedppl(fm, gal)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t_grad = time_sedppl(fm, gal, grad=True)
        rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        one = tuple(x[:1] for x in gal)
        t_one = time_sedppl(fm, one, repeats=10)
        rates[label] = (args.batch / t_batch, t_one)
        print(f"[{label}] batch {args.batch}: {t_batch:.3f} s -> {args.batch / t_batch:,.0f} spectra/s "
              f"(spectrum {len(DESI_WAVE)} px + {len(DESI_BANDS)} bands); with gradients: "
              f"{args.batch / t_grad:,.0f} spectra/s; one galaxy: {1e3 * t_one:.1f} ms")
        print(f"[{label}] peak RSS: {rss0:.0f} MiB before the batch, {rss1:.0f} MiB after it, "
              f"{rss2:.0f} MiB after the gradient pass")
        print(f"[{label}] goal 10,000 spectra/s: ratio {args.batch / t_batch / 1e4:.3f}")
        del fm
    if args.bagpipes:
        k5500 = dust.calzetti_k(torch.tensor(5500.0)).item()
        t_bp = time_bagpipes(gal, args.bagpipes, k5500)
        print(f"bagpipes model_galaxy.update(), {args.bagpipes} galaxies: {1e3 * t_bp:.1f} ms each -> "
              f"{1 / t_bp:,.0f} spectra/s")
        for label, (rate, t_one) in rates.items():
            print(f"[{label}] sedppl / bagpipes rate: {rate * t_bp:.1f}x (goal 100x); "
                  f"one galaxy: {t_bp / t_one:.2f}x")


if __name__ == "__main__":
    main()
