"""The spectrum VAE (sedppl.infer.vae): what its residual recovers, how its encoder's posteriors
compare with the exact ones, and what training and encoding cost.

Science part (a small spectral model, 3800-7000 A at 4 A (800 pixels), SDSS g, r, i on the
spectrum's grid only; ``SpecPhotModel`` physics; S/N ``--snr`` per pixel; z 0.05-0.15):

1. *Injected defect*: ``--train`` mocks whose rest-frame SED carries +15% around 4600 A
   (Gaussian, sigma 250 A), a shape the SPS lacks. Two VAEs on the same spectra: with the
   learned residual and physics only. Reported: the learned correction at the knots against the
   injected one (both with level and tilt removed: the physics owns those), its correlation and
   peak; on ``--test`` held-out defect mocks, the bias and rms error of the encoders' posterior
   means of log stellar mass, tau_ism and tau_bc, and the share of truths inside the central 68%;
   reconstruction chi^2/dof with and without the residual.
2. *Physics only*: a VAE with the residual trained on mocks without a defect; the largest
   |ln correction| it learns (should be ~0).
3. *Encoder vs exact posterior*: on ``--reference`` of those physics-only mocks, the exact
   posterior by importance sampling the encoder (PSIS-smoothed weights of the model's exact log
   joint over q; k-hat and ESS printed; only references with ESS >= 200 count), against the
   encoder's own draws: shift of the means in reference standard deviations and width ratio.
   With ``--hmc-draws``, also against batched HMC on the learned model (4 chains a galaxy;
   R-hat printed; only galaxies at R-hat <= 1.01 count as references).
4. *Mocks from the learned model* (``SpectrumVAE.generate``) at the training set's redshifts and
   S/N (``--snr``, as the training spectra were made) against the training spectra: two-sample KS tests of a colour (mean flux 6000-6600 A over
   4200-4800 A, observed) and of the median S/N.

Timing part (``--timing``, the full DESI grid, 7,781 pixels): simulate ``--timing-n`` spectra,
then time the encoder's sleep phase, ``--timing-epochs`` ELBO epochs and the final sleep refit, and the encoding
of one spectrum and of a batch of 100 (1,000 draws each, with derived quantities).

    python benchmarks/vae.py [--train 1000] [--test 100] [--snr 5] [--epochs 40] [--hmc-draws 100]
    python benchmarks/vae.py --timing [--timing-n 10000] [--timing-epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyro
import torch
from _timing import start
from pyro import poutine

from sedppl.data import Observation
from sedppl.infer.importance import log_joint, psis_weights
from sedppl.infer.vae_training import train_vae
from sedppl.noise import site_mean
from sedppl.zoo import SpecPhotModel

WAVE = np.arange(3800.0, 7000.0, 4.0)
PARAMS = ["log_stellar_mass", "tau_ism", "tau_bc"]


def defect(wave):
    return 1 + 0.15 * torch.exp(-0.5 * ((wave - 4600.0) / 250.0) ** 2)


def mocks(model, n, seed, inject, snr, z_range=(0.05, 0.15)):
    pyro.set_rng_seed(seed)
    z = z_range[0] + (z_range[1] - z_range[0]) * torch.rand(n)
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(n_galaxies=n, redshift=z, residual=(lambda: defect) if inject else None)
    mean = site_mean(tr.nodes["spectrum"])
    sigma = mean.median(-1).values.abs()[:, None] / snr
    flux = mean + sigma * torch.randn(mean.shape)
    truth = {k: v["value"] for k, v in tr.nodes.items() if v["type"] == "sample" and k not in ("spectrum", "photometry")}
    return Observation(redshift=z, wave=model.forward_model.wave_obs.numpy(), flux=flux,
                       ivar=(1 / sigma**2).expand_as(flux).clone()), truth


def accuracy(vae, obs, truth, label):
    post = vae.encode(obs, 500, seed=3).posterior
    out = []
    for k in PARAMS:
        d = post[k].values[0]  # (draw, galaxy)
        t = truth[k].numpy()
        err = d.mean(0) - t
        lo, hi = np.percentile(d, [16, 84], axis=0)
        out.append(f"{k}: bias {err.mean():+.3f}, rms {np.sqrt((err**2).mean()):.3f}, "
                   f"mean sd {d.std(0).mean():.3f}, truth in 68% {((t >= lo) & (t <= hi)).mean():.2f}")
    chi2 = vae.reconstruct(obs)["chi2_dof"]
    print(f"  {label}: reconstruction chi2/dof median {chi2.median():.3f}, mean {chi2.mean():.3f}")
    for line in out:
        print(f"    {line}")


def science(args):
    from scipy.stats import ks_2samp

    model = SpecPhotModel(wave=WAVE, bands=["sdss_g", "sdss_r", "sdss_i"], z_range=(0.01, 0.3))
    train, _ = mocks(model, args.train, 1, True, args.snr)
    test, test_truth = mocks(model, args.test, 99, True, args.snr)
    kw = dict(n_latent=1, n_knots=24, max_epochs=args.epochs, lr=1e-3, sleep_sims=args.sleep_sims,
              progress=False, seed=0)
    tmp = args.reuse or tempfile.mkdtemp()
    print(f"(VAEs in {tmp})")

    def trained(name, obs, **extra):
        """Train, or load what an earlier run of this script left in --reuse."""
        from pathlib import Path

        from sedppl.infer.vae import SpectrumVAE

        if Path(f"{tmp}/{name}.safetensors").exists():
            return SpectrumVAE.load(f"{tmp}/{name}", model)
        return train_vae(model, obs, f"{tmp}/{name}", **kw, **extra)

    print(f"1. injected defect: {args.train} training spectra, S/N {args.snr}, {args.test} held out")
    t0 = time.perf_counter()
    vae = trained("with", train)
    print(f"  with residual: {time.perf_counter() - t0:.0f} s ({vae.card['epochs']} epochs; "
          f"sleep phase {vae.card['sleep']}); validation -ELBO {vae.card['valid_loss_per_galaxy']:.1f} per galaxy")
    t0 = time.perf_counter()
    plain = trained("plain", train, residual=False)
    print(f"  physics only: {time.perf_counter() - t0:.0f} s ({plain.card['epochs']} epochs); "
          f"validation -ELBO {plain.card['valid_loss_per_galaxy']:.1f} per galaxy")
    res = vae.model.residual
    knots = torch.exp(res.log_knots)
    learned = torch.log(vae.residual_curve(knots)["p50"])
    injected = res.projector @ torch.log(defect(knots))
    print("  rest-frame knots (A):  " + " ".join(f"{w:6.0f}" for w in knots.tolist()))
    print("  learned factor:        " + " ".join(f"{np.exp(v):6.3f}" for v in learned.tolist()))
    print("  injected (projected):  " + " ".join(f"{np.exp(v):6.3f}" for v in injected.tolist()))
    i = int(torch.argmax(injected))
    print(f"  correlation of ln factors {np.corrcoef(learned.numpy(), injected.numpy())[0, 1]:.3f}; "
          f"at the injected peak ({knots[i]:.0f} A) learned {np.exp(learned[i]):.3f} vs {np.exp(injected[i]):.3f}")
    accuracy(vae, test, test_truth, "with residual")
    accuracy(plain, test, test_truth, "physics only")

    print(f"2. physics-only mocks ({args.train}), VAE with residual")
    clean, _ = mocks(model, args.train, 2, False, args.snr)
    t0 = time.perf_counter()
    vae0 = trained("clean", clean)
    curve = vae0.residual_curve(torch.linspace(3400.0, 6600.0, 400))
    print(f"  {time.perf_counter() - t0:.0f} s (training, or loading with --reuse); largest |ln correction| of the median curve "
          f"{torch.log(curve['p50']).abs().max():.4f}, of the 16/84th percentiles "
          f"{max(torch.log(curve['p16']).abs().max(), torch.log(curve['p84']).abs().max()):.4f}")

    print(f"3. encoder vs exact posterior (importance sampling the encoder), {args.reference} physics-only mocks")
    ref_obs, ref_truth = mocks(model, args.reference, 5, False, args.snr)
    accuracy(vae0, ref_obs, ref_truth, "encoder, physics-only mocks")
    g = vae0.guide
    torch.manual_seed(6)
    u = g.sample_unconstrained(ref_obs, args.is_draws)
    values, logdet = g.space.to_constrained(u)
    log_q = g.log_prob_unconstrained(u, ref_obs) - logdet
    log_w = (log_joint(vae0.model, values, ref_obs) - log_q.double()).T.numpy()
    w, k_hat, ess = psis_weights(log_w)
    derived = vae0._deterministic(values, ref_obs)
    good = ess >= 200
    print(f"  Pareto k-hat {np.round(k_hat, 2).tolist()}; ESS {np.round(ess).astype(int).tolist()} of "
          f"{args.is_draws}; {good.sum()} references with ESS >= 200")
    for k in PARAMS if good.any() else []:
        d = (derived[k] if k in derived else values[k]).numpy()  # (S, N)
        ref_mean = (w.T * d).sum(0)
        ref_sd = np.sqrt((w.T * (d - ref_mean) ** 2).sum(0))
        shift = (d.mean(0) - ref_mean) / ref_sd
        ratio = d.std(0) / ref_sd
        ok = good & (np.abs(shift) < 0.3) & (ratio > 0.8) & (ratio < 1.25)
        print(f"    {k}: |shift| median {np.median(np.abs(shift[good])):.2f}, max {np.abs(shift[good]).max():.2f}; "
              f"width ratio median {np.median(ratio[good]):.2f} ({ratio[good].min():.2f}-{ratio[good].max():.2f}); "
              f"{ok.sum()} of {good.sum()} within |shift| < 0.3 and ratio 0.8-1.25")
    if not good.any():
        print("  no reference: the encoder is too poor a proposal for the exact posterior (no comparison made)")
    best = log_w.max(-1)
    print(f"  log p(x, theta) - log q at the best of the {args.is_draws} draws minus its median over draws: "
          f"median {np.median(best - np.median(log_w, -1)):.1f} nats (0 for a perfect encoder)")
    if args.hmc_draws:
        hmc_reference(vae0, ref_obs, args)

    print("4. mocks from the learned model (with residual, case 1) vs its training spectra")
    # the training spectra were all made at S/N --snr (sigma = median model flux / snr); the learned model
    # is asked for the same (feeding back each spectrum's *measured* S/N would add its estimation noise twice)
    snr_train = (train.flux * train.ivar.sqrt()).median(-1).values
    gen = vae.generate(args.train, redshift=train.redshift, snr=args.snr, seed=7)
    wave = torch.as_tensor(WAVE)

    def colour(o):
        red = o.flux[:, (wave > 6000) & (wave < 6600)].mean(-1)
        blue = o.flux[:, (wave > 4200) & (wave < 4800)].mean(-1)
        return (-2.5 * torch.log10((red / blue).clamp(min=1e-3))).numpy()

    snr_gen = (gen.flux * gen.ivar.sqrt()).median(-1).values
    c_ks, s_ks = ks_2samp(colour(train), colour(gen)), ks_2samp(snr_train.numpy(), snr_gen.numpy())
    print(f"  colour (6000-6600 vs 4200-4800 A, mag): KS statistic {c_ks.statistic:.3f}, p {c_ks.pvalue:.3g}; "
          f"median S/N: KS {s_ks.statistic:.3f}, p {s_ks.pvalue:.3g}")
    gen0 = vae.generate(args.train, redshift=train.redshift, snr=args.snr, seed=7, physics_only=True)
    c0 = ks_2samp(colour(train), colour(gen0))
    print(f"  same draws without the learned correction: colour KS {c0.statistic:.3f}, p {c0.pvalue:.3g}")


def hmc_reference(vae, obs, args):
    """Part 3, second reference: batched HMC (4 chains a galaxy) on the learned model; only galaxies
    whose chains agree (R-hat <= 1.01 on every compared parameter) count."""
    import arviz as az

    from sedppl.infer.hmc import run_hmc

    t0 = time.perf_counter()
    idata = run_hmc(vae.model, obs=obs, num_samples=args.hmc_draws, warmup_steps=args.hmc_warmup, num_chains=4,
                    seed=0, progress=False)
    ref, stats = idata.posterior, idata.sample_stats
    rhat = np.stack([az.rhat(ref[[k]])[k].values for k in PARAMS]).max(0)
    print(f"  batched HMC, 4 chains x ({args.hmc_warmup} + {args.hmc_draws}): {time.perf_counter() - t0:.0f} s, "
          f"{float(stats['n_steps'].mean()):.1f} gradients a draw, {int(stats['diverging'].sum())} divergences; "
          f"R-hat over {', '.join(PARAMS)}: median {np.median(rhat):.2f}, max {rhat.max():.2f}; "
          f"{(rhat <= 1.01).sum()} of {len(rhat)} galaxies at R-hat <= 1.01")
    enc = vae.encode(obs, 2000, seed=3).posterior
    good = rhat <= 1.01
    for k in PARAMS:
        r = ref[k].values.reshape(-1, obs.n_galaxies)
        e = enc[k].values[0]
        shift, ratio = (e.mean(0) - r.mean(0)) / r.std(0), e.std(0) / r.std(0)
        ok = (np.abs(shift) < 0.3) & (ratio > 0.8) & (ratio < 1.25)
        print(f"    {k}: all galaxies |shift| median {np.median(np.abs(shift)):.2f}, width ratio median "
              f"{np.median(ratio):.2f}; within |shift| < 0.3 and ratio 0.8-1.25: {ok.sum()} of {len(ok)} "
              f"({(ok & good).sum()} of {good.sum()} converged)")


def timing(args):
    model = SpecPhotModel()
    t0 = time.perf_counter()
    obs, _ = mocks(model, args.timing_n, 11, False, 3.0, z_range=(0.05, 0.5))
    print(f"DESI grid ({model.forward_model.wave_obs.shape[0]} pixels): simulated {args.timing_n} spectra "
          f"in {time.perf_counter() - t0:.1f} s")
    tmp = tempfile.mkdtemp()
    t0 = time.perf_counter()
    vae = train_vae(model, obs, f"{tmp}/desi", max_epochs=args.timing_epochs, patience=100,
                    sleep_sims=args.timing_n, sleep_epochs=args.timing_sleep_epochs, progress=False)
    total = time.perf_counter() - t0
    c = vae.card
    print(f"train_vae: {total:.0f} s in all; {c['epochs']} ELBO epochs {c['train_seconds']:.0f} s "
          f"({c['train_seconds'] / max(1, c['epochs']):.0f} s an epoch over {c['n_train']} spectra); the rest "
          f"(sleep phase: {c['sleep']}, setup) {total - c['train_seconds']:.0f} s")
    one = obs.select([0])
    batch = obs.select(list(range(100)))
    vae.encode(one, 1000)
    t = [time.perf_counter()]
    for _ in range(5):
        vae.encode(one, 1000)
        t.append(time.perf_counter())
    per_one = np.diff(t).min()
    t0 = time.perf_counter()
    vae.encode(batch, 1000)
    per_batch = (time.perf_counter() - t0) / 100
    print(f"encode, 1,000 draws with derived quantities: one spectrum {1000 * per_one:.1f} ms (best of 5); "
          f"batch of 100 {1000 * per_batch:.1f} ms a spectrum")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--reference", type=int, default=20)
    p.add_argument("--is-draws", type=int, default=4000)
    p.add_argument("--snr", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--sleep-sims", type=int, default=5000)
    p.add_argument("--hmc-warmup", type=int, default=100)
    p.add_argument("--hmc-draws", type=int, default=0, help="> 0: also compare the encoder with batched HMC")
    p.add_argument("--reuse", default=None, help="a folder of VAEs from an earlier run (printed at its start)")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--timing-n", type=int, default=10_000)
    p.add_argument("--timing-epochs", type=int, default=2)
    p.add_argument("--timing-sleep-epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    start(args.threads)
    timing(args) if args.timing else science(args)


if __name__ == "__main__":
    main()
