"""The emulated SPS against the exact synthesis, same histories, same grid, same run.

Times (1) the synthesis alone (young + older stars' light, masses) and (2) the whole
``PhotometryModel`` physics (synthesis, dust, nebular emission, redshift, ugriz
fluxes), each for batches of 1 and 1,000 galaxies drawn from the model's prior,
with and without a backward pass; prints the ratio exact / emulated. Then the
accuracy of the emulated model's band fluxes on the same draws.

    python benchmarks/emulated_sps.py [--batch 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch
from pyro import poutine

sys.path.insert(0, os.path.dirname(__file__))
from _timing import repeat_times  # noqa: E402

from sedppl.zoo import PhotometryModel  # noqa: E402


def _inputs(model, n, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(n_galaxies=n)
    edges = tr.nodes["sfh_edges"]["value"]
    mass = tr.nodes["sfh_sfr"]["value"] * torch.diff(edges, dim=-1) * 1e9
    return tr, mass, edges, tr.nodes["zh_log_z"]["value"]


def _physics(model, tr, n, grad):
    """The model replayed on fixed latents (the physics, likelihood-free); optionally backward."""
    nodes = {k: v for k, v in tr.nodes.items() if v["type"] == "sample" and not v["is_observed"]}
    latents = {k: v["value"].clone().requires_grad_(grad and v["value"].is_floating_point())
               for k, v in nodes.items()}

    def run():
        out = poutine.condition(model, data=latents)(n_galaxies=n)
        if grad:
            g = torch.autograd.grad(out.photometry.log().sum(), [v for v in latents.values() if v.requires_grad])
            return g
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    exact, emulated = PhotometryModel(), PhotometryModel(sps="emulated")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# rest-frame grid: {len(exact.forward_model.phot.wave)} pixels")
    print(f"{'what':38s} {'batch':>6s} {'exact ms':>10s} {'emulated ms':>12s} {'ratio':>7s}")
    for n in (1, args.batch):
        tr, mass, edges, logz = _inputs(exact, n, seed=11)
        t_univ = edges[..., -1]
        for grad in (False, True):
            rows = []
            for model in (exact, emulated):
                synth = model.forward_model.phot.stars
                if grad:
                    def fn(synth=synth):
                        m = mass.clone().requires_grad_(True)
                        pop = synth(m, edges, logz, t_univ)
                        return torch.autograd.grad((pop.young + pop.old).log().sum(), m)
                else:
                    def fn(synth=synth):
                        with torch.no_grad():
                            return synth(mass, edges, logz, t_univ)
                rows.append(np.median(repeat_times(fn, args.repeats)) * 1e3)
            label = "synthesis" + (" + gradient" if grad else "")
            print(f"{label:38s} {n:6d} {rows[0]:10.2f} {rows[1]:12.2f} {rows[0] / rows[1]:7.2f}")
            rows = []
            for model in (exact, emulated):
                fn = _physics(model, tr, n, grad)
                if not grad:
                    inner = fn

                    def fn(inner=inner):
                        with torch.no_grad():
                            return inner()
                rows.append(np.median(repeat_times(fn, args.repeats)) * 1e3)
            label = "PhotometryModel physics" + (" + gradient" if grad else "")
            print(f"{label:38s} {n:6d} {rows[0]:10.2f} {rows[1]:12.2f} {rows[0] / rows[1]:7.2f}")
    tr, *_ = _inputs(exact, args.batch, seed=12)
    with torch.no_grad():
        f_ex = poutine.replay(exact, trace=tr)(n_galaxies=args.batch).photometry
        f_em = poutine.replay(emulated, trace=tr)(n_galaxies=args.batch).photometry
    dmag = (2.5 * torch.log10(f_em / f_ex)).abs().numpy()
    print(f"ugriz |delta mag|, emulated vs exact, {args.batch} prior draws: median {np.median(dmag):.2e}, "
          f"99th percentile {np.percentile(dmag, 99):.2e}, max {dmag.max():.2e} "
          f"(per band medians: {', '.join(f'{v:.1e}' for v in np.median(dmag, 0))})")


if __name__ == "__main__":
    main()
