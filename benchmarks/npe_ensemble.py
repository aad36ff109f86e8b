"""Does an ensemble of small-budget posteriors calibrate better than its members?

Trains ``--members`` posteriors of the SDSS ugriz ``PhotometryModel`` on a small
budget each (``--n-sims`` simulations, ``--epochs`` epochs, 3 transforms of 64 x 64:
minutes each, deliberately short of the shipped posterior's 100,000 x 70), then
calibrates every member and their equal-weight mixture on the same
``--n-calibration`` held-out simulations (``calibrate``: HPD expected coverage and
TARP at levels 0.05-0.95, SBC chi-square p-values). Baseline in the same run: the
members themselves. Also reports the draw time of 1,000 draws for a batch of 100.

    python benchmarks/npe_ensemble.py [--members 3] [--n-sims 20000] [--epochs 15] [--out /tmp/npe_ens]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _timing import start

from sedppl.infer.ensemble import PosteriorEnsemble
from sedppl.infer.npe_calibration import calibrate
from sedppl.infer.npe_training import train_npe
from sedppl.mocks import make_mocks
from sedppl.zoo import PhotometryModel


def summary(cal: dict) -> str:
    levels = np.asarray(cal["levels"])
    hpd = np.asarray(cal["expected_coverage"]) - levels
    tarp = np.asarray(cal["tarp"]) - levels
    return (f"max coverage error {cal['max_coverage_error']:.3f} (HPD {np.abs(hpd).max():.3f}, "
            f"TARP {np.abs(tarp).max():.3f}); HPD coverage at 0.68/0.95 "
            f"{np.interp(0.68, levels, cal['expected_coverage']):.3f}/{cal['expected_coverage'][-1]:.3f}; "
            f"min SBC p {cal['min_sbc_pvalue']:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--n-sims", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--n-calibration", type=int, default=1000)
    ap.add_argument("--out", default="/tmp/npe_ensemble")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    start(args.threads)
    model = PhotometryModel()
    members = []
    for k in range(args.members):
        t = time.perf_counter()
        post = train_npe(model, f"{args.out}/member{k}", n_sims=args.n_sims, n_valid=max(500, args.n_sims // 20),
                         seed=100 + 1000 * k, max_epochs=args.epochs, patience=args.epochs, transforms=3,
                         hidden=(64, 64), context=32, progress=False)
        print(f"member {k}: trained in {time.perf_counter() - t:.0f} s ({post.card.epochs} epochs, validation "
              f"loss {post.card.valid_loss:.3f})")
        members.append(post)
    ens = PosteriorEnsemble(members)
    for k, m in enumerate(members):
        t = time.perf_counter()
        print(f"member {k}: {summary(calibrate(m, n_sims=args.n_calibration))} ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    print(f"ensemble of {args.members}: {summary(calibrate(ens, n_sims=args.n_calibration))} "
          f"({time.perf_counter() - t:.0f} s)")
    mock = make_mocks(model, 100, seed=12, redshift=0.1, snr_photometry=30)
    for name, p in (("member 0", members[0]), (f"ensemble of {args.members}", ens)):
        p.sample(mock.obs, 1000, derived=False)
        t = time.perf_counter()
        p.sample(mock.obs, 1000, derived=False)
        print(f"{name}: 1,000 draws with log q, batch of 100: {(time.perf_counter() - t) * 10:.1f} ms a galaxy")


if __name__ == "__main__":
    main()
