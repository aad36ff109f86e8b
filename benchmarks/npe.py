"""Amortized posterior (NPE) time per galaxy against NUTS on the same galaxies, same run.

Shipped photometry-only posterior (``PhotometryModel``, SDSS ugriz, z given), or with
``--model specphot`` the shipped DESI spectrum + photometry posterior (``SpecPhotModel``).
Galaxies: mocks from the model's prior at z = 0.1, S/N 30 per band (and S/N 3 per
spectral pixel). Reported:

* NPE, 1,000 draws for 1 galaxy and for a batch of 100 (per galaxy), the flow
  alone without and with its log densities (``log_q``), and with the derived
  quantities (stellar mass, SFRs, ages: one forward simulation per draw);
  medians of 5 repeats after a warm-up call;
* the flow alone (context -> draws with log densities, 10 galaxies a call),
  without the inputs' preparation and the InferenceData;
* ``sample`` again with zuko's own spline transform and autoregressive
  inverse (the baseline of :mod:`sedppl.infer.splines` and
  :mod:`sedppl.infer.autoregressive`);
* the flow alone for one galaxy with the spline inverse straight from its
  parameters (the default) against a spline transform per group, interleaved;
* with ``--compile``: ``sample`` and the encoder with the flow (inputs -> draws, log q) through
  ``NeuralPosterior.compile()``, against the eager figures of the same run;
* NUTS (``run_nuts``: MAP start, Laplace-preconditioned dense mass, TorchScript)
  on the first galaxy, one chain of ``--nuts-warmup`` + ``--nuts-draws``; its wall
  time and bulk ESS, and the ratio of NUTS wall time to NPE's for 1,000 draws.

    python benchmarks/npe.py [--model phot|specphot] [--threads 2] [--nuts-warmup 100] [--nuts-draws 100]
                             [--no-nuts] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import time
import warnings

import arviz as az
import numpy as np
import torch
import zuko
from zuko.flows.autoregressive import MaskedAutoregressiveTransform

from _timing import repeat_times

from sedppl.infer.nuts import run_nuts
from sedppl.mocks import galaxy, make_mocks
from sedppl.posteriors import load_shipped


def timed(fn, repeats: int = 5) -> float:
    return float(np.median(repeat_times(fn, repeats)))


def first_rows(x: dict, n: int) -> dict:
    """The first n galaxies of network inputs (``NeuralPosterior.inputs``)."""
    return {k: None if v is None else v[:n] for k, v in x.items()}


def compiled_rows(post, one, mock, rows) -> None:
    """``sample`` (no derived quantities) and the encoder with the flow (network inputs -> draws with log q,
    what ``post.compile()`` compiles) against the eager figures of the same run; the compile time of each
    new shape is printed as it happens."""
    eager_flow = {}
    with torch.no_grad():
        for label, obs, n in (("1 galaxy", one.obs, 1), ("batch of 100", mock.obs, 100)):
            x = first_rows(post.inputs(obs), min(n, 10))
            eager_flow[label] = timed(lambda: post._context_draws(x, 1000, True)) / min(n, 10)
    post.compile()
    for label, obs, n in (("1 galaxy", one.obs, 1), ("batch of 100", mock.obs, 100)):
        t0 = time.perf_counter()
        post.sample(obs, 1000, derived=False, seed=0)
        print(f"compile ({label}, first call): {time.perf_counter() - t0:.1f} s")
        # milliseconds a call: 40 repeats for one galaxy (the machine's load varies call to call), 5 for 100
        ts = np.array(repeat_times(lambda: post.sample(obs, 1000, derived=False, seed=0), 40 if n == 1 else 5)) / n
        t = float(np.median(ts))
        t_eager = next(r[2] for r in rows if r[0] == label and not r[1])
        with torch.no_grad():
            x = first_rows(post.inputs(obs), min(n, 10))
            flow = timed(lambda: post._compiled(x, 1000, True), 40 if n == 1 else 5) / min(n, 10)
        q1, q3 = np.quantile(ts, [0.25, 0.75]) * 1e3
        print(f"NPE {label:13s} 1000 draws, derived no , compiled: {t * 1e3:8.1f} ms per galaxy "
              f"(IQR {q1:.1f}-{q3:.1f}; {t_eager / t:.2f}x the eager rows above); encoder and flow {flow * 1e3:.1f} ms "
              f"(eager, same run: {eager_flow[label] * 1e3:.1f} ms, {eager_flow[label] / flow:.2f}x)")
        if n == 1:  # where one galaxy's time goes: the call's three stages, 40 repeats each
            x = post.inputs(obs)
            u, lq = post.draw(x, 1000)
            parts = {"inputs (checked)": lambda: post.inputs(obs), "draws": lambda: post.draw(x, 1000),
                     "InferenceData": lambda: post.package(obs, x, u, lq, derived=False)}
            print("NPE 1 galaxy      compiled, stages: " + ", ".join(
                f"{k} {timed(f, 40) * 1e3:.2f} ms" for k, f in parts.items()))
    post.compile(False)


def fused_spline_row(post, one, rounds: int = 60) -> None:
    """The flow alone for one galaxy (1,000 draws with log q) with the spline inverse computed straight from
    its parameters (``RationalQuadraticSpline.inverse_from_parameters``, the default) against building a
    spline transform per group (the path before it), interleaved call by call so that both see the same
    machine load; the median of the paired ratios."""
    with torch.no_grad():
        ctx = post.context(post.inputs(one.obs))
        post._flow_draws(ctx, 1000, True)  # builds the cached plans
        plans = [m._groupwise_plan[1] for m in post.flow.modules() if hasattr(m, "_groupwise_plan")]
        fused = [p.inverse for p in plans]
        times = {"fused": [], "objects": []}
        for _ in range(rounds):
            for key, inverses in (("objects", [None] * len(plans)), ("fused", fused)):
                for p, inv in zip(plans, inverses):
                    p.inverse = inv
                t0 = time.perf_counter()
                post._flow_draws(ctx, 1000, True)
                times[key].append(time.perf_counter() - t0)
    a, b = (np.array(times[k]) * 1e3 for k in ("objects", "fused"))
    print(f"NPE 1 galaxy      1000 draws, the flow alone, fused spline inverse: {np.median(b):.1f} ms (min "
          f"{b.min():.1f}); spline objects, interleaved: {np.median(a):.1f} ms (min {a.min():.1f}); paired ratio "
          f"median {np.median(a / b):.2f}x ({rounds} rounds)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["phot", "specphot"], default="phot",
                    help="the shipped posterior: SDSS ugriz photometry, or DESI spectrum + photometry")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nuts-warmup", type=int, default=100)
    ap.add_argument("--nuts-draws", type=int, default=100)
    ap.add_argument("--no-nuts", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also time NeuralPosterior.compile() (TorchInductor) against the eager draws above")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    post = load_shipped(args.model)
    print(f"posterior: {args.model} ({post.card.model}, {post.space.dim} parameters)")
    model = post.model
    mock = make_mocks(model, 100, seed=12, redshift=0.1, snr_photometry=30)
    one = galaxy(mock, 0)
    rows = []
    for label, obs, n in (("1 galaxy", one.obs, 1), ("batch of 100", mock.obs, 100)):
        t = timed(lambda: post.sample(obs, 1000, derived=False, seed=0, log_q=False), repeats=5 if n == 1 else 3)
        print(f"NPE {label:13s} 1000 draws, derived no , no log_q: {t / n * 1e3:8.1f} ms per galaxy")
        for derived in (False, True):
            t = timed(lambda: post.sample(obs, 1000, derived=derived, seed=0), repeats=5 if n == 1 else 3)
            rows.append((label, derived, t / n))
            print(f"NPE {label:13s} 1000 draws, derived {'yes' if derived else 'no ':3s}: "
                  f"{t / n * 1e3:8.1f} ms per galaxy")
    # the flow alone: context -> 1,000 draws with log densities (no inputs, no InferenceData)
    for label, obs, n in (("1 galaxy", one.obs, 1), ("batch of 100", mock.obs, 100)):
        with torch.no_grad():
            ctx = post.context(post.inputs(obs))
            t = timed(lambda: [post.flow(ctx[i:i + 10]).rsample_and_log_prob((1000,)) for i in range(0, n, 10)],
                      repeats=5 if n == 1 else 3)
        print(f"NPE {label:13s} 1000 draws, the flow alone (context -> draws, log q): {t / n * 1e3:8.1f} ms per galaxy")
    # baseline in the same run: the same weights with zuko's own spline and autoregressive inverse
    baseline = copy.deepcopy(post)
    for m in baseline.flow.modules():
        if isinstance(m, MaskedAutoregressiveTransform):
            m.__class__ = MaskedAutoregressiveTransform
            m.univariate = functools.partial(zuko.transforms.MonotonicRQSTransform, **m.univariate.keywords)
    for label, obs, n in (("1 galaxy", one.obs, 1), ("batch of 100", mock.obs, 100)):
        t_zuko = timed(lambda: baseline.sample(obs, 1000, derived=False, seed=0), repeats=5 if n == 1 else 3) / n
        t_fast = next(r[2] for r in rows if r[0] == label and not r[1])
        print(f"NPE {label:13s} 1000 draws, derived no , zuko's flow (baseline): {t_zuko * 1e3:8.1f} ms per "
              f"galaxy; sedppl's spline and inverse {t_zuko / t_fast:.2f}x faster")
    fused_spline_row(post, one)
    if args.compile:
        compiled_rows(post, one, mock, rows)
    if args.no_nuts:
        return
    t = time.perf_counter()
    idata = run_nuts(model, obs=one.obs, num_samples=args.nuts_draws, warmup_steps=args.nuts_warmup, num_chains=1,
                     progress=False, num_prior=10, seed=0)
    t_nuts = time.perf_counter() - t
    ess = float(az.ess(idata, var_names=post.space.names).to_array().min())
    t_npe = rows[1][2]
    print(f"NUTS 1 chain x ({args.nuts_warmup} warm-up + {args.nuts_draws} draws): {t_nuts:.1f} s, bulk ESS min "
          f"{ess:.0f}; ratio NUTS / NPE (1 galaxy, 1000 draws with derived): {t_nuts / t_npe:.0f}x")
    for name in ("log_mass", "tau_ism"):
        a = idata.posterior[name].values.ravel()
        b = post.sample(one.obs, 4000, derived=False, seed=1).posterior[name].values.ravel()
        print(f"  {name}: NUTS {a.mean():.3f} +- {a.std():.3f}, NPE {b.mean():.3f} +- {b.std():.3f}, "
              f"truth {float(one.truth[name][0]):.3f}")


if __name__ == "__main__":
    main()
