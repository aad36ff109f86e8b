"""What the cached per-bin spectra save a sampler: the potential gradient with and without them.

Batched HMC, L-BFGS and importance sampling evaluate the same galaxies again and
again, so each galaxy meets the same SFH bin edges every call. The stellar
synthesis (``sedppl.sps.synthesis.StellarSynthesis``) then keeps per-bin spectra
for those edges and sums 49 of them per galaxy instead of 1,547 SSPs. This script
times one gradient of the batched potential (``sedppl.infer.potential.BatchedPotential``)
of ``--n`` mocks x ``--chains`` chains of a zoo model. The baseline is the same
gradient with the cache off (``bin_cache_size = 0``), timed in the same process,
the two alternating. It also prints the largest difference between the two
potentials and gradients.

    python benchmarks/bin_spectra_cache.py [--model specphot] [--n 20] [--chains 4] [--dtype float64]
                                           [--rounds 4] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _timing import repeat_times, start
from sedppl.infer.potential import BatchedPotential, physics_dtype
from sedppl.mocks import make_mocks
from sedppl.zoo import PhotometryModel, SpecPhotModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["specphot", "phot"], default="specphot")
    ap.add_argument("--n", type=int, default=20, help="mock galaxies (z = 0.1)")
    ap.add_argument("--chains", type=int, default=4, help="targets per galaxy")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--rounds", type=int, default=4, help="alternations of cache off / on")
    ap.add_argument("--repeats", type=int, default=3, help="timed gradients per round")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    start(a.threads)
    dtype = getattr(torch, a.dtype)
    model = SpecPhotModel() if a.model == "specphot" else PhotometryModel()
    mock = make_mocks(model, a.n, seed=11, redshift=0.1)
    obs = mock.obs.tile(a.chains)
    stars = [b.stars for b in (model.forward_model.spec, model.forward_model.phot) if b is not None]
    with physics_dtype(model, dtype):
        pot = BatchedPotential(model, kwargs={"obs": obs}, dtype=dtype)
        u = pot.flatten({k: mock.truth[k].repeat(a.chains, *[1] * (mock.truth[k].dim() - 1)) for k in pot.names})
        u = u + 0.01 * torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
        times: dict[int, list[float]] = {0: [], 64: []}
        results = {}
        for _ in range(a.rounds):
            for size in (0, 64):
                for s in stars:
                    s.bin_cache_size = size
                    s._bin_cache.clear()
                    s._edges_seen.clear()
                times[size] += repeat_times(lambda: pot.value_and_grad(u), a.repeats)
                results[size] = pot.value_and_grad(u)
    off, on = statistics.median(times[0]), statistics.median(times[64])
    b = a.n * a.chains
    print(f"{a.model}, {b} targets ({a.n} mocks x {a.chains}), {a.dtype}, {a.rounds} x {a.repeats} gradients each way")
    print(f"potential gradient, cache off (baseline): median {off * 1e3:.1f} ms ({off / b * 1e3:.2f} ms a target); "
          f"range {min(times[0]) * 1e3:.1f}-{max(times[0]) * 1e3:.1f}")
    print(f"potential gradient, cache on: median {on * 1e3:.1f} ms ({on / b * 1e3:.2f} ms a target); "
          f"range {min(times[64]) * 1e3:.1f}-{max(times[64]) * 1e3:.1f}")
    print(f"ratio off / on: {off / on:.2f}")
    (v0, g0), (v1, g1) = results[0], results[64]
    print(f"largest |U_on - U_off| {float((v1 - v0).abs().max()):.3g} (|U| up to {float(v0.abs().max()):.3g}); "
          f"largest |grad difference| / largest |grad| {float((g1 - g0).abs().max() / g0.abs().max()):.3g}")


if __name__ == "__main__":
    main()
