"""The ``sedppl`` command line.

    sedppl demo [--out DIR] [--z Z] [--seed N]   model a DESI-like mock galaxy from built-in data
    sedppl simulate --model {specphot,phot} [--n N] [--z Z] [--snr S] [--seed N] [--out FILE]
                                                 mock observations from a zoo model's prior
    sedppl info                                  the SSP grid and filters sedppl can use

Exit codes: 0 success, 2 bad arguments or input (with a message naming the problem).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .surveys import DESI_BANDS, DESI_WAVE


def _demo(args: argparse.Namespace) -> int:
    import torch
    from astropy.table import Table

    from .forward import ForwardModel
    from .photometry import nanomaggies_to_ab
    from .plotting import plot_model

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("[sedppl] building the forward model (BC03+MILES, Cloudy nebular, DESI grid) ...", flush=True)
    fm = ForwardModel(wave_obs=DESI_WAVE, bands=DESI_BANDS, z_range=(0.01, 0.6), resolving_power=3000.0)
    z = torch.tensor(args.z)
    t_univ = fm.cosmology.age(z).item()
    # Leja et al. (2019) continuity-prior bins at this redshift: 0, 30 Myr, 100 Myr,
    # 4 log-spaced edges up to 0.85 t_univ, then t_univ (lookback, Gyr)
    edges = np.concatenate([[0.0, 0.03], np.geomspace(0.1, 0.85 * t_univ, 5), [t_univ]])
    # a galaxy whose star formation declined: SFR per bin (Msun/yr), youngest first
    sfr = np.array([0.8, 1.0, 1.5, 2.5, 4.0, 6.0, 5.0])
    mass = sfr * np.diff(edges) * 1e9
    logz = np.array([0.1, 0.1, 0.05, 0.0, -0.1, -0.2, -0.3])
    with torch.no_grad():
        res = fm(torch.tensor(mass, dtype=torch.float32), torch.tensor(edges, dtype=torch.float32),
                 torch.tensor(logz, dtype=torch.float32), z, av=0.4, dust_index=-0.3, av_bc=0.5,
                 log_u=-2.7, sigma_v=150.0)
    spec = res.spectrum.numpy()
    rng = np.random.default_rng(args.seed)
    sigma = 0.1 * np.median(spec) * np.ones_like(spec)  # S/N ~ 10 per pixel at the median flux
    noisy = spec + rng.normal(0, sigma)
    Table({"wavelength": DESI_WAVE, "flux": noisy, "ivar": 1 / sigma**2, "model": spec},
          meta={"comments": ["sedppl demo: wavelength vacuum Angstrom; flux, model 1e-17 erg/s/cm^2/A; "
                             f"z = {args.z}"]}).write(out / "demo_spectrum.ecsv", overwrite=True)
    phot = res.photometry.numpy()
    Table({"band": DESI_BANDS, "flux_nmgy": phot, "mag_ab": nanomaggies_to_ab(res.photometry).numpy()}
          ).write(out / "demo_photometry.ecsv", overwrite=True)
    plot_model(DESI_WAVE, noisy, spec, fm.photometry, phot, edges, sfr, out / "demo.png",
               title=f"sedppl demo: z = {args.z}, log M* = {np.log10(res.surviving_mass.item()):.2f}")
    print(f"[sedppl] mass formed log10 = {np.log10(res.mass_formed.item()):.3f}, "
          f"surviving (stars + remnants) log10 = {np.log10(res.surviving_mass.item()):.3f}")
    for b, f in zip(DESI_BANDS, phot):
        print(f"[sedppl] {b:8s} {f:10.3f} nmgy  ({22.5 - 2.5 * np.log10(f):.3f} AB)")
    print(f"[sedppl] wrote {out / 'demo_spectrum.ecsv'}, {out / 'demo_photometry.ecsv'}, {out / 'demo.png'} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .photometry import ALIASES, available_filters
    from .sps.grid import load_bc03_miles

    g = load_bc03_miles()
    print(f"SSP grid: {g.name}; {len(g.metallicities)} metallicities Z/Zsun = {[float(m) for m in g.metallicities]} "
          f"(Zsun = {g.zsun}); {len(g.ages)} ages 0-{g.ages[-1] / 1e9:.0f} Gyr; {len(g.wave)} wavelengths "
          f"{g.wave[0]:.1f} A - {g.wave[-1] / 1e4:.0f} um ({'air' if g.air else 'vacuum'})")
    print(f"filters: {', '.join(available_filters())}")
    print(f"aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from .mocks import make_mocks, write_mocks
    from .zoo import PhotometryModel, SpecPhotModel

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.snr <= 0 or args.snr_photometry <= 0:
        raise ValueError("signal-to-noise ratios must be > 0")
    model = SpecPhotModel() if args.model == "specphot" else PhotometryModel()
    lo, hi = model.forward_model.z_range
    if args.z is not None and not lo <= args.z <= hi:
        raise ValueError(f"--z {args.z} is outside the model's range {lo}-{hi}")
    t0 = time.time()
    mock = make_mocks(model, args.n, seed=args.seed, redshift=args.z, snr_spectrum=args.snr,
                      snr_photometry=args.snr_photometry)
    out = write_mocks(mock, args.out, model_name=args.model)
    print(f"wrote {args.n} mock galaxies ({args.model}, z = {'sampled' if args.z is None else args.z}) "
          f"to {out} in {time.time() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sedppl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="model a DESI-like mock galaxy (spectrum, photometry, plot)")
    d.add_argument("--out", default="out", help="output directory (default: out)")
    d.add_argument("--z", type=float, default=0.1, help="redshift, 0.01-0.6 (default 0.1)")
    d.add_argument("--seed", type=int, default=0, help="seed of the mock noise")
    d.set_defaults(func=_demo)
    s = sub.add_parser("simulate", help="mock observations drawn from a zoo model's prior, to a FITS file")
    s.add_argument("--model", choices=["specphot", "phot"], default="specphot",
                   help="specphot: DESI-like spectrum + grzW1W2; phot: SDSS ugriz (default specphot)")
    s.add_argument("--n", type=int, default=10, help="number of galaxies (default 10)")
    s.add_argument("--z", type=float, default=None,
                   help="redshift of all galaxies (then known to a fit); default: drawn from "
                        "the model's prior and left for the fit to infer")
    s.add_argument("--snr", type=float, default=3.0, help="median S/N per spectral pixel (default 3)")
    s.add_argument("--snr-photometry", type=float, default=30.0, help="S/N per band (default 30)")
    s.add_argument("--seed", type=int, default=0, help="seed of truths and noise")
    s.add_argument("--out", default="mocks.fits", help="output FITS file (default mocks.fits)")
    s.set_defaults(func=_simulate)
    i = sub.add_parser("info", help="the SSP grid and the filters available")
    i.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sedppl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
