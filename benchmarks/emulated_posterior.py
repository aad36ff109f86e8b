"""How far the emulated SPS moves a posterior: linear (Fisher) estimate, its check, sampler-based measures.

Issue 4 asks that posteriors with the emulator and with the exact synthesis agree
(means within 0.1 posterior standard deviations for every parameter). On the ugriz
model that is shown with paired importance weights (benchmarks/RESULTS.md). On the
DESI-like spectrum + photometry model NUTS does not converge in hours on two cores,
and the posterior's mode is no firm place to stand either (damped Newton iterations
with each galaxy's finite-difference Hessian stalled 0.3-1.5 sd short of it: the
synthesis interpolates linearly in log Z, so the density has kinks). So this script
measures the figure where a model is linear in its parameters near the truth and the
prior is Gaussian in NUTS's unconstrained coordinates u:

    posterior covariance   C = (J^T W J + P)^-1,
    shift of the mean      C J^T W delta,   in posterior sd: divided by sqrt(diag C),

with J = d(model mean)/du at the truth (central differences), W the inverse variance
of each pixel and band (the photometry's systematic floor included), P the inverse
variance of the prior in u (from prior draws), and delta = emulated - exact model
mean at the truth. It also prints ||W^1/2 delta||, the emulator's error in units of
the noise: it bounds the shift in the Fisher metric (no parameter can move further
than the error itself is detectable). Physics in float64.

With ``--linearity`` it checks the approximation itself: for every mock, 5 random
steps delta_u = s L z (L the Cholesky factor of C, z standard normal, s = 0.01,
0.1, 0.3 of the Fisher posterior's extent) and the part of the model mean's change
that J does not predict, ||W^1/2 (mu(u0 + delta_u) - mu(u0) - J delta_u)||, against
the part it does, ||W^1/2 J delta_u||.

With ``--npe-importance S`` it measures the shifts with a sampler instead, on
every mock: S draws per mock of the shipped amortized posterior with its
defensive base (:func:`sedppl.infer.importance.defensive_draws`) are weighted by
the exact and by the emulated log joint (the model's prior and likelihood) over
the proposal density, Pareto-smoothed; the same draws under both weights, so the
comparison is paired. Shifts of every latent coordinate and derived quantity
(stellar mass, SFRs, ages), in the exact weighted sd, with a standard error, the
Pareto k-hat and the effective sample size; mocks whose exact weights have k-hat
> 0.7 or ESS < 100 are counted apart (their estimate is not trusted).

With ``--hmc W N`` it samples the exact posterior of the mocks listed by
``--mocks`` with batched HMC (:func:`sedppl.infer.hmc.run_hmc`, float64,
``--chains`` chains, W warm-up and N kept iterations, started near the mode found
from the shipped amortized posterior's best draws) and reweights every draw by
exp(log L_emulated - log L_exact) (priors cancel): the weighted means are the
emulated posterior's means over the same draws, exact for any posterior shape as
long as the draws follow the exact posterior (the chains' R-hat says how far they
do). The spread of that log-likelihood difference over the draws is printed too:
to first order the shift of any quantity in its posterior sd is at most that sd.

    python benchmarks/emulated_posterior.py [--model specphot] [--n 40] [--snr 3] [--emulate spec]
    python benchmarks/emulated_posterior.py --hmc 150 150 --chains 2 --mocks 0 36 37
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from pyro import poutine

from sedppl.derived import derived_only
from sedppl.infer.importance import log_joint
from sedppl.infer.potential import UnconstrainedCoordinates, physics_dtype
from sedppl.mocks import make_mocks
from sedppl.noise import site_mean, site_scale
from sedppl.zoo import PhotometryModel, SpecPhotModel


def means(model, coords: UnconstrainedCoordinates, u: torch.Tensor, obs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model mean (B, M) of every observed pixel and band at u (B, D), their sigma (B, M), log10 M* (B,)."""
    values, _ = coords.constrain(u)
    tr = poutine.trace(poutine.condition(model, data=values)).get_trace(obs=obs)
    sites = [k for k in ("spectrum", "photometry") if k in tr.nodes]
    mu = torch.cat([site_mean(tr.nodes[k]).double() for k in sites], -1)
    sigma = torch.cat([site_scale(tr.nodes[k]).double().expand(mu.shape[0], -1) for k in sites], -1)
    return mu, sigma, tr.nodes["log_stellar_mass"]["value"].double()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["specphot", "phot"], default="specphot")
    p.add_argument("--n", type=int, default=40, help="mocks (default 40)")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--snr", type=float, default=3.0, help="median S/N per spectral pixel (DESI BGS-like: 3)")
    p.add_argument("--z", type=float, default=0.1, help="redshift of the mocks")
    p.add_argument("--emulate", choices=["both", "spec", "phot"], default="both",
                   help="the grids emulated (default: every grid the model has a shipped emulator for)")
    p.add_argument("--mocks", type=int, nargs="*", default=None,
                   help="the mocks (indices) to run HMC on (default: all)")
    p.add_argument("--hmc", type=int, nargs=2, default=None, metavar=("WARMUP", "DRAWS"),
                   help="also sample each listed mock's exact posterior with batched HMC and reweight to the emulated")
    p.add_argument("--npe-importance", type=int, default=0, metavar="S",
                   help="also measure the shifts by paired importance sampling of S amortized draws a mock")
    p.add_argument("--linearity", action="store_true",
                   help="also measure how far the model is from linear over the Fisher posterior's extent")
    p.add_argument("--snr-photometry", type=float, default=30.0, help="S/N per band (default 30)")
    p.add_argument("--load", default=None, metavar="F.nc",
                   help="with --hmc: reweight the draws of an earlier run of the exact posterior (InferenceData "
                        "written by run_hmc, e.g. npe_vs_hmc.py --save) instead of sampling; its galaxies must be "
                        "these mocks (same --n, --seed, --z, --snr, --snr-photometry) and --hmc and --chains its "
                        "warmup, draws and chains")
    p.add_argument("--chains", type=int, default=2, help="HMC chains per mock (default 2)")
    p.add_argument("--max-steps", type=int, default=32, help="HMC leapfrog steps per iteration at most (default 32)")
    a = p.parse_args(argv)
    cls = SpecPhotModel if a.model == "specphot" else PhotometryModel
    exact = cls()
    if a.emulate == "both":
        emulated = cls(sps="emulated")
    else:
        from sedppl.emulators import shipped_emulators

        emulated = cls(sps={a.emulate: shipped_emulators(a.model)[a.emulate]})
    mock = make_mocks(exact, a.n, seed=a.seed, redshift=a.z, snr_spectrum=a.snr, snr_photometry=a.snr_photometry)
    t0 = time.time()
    with physics_dtype(exact, torch.float64), physics_dtype(emulated, torch.float64), torch.no_grad():
        tr = poutine.trace(exact).get_trace(obs=mock.obs)
        coords = UnconstrainedCoordinates(tr, torch.float64)
        torch.manual_seed(a.seed + 1)
        with derived_only():  # the latent sites alone, no light
            prior = poutine.trace(exact).get_trace(n_galaxies=4000, redshift=a.z)
        u_prior = coords.flatten({k: prior.nodes[k]["value"] for k in coords.names})
        prior_sd = u_prior.std(0)
        u0 = coords.flatten({k: mock.truth[k] for k in coords.names})
        mu_x, sigma, lm = means(exact, coords, u0, mock.obs)
        mu_e, _, _ = means(emulated, coords, u0, mock.obs)
        d = u0.shape[1]
        jac = torch.empty(a.n, mu_x.shape[1], d, dtype=torch.float64)
        g_mass = torch.empty(a.n, d, dtype=torch.float64)
        for j in range(d):
            h = 1e-3 * float(prior_sd[j])
            e = torch.zeros(d, dtype=torch.float64)
            e[j] = h
            up, _, lp = means(exact, coords, u0 + e, mock.obs)
            dn, _, ld = means(exact, coords, u0 - e, mock.obs)
            jac[:, :, j] = (up - dn) / (2 * h)
            g_mass[:, j] = (lp - ld) / (2 * h)
    w = 1 / sigma**2
    fisher = torch.einsum("bmi,bm,bmj->bij", jac, w, jac)
    cov = torch.linalg.inv(fisher + torch.diag(1 / prior_sd**2))
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    delta = mu_e - mu_x
    move = torch.einsum("bij,bmj,bm,bm->bi", cov, jac, w, delta)
    shift = (move / sd).numpy()
    m_shift = ((g_mass * move).sum(-1) / torch.einsum("bi,bij,bj->b", g_mass, cov, g_mass).sqrt()).numpy()
    norm = (w * delta**2).sum(-1).sqrt().numpy()
    elapsed = time.time() - t0
    names = []
    for k, n in zip(coords.names, coords.sizes):
        names += [k] if n == 1 else [f"{k}[{i}]" for i in range(n)]
    print(f"{a.model} ({a.emulate} emulated): {a.n} mocks at z = {a.z} (seed {a.seed}, spectral S/N {a.snr}/pixel), {d} coordinates, "
          f"{mu_x.shape[1]} pixels and bands, {elapsed:.0f} s")
    print(f"||W^1/2 delta|| (emulator error in noise units): median {np.median(norm):.3f}, 90th percentile "
          f"{np.percentile(norm, 90):.3f}, max {norm.max():.3f}")
    print(f"{'coordinate':24s} {'|shift| median':>15s} {'90th pct':>9s} {'max':>8s}   (posterior sd)")
    for j, name in enumerate(names):
        s = np.abs(shift[:, j])
        print(f"{name:24s} {np.median(s):15.4f} {np.percentile(s, 90):9.4f} {s.max():8.4f}")
    s = np.abs(m_shift)
    print(f"{'log10 stellar mass':24s} {np.median(s):15.4f} {np.percentile(s, 90):9.4f} {s.max():8.4f}")
    print(f"largest |shift|: {np.abs(shift).max():.4f} posterior sd (goal <= 0.1); (mock, coordinate) pairs within "
          f"0.1: {np.mean(np.abs(shift) <= 0.1):.3f}; mocks with every coordinate within 0.1: "
          f"{int((np.abs(shift) <= 0.1).all(1).sum())} of {a.n}")
    for i in np.argsort(-np.abs(shift).max(1))[:5]:
        j = int(np.abs(shift[i]).argmax())
        print(f"  mock {i}: largest |shift| {abs(shift[i, j]):.4f} ({names[j]}), ||W^1/2 delta|| {norm[i]:.3f}")
    out = {"shift": shift, "mass_shift": m_shift, "norm": norm, "names": names}
    if a.linearity:
        chol = torch.linalg.cholesky(cov)
        gen = torch.Generator().manual_seed(a.seed + 4)
        print("non-linearity over the Fisher posterior: ||W^1/2 (mu(u0 + du) - mu(u0) - J du)|| against ||W^1/2 J du||,"
              " du = s L z, 5 draws of z per mock (medians and maxima over mocks and draws)")
        for step in (0.01, 0.1, 0.3):
            rest, lin = [], []
            for _ in range(5):
                du = step * torch.einsum("bij,bj->bi", chol, torch.randn(a.n, d, generator=gen, dtype=torch.float64))
                with physics_dtype(exact, torch.float64), torch.no_grad():
                    mu_s = means(exact, coords, u0 + du, mock.obs)[0]
                j_du = torch.einsum("bmj,bj->bm", jac, du)
                rest.append(((mu_s - mu_x - j_du) ** 2 * w).sum(-1).sqrt())
                lin.append((j_du**2 * w).sum(-1).sqrt())
            rest, lin = torch.cat(rest).numpy(), torch.cat(lin).numpy()
            print(f"  s = {step:4.2f}: not predicted median {np.median(rest):.3f}, max {rest.max():.3f}; predicted "
                  f"median {np.median(lin):.3f}, max {lin.max():.3f}; draws where the unpredicted part is larger "
                  f"{np.mean(rest > lin):.2f}")
    if a.npe_importance:
        out["npe_importance"] = npe_importance_shifts(exact, emulated, mock.obs, a.model, a.npe_importance, a.seed + 5)
    if a.hmc:
        pick = list(range(a.n)) if a.mocks is None else a.mocks
        out["hmc"] = hmc_shifts(exact, emulated, coords, mock.obs.select(pick), a.model, *a.hmc, a.chains,
                                a.max_steps, a.seed + 3, load=a.load, pick=pick)
        for r, i in zip(out["hmc"], pick):
            r["sd_ratio"] = sd[i].numpy() / r["sd"]
            j = int(np.abs(r["shift"]).argmax())
            print(f"  mock {i:3d}: R-hat max {r['rhat']:.3f}; sd of log L_em - log L_ex over the draws "
                  f"{r['sd_dlogl']:.3f}; reweighting ESS {r['ess']:.0f} of {r['n']}; largest |shift| "
                  f"{abs(r['shift'][j]):.4f} +- {r['se'][j]:.4f} ({names[j]}); linear estimate for it {abs(shift[i, j]):.4f}, "
                  f"largest linear {np.abs(shift[i]).max():.4f}; log10 M* {r['mass_shift']:+.4f} (linear "
                  f"{m_shift[i]:+.4f}); linear sd / HMC sd: median {np.median(r['sd_ratio']):.2f}, "
                  f"range {r['sd_ratio'].min():.2f}-{r['sd_ratio'].max():.2f}")
        best = [np.abs(r["shift"]).max() for r in out["hmc"]]
        print(f"HMC reweighting: mocks with every coordinate within 0.1 sd: {sum(b <= 0.1 for b in best)} of "
              f"{len(best)}; largest |shift| {max(best):.4f}")
    return out


def npe_importance_shifts(exact, emulated, obs, key: str, n_draws: int, seed: int) -> dict:
    """Shifts of the posterior means, emulated - exact, by paired importance sampling of amortized draws.

    Arguments:
        exact, emulated: The model with the exact and with the emulated synthesis.
        obs: The G galaxies.
        key: The shipped posterior (``specphot`` or ``phot``) that proposes.
        n_draws: Proposal draws per galaxy.
        seed: Random seed.

    Returns:
        ``shift`` (G, Q) in the exact posterior's sd and ``se`` (G, Q) its standard error, for the
        quantities ``names`` (Q: latent coordinates and derived quantities), ``k_hat`` (G,) and
        ``ess`` (G,) of the exact weights.
    """
    from sedppl.infer.importance import defensive_draws, psis_weights
    from sedppl.posteriors import load_shipped

    post = load_shipped(key, model=exact)
    t0 = time.time()
    torch.manual_seed(seed)
    x = post.inputs(obs, warn=False)
    u, log_prop = defensive_draws(post, x, n_draws)
    values, logdet = post.space.to_constrained(u)
    log_q = (log_prop - logdet).double()
    chunk = 1000 if key == "specphot" else 20_000  # model rows a call: spectra are large
    w_x, k_hat, ess = psis_weights((log_joint(exact, values, obs, chunk=chunk) - log_q).T.numpy())
    w_e, _, _ = psis_weights((log_joint(emulated, values, obs, chunk=chunk) - log_q).T.numpy())
    idata = post.package(obs, x, u, None, derived=True)
    names, cols = [], []
    for k, v in idata.posterior.data_vars.items():
        a = v.values[0]  # (draw, galaxy, *event)
        a = a.reshape(a.shape[0], a.shape[1], -1)
        for i in range(a.shape[-1]):
            names.append(k if a.shape[-1] == 1 else f"{k}[{i}]")
            cols.append(a[..., i])
    f = np.stack(cols, -1).transpose(1, 0, 2).astype(np.float64)  # (galaxy, draw, Q)
    spread = f.std(1) > 1e-5 * np.maximum(1.0, np.abs(f.mean(1)))  # leave out what the draws fix (SFH bin edges)
    f, names = f[..., spread.all(0)], [q for q, keep in zip(names, spread.all(0)) if keep]
    mean = np.einsum("gs,gsq->gq", w_x, f)
    sd = np.sqrt(np.einsum("gs,gsq->gq", w_x, (f - mean[:, None]) ** 2))
    shift = (np.einsum("gs,gsq->gq", w_e, f) - mean) / sd
    h = n_draws * (w_e - w_x)[..., None] * (f - mean[:, None]) / sd[:, None]
    se = h.std(1) / np.sqrt(n_draws)
    ok = (k_hat <= 0.7) & (ess >= 100)
    print(f"paired importance sampling of the shipped amortized posterior, {n_draws} draws a mock, "
          f"{time.time() - t0:.0f} s: exact weights k-hat median {np.median(k_hat):.2f}, max {k_hat.max():.2f}; "
          f"ESS median {np.median(ess):.0f}, min {ess.min():.0f}; trusted (k-hat <= 0.7, ESS >= 100): "
          f"{int(ok.sum())} of {len(ok)}")
    keep = np.isfinite(shift).all(0)
    if ok.any():
        s_ok = np.abs(shift[ok][:, keep])
        j = np.unravel_index(s_ok.argmax(), s_ok.shape)
        print(f"  trusted mocks: largest |shift| {s_ok.max():.4f} +- {se[ok][:, keep][j]:.4f} "
              f"({np.array(names)[keep][j[1]]}); mocks with every quantity within 0.1 sd: "
              f"{int((s_ok <= 0.1).all(1).sum())} of {int(ok.sum())}")
        for q in ("log_stellar_mass", "log_ssfr_100myr", "sfr_100myr", "mass_weighted_age", "tau_bc", "tau_ism",
                  "dust_index"):
            if q in names:
                v = np.abs(shift[ok][:, names.index(q)])
                print(f"    {q:20s} |shift| median {np.median(v):.4f}, max {v.max():.4f}")
    return {"shift": shift, "se": se, "names": names, "k_hat": k_hat, "ess": ess}


def hmc_shifts(exact, emulated, coords: UnconstrainedCoordinates, obs, key: str, warmup: int, draws: int,
               chains: int, max_steps: int, seed: int, load: str | None = None,
               pick: list[int] | None = None) -> list[dict]:
    """Shift of the posterior means, emulated - exact, from HMC draws of the exact posterior reweighted
    by the emulated likelihood.

    Arguments:
        exact, emulated: The model with the exact and with the emulated synthesis.
        coords: The unconstrained coordinates of the latent sites (float64).
        obs: The G galaxies.
        key: The shipped posterior (``specphot`` or ``phot``) whose draws seed the mode search.
        warmup, draws, chains, max_steps: Of :func:`sedppl.infer.hmc.run_hmc`.
        seed: Random seed.
        load: Read the draws from this netCDF file (InferenceData of ``run_hmc`` on the mocks
            of which ``obs`` holds the galaxies ``pick``) instead of sampling; its observed
            data are checked against ``obs``.

    Returns:
        Per galaxy: ``shift`` (D,) in the exact posterior's sd over the coordinates u of ``coords``,
        ``mass_shift`` (log10 stellar mass), ``rhat`` (largest over coordinates),
        ``se`` (D,) the Monte Carlo standard error of ``shift`` (from each term's ESS over the chains),
        ``sd_dlogl`` (sd of the log-likelihood difference over the draws), ``ess`` of the weights
        out of ``n`` draws, and ``sd`` (D,) the HMC posterior sd.
    """
    import arviz as az

    from sedppl.infer.hmc import run_hmc
    from sedppl.posteriors import load_shipped

    t0 = time.time()
    if load is not None:
        idata = az.from_netcdf(load).isel(galaxy=pick)
        spec = idata.observed_data["spectrum"].values if "spectrum" in idata.observed_data else None
        if spec is not None and not np.allclose(spec, obs.flux.numpy(), rtol=1e-5, atol=0):
            raise SystemExit(f"{load} holds other galaxies than these mocks: pass its --n, --seed, --z and S/N")
        if idata.posterior.sizes["chain"] != chains or idata.posterior.sizes["draw"] != draws:
            raise SystemExit(f"{load} has {idata.posterior.sizes['chain']} chains x {idata.posterior.sizes['draw']} "
                             f"draws; pass them as --chains and --hmc WARMUP DRAWS")
        print(f"HMC draws read from {load}", flush=True)
    else:
        post = load_shipped(key, model=exact)
        idata = run_hmc(exact, obs=obs, num_samples=draws, warmup_steps=warmup, num_chains=chains, seed=seed,
                        posterior=post, neutra=False, dtype=torch.float64, max_steps=max_steps, progress=True)
    print(f"HMC: {obs.n_galaxies} mocks x {chains} chains x ({warmup} + {draws}), {time.time() - t0:.0f} s, "
          f"{float(idata.sample_stats['n_steps'].mean()):.1f} gradients a draw, "
          f"{int(idata.sample_stats['diverging'].sum())} divergences", flush=True)
    n = chains * draws
    values = {k: torch.as_tensor(idata.posterior[k].values).double().reshape(n, obs.n_galaxies,
                                                                             *idata.posterior[k].shape[3:])
              for k in coords.names}
    with physics_dtype(exact, torch.float64), physics_dtype(emulated, torch.float64):
        dlogl = (log_joint(emulated, values, obs, chunk=500) - log_joint(exact, values, obs, chunk=500)).numpy()
    mass = idata.posterior["log_stellar_mass"].values.reshape(n, obs.n_galaxies)
    out = []
    for g in range(obs.n_galaxies):
        u = coords.flatten({k: v[:, g] for k, v in values.items()}).numpy()
        theta = np.concatenate([u, mass[:, g, None]], 1)
        w = np.exp(dlogl[:, g] - dlogl[:, g].max())
        w /= w.sum()
        mean, sd_x = theta.mean(0), theta.std(0)
        shift = (w @ theta - mean) / sd_x
        per_chain = theta.reshape(chains, draws, -1)
        rhat = max(float(az.rhat(per_chain[..., j])) for j in range(theta.shape[1])) if chains > 1 else float("nan")
        # Monte Carlo standard error: the shift is the mean of h = (n w - 1)(theta - mean) / sd over the draws
        h = ((n * w - 1)[:, None] * (theta - mean) / sd_x).reshape(chains, draws, -1)
        se = np.array([h[..., j].std() / np.sqrt(max(float(az.ess(h[..., j])), 2.0)) for j in range(h.shape[-1])])
        out.append({"shift": shift[:-1], "se": se[:-1], "mass_shift": float(shift[-1]), "rhat": rhat, "n": n,
                    "sd_dlogl": float(dlogl[:, g].std()), "ess": float(1 / (w**2).sum()), "sd": sd_x[:-1]})
    return out


if __name__ == "__main__":
    main()
