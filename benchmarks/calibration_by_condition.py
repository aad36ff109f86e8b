"""Where an amortized posterior's calibration fails: coverage binned by the conditions of the data.

A posterior card gives one calibration figure per parameter over its 1,000 held-out
simulations. When a parameter's SBC ranks fail (the DESI posterior's dust index:
too wide), the next question is where: at low S/N, where the data leave the
posterior at its prior; where the posterior is already wide or narrow; near the
prior's edges; or everywhere. This script draws the same held-out simulations as the card
(:func:`sedppl.infer.npe_calibration.calibrate`'s seed and noise), and for one
parameter prints, in equal-count bins of

* the median spectral S/N per pixel (or, without a spectrum, the photometric S/N),
* the posterior's width over the prior's (sd of the draws / sd of the truths,
  in the flow's unconstrained coordinates),
* the posterior median (unconstrained coordinates),
* with ``--by OTHER``, the posterior median of another parameter (e.g. ``--by tau_ism``:
  is the dust index too wide where the optical depth is near its prior's edge at 0?),

the coverage of the central 68% and 95% intervals (nominal 0.68 / 0.95; one bin of
n simulations has a binomial sd of sqrt(0.68 x 0.32 / n), 0.033 for n = 200), the
mean SBC rank (0.5 for no bias) and the sd of the ranks (uniform: 0.289; larger
means too narrow, smaller too wide). Then every parameter's overall central 68%
coverage and rank sd.

Every condition is a function of the data alone (through the posterior), so a
calibrated posterior holds its coverage in each bin. Binning by the true value
would not test that: given the truth, a calibrated posterior's ranks lean towards
the prior's centre (shrinkage), so extreme truths get mean ranks far from 0.5.

    python benchmarks/calibration_by_condition.py [--posterior specphot|phot] [--param dust_index]
        [--n-sims 1000] [--draws 200] [--bins 5] [--file FILE] [--seed 987654] [--by OTHER ...]

``--file`` measures a trained posterior file of the same model instead of the shipped
one (e.g. a candidate from ``sedppl train posterior --model specphot``). ``--seed`` draws
another held-out set than the card's (e.g. ``--n-sims 2000 --seed 123457``, the second set of
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _timing import start

from sedppl import zoo
from sedppl.diagnostics import central_interval_coverage
from sedppl.infer.npe import NeuralPosterior
from sedppl.infer.npe_calibration import _fresh_simulations
from sedppl.infer.npe_training import _rows
from sedppl.posteriors import SHIPPED, shipped_path

CARD_SEED = 987_654  # the held-out simulations of calibrate() and the cards


def _row(label: str, truth: np.ndarray, draws: np.ndarray) -> str:
    c68, c95 = central_interval_coverage(truth, draws, (0.68, 0.95))
    rank = (draws < truth[:, None]).mean(1)
    return (f"  {label:>17s}  n={len(truth):4d}  68%: {c68:.3f}  95%: {c95:.3f}  "
            f"rank mean {rank.mean():.3f} sd {rank.std():.3f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--posterior", choices=["specphot", "phot"], default="specphot")
    p.add_argument("--param", default="dust_index", help="a label of the posterior's space (default dust_index)")
    p.add_argument("--n-sims", type=int, default=1000)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--bins", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--file", default=None, help="a trained posterior of the same model (default: the shipped one)")
    p.add_argument("--seed", type=int, default=CARD_SEED,
                   help=f"seed of the held-out simulations (default {CARD_SEED}: the card's)")
    p.add_argument("--by", nargs="*", default=[],
                   help="further conditions: the posterior medians of these parameters (labels of the posterior's space)")
    a = p.parse_args(argv)
    start(a.threads)
    t0 = time.perf_counter()
    model = getattr(zoo, SHIPPED[a.posterior][0])()
    post = NeuralPosterior.load(a.file or shipped_path(a.posterior), model)  # one load, shipped or not
    labels = post.space.labels()
    for name in [a.param, *a.by]:
        if name not in labels:
            raise SystemExit(f"{name!r} is not one of {labels}")
    bank, x = _fresh_simulations(post, a.n_sims, a.seed, False)
    torch.manual_seed(a.seed)
    draws = []
    with torch.no_grad():
        for i in range(0, a.n_sims, 250):
            u, _ = post.draw(_rows(x, slice(i, i + 250)), a.draws, log_q=False, step=250)
            draws.append(u.transpose(0, 1))
    draws, truth = torch.cat(draws).numpy(), bank.theta.numpy()
    print(f"{a.file or a.posterior} posterior, {a.n_sims} held-out simulations (seed {a.seed}), {a.draws} draws each, "
          f"{time.perf_counter() - t0:.0f} s")
    j = labels.index(a.param)
    d, t = draws[:, :, j], truth[:, j]
    print(_row("all", t, d))
    if x.get("spectrum") is not None:
        snr = np.median((x["spectrum"] * x["spectrum_ivar"].sqrt()).numpy(), 1)
        snr_name = "median spectral S/N per pixel"
    else:
        snr = np.median((x["photometry"] * x["photometry_ivar"].sqrt()).numpy(), 1)
        snr_name = "median photometric S/N"
    conditions = {snr_name: snr, "posterior sd / prior sd": d.std(1) / t.std(),
                  "posterior median (unconstrained)": np.median(d, 1)}
    for other in a.by:
        conditions[f"{other}'s posterior median (unconstrained)"] = np.median(draws[:, :, labels.index(other)], 1)
    for name, v in conditions.items():
        print(f"{a.param} by {name}:")
        edges = np.quantile(v, np.linspace(0, 1, a.bins + 1))
        for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            m = (v >= lo) & ((v < hi) if k < a.bins - 1 else (v <= hi))
            print(_row(f"{lo:.3g} to {hi:.3g}", t[m], d[m]))
    print("every parameter:")
    for k, lab in enumerate(labels):
        print(_row(lab, truth[:, k], draws[:, :, k]))
    return {"labels": labels, "draws": draws, "truth": truth, "conditions": conditions}


if __name__ == "__main__":
    main()
