"""Training the spectrum VAE (:mod:`sedppl.infer.vae`) on a set of spectra: SVI, resumable, with progress.

The loss is Pyro's ``Trace_ELBO`` of the decoder (:class:`~sedppl.infer.vae.ResidualModel`)
and the encoder (:class:`~sedppl.infer.vae.AmortizedGuide`) on mini-batches of galaxies,
per galaxy, minimised by Adam over the encoder's and the residual's weights (the
physics has none). A held-out fraction gives a validation ELBO (fixed noise seed)
for early stopping and a learning-rate schedule. After every epoch the weights,
the optimizer and the history are written atomically to ``<out>.ckpt`` (a dict of
tensors and numbers, read back with ``torch.load(weights_only=True)``); run the
same call again to resume after an interruption.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from ..data import Observation
from ..derived import derived_only
from ..noise import site_mean, site_scale
from .encoder import scale_free
from .vae import SpectrumVAE, build_vae, guide_inputs, spectrum_rows


def train_vae(base, obs: Observation, out: str | Path, *, model_name: str = "", residual: bool = True,
              n_latent: int = 2, n_knots: int = 32, residual_scale: float = 0.05, remove_trend: bool = True,
              residual_hidden: tuple[int, ...] = (64, 64), residual_wave_range: tuple[float, float] | None = None,
              context: int = 64, transforms: int = 3, hidden: tuple[int, ...] = (128, 128),
              bin_factor: int | None = None, encoder_objective: str = "elbo", sleep_sims: int = 10_000,
              sleep_epochs: int = 30, sleep_per_epoch: int | None = None, final_sleep_sims: int = 10_000,
              valid_fraction: float = 0.1, batch_size: int = 32, lr: float = 1e-3,
              max_epochs: int = 100, patience: int = 10, num_particles: int = 1, seed: int = 0,
              max_minutes: float | None = None, progress: bool = True) -> SpectrumVAE:
    """Train a VAE of ``obs``'s spectra with ``base``'s physics as decoder.

    Arguments:
        base: A zoo model (or any model taking ``residual``) whose observation grid is ``obs.wave``.
        obs: The training spectra (a batch with redshifts; photometry optional), 1e-17 erg/s/cm^2/A.
        out: Output path (``.safetensors`` and ``.json`` card; ``.ckpt`` while training).
        model_name: Recorded in the card.
        residual: Learn the rest-frame correction; False for the physics alone (a plain amortized VI).
        n_latent: Latent variables of the correction per galaxy (0: one correction for all).
        n_knots: Knots of the correction in rest-frame ln(lambda).
        residual_scale: Width of the Gaussian penalty on ln(correction) at each knot.
        remove_trend: Keep the correction free of a level and a tilt in ln(lambda) (degenerate with the
            mass and the dust; :class:`sedppl.residual.RestFrameResidual`).
        residual_hidden: Hidden widths of the correction's network.
        residual_wave_range: Rest-frame range of the knots, vacuum Angstrom; by default the range the
            training spectra cover (their wavelengths over 1 + z).
        context, transforms, hidden: The encoder's embedding size, coupling layers and hidden widths.
        bin_factor: Pixels per bin of the encoder's binned spectrum (default: about 512 bins).
        encoder_objective: How the encoder learns after its start. ``"sleep"`` (wake-sleep): every
            epoch the residual takes ELBO steps on the spectra (wake) and the encoder is fitted by
            maximum likelihood to ``sleep_per_epoch`` fresh simulations from the current decoder
            (sleep; forward KL, so its posteriors cover the truth rather than shrink onto one mode);
            ``"elbo"`` (default): a plain VAE, encoder and residual on the ELBO together (reverse KL:
            it learns the residual well, but its encoder's posteriors are too narrow, hence
            ``final_sleep_sims``). The wake-sleep encoder is broader and noisier, and the residual learns
            poorly from it (docs/vae.md).
        sleep_sims, sleep_epochs: Before the ELBO, the encoder is fitted to ``sleep_sims`` simulations
            from the decoder's prior (noise at the training spectra's S/N) by maximum likelihood for
            up to ``sleep_epochs`` epochs (the "sleep" phase of wake-sleep: neural posterior
            estimation), so the ELBO starts from an encoder that already knows roughly where the
            posterior lies instead of from chi^2 ~ 10^10 at random masses; 0 to skip.
        sleep_per_epoch: Fresh simulations per epoch with ``encoder_objective="sleep"`` (default: as
            many as training spectra).
        final_sleep_sims: After training, the encoder is refitted (from its trained weights) by maximum
            likelihood to this many simulations of the final decoder, learned residual included (up to
            ``sleep_epochs`` epochs): the ELBO-trained encoder fits the spectra but its posteriors are
            too narrow; the refitted one is neural posterior estimation under the learned model. 0 to skip.
        valid_fraction: Held-out share of the galaxies.
        batch_size, lr, max_epochs, patience: Mini-batch size, Adam's learning rate (halved when the
            validation ELBO stalls for ``patience // 3`` epochs), epoch limit, early-stopping patience.
        num_particles: ELBO particles per galaxy.
        seed: Random seed (split, initialisation, noise).
        max_minutes: Stop after this much training time (the best weights so far are kept).
        progress: Show a progress bar.

    Returns:
        The trained :class:`SpectrumVAE` (the best validation epoch), also written to ``out``.
    """
    if not obs.has_spectrum or obs.redshift is None:
        raise ValueError("the VAE trains on spectra with known redshifts")
    n = obs.n_galaxies
    n_valid = max(1, int(round(valid_fraction * n))) if valid_fraction > 0 else 0
    if encoder_objective not in ("sleep", "elbo"):
        raise ValueError(f"encoder_objective must be 'sleep' or 'elbo', got {encoder_objective!r}")
    if n - n_valid < 2:
        raise ValueError(f"{n} spectra are too few to train on")
    wave = base.forward_model.wave_obs.numpy()
    if obs.wave.shape[0] != len(wave) or not np.allclose(obs.wave.numpy(), wave, atol=1e-3):
        raise ValueError("the spectra are not on the model's observed grid: build the model with wave=obs.wave")
    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.with_suffix(".ckpt")
    z = obs.redshift.reshape(-1).expand(n)
    z_range = (float(z.min()), float(z.max()))
    if z_range[1] - z_range[0] < 0.01:  # one redshift (or nearly): a range the encoder can scale by
        mid = 0.5 * (z_range[0] + z_range[1])
        z_range = (max(mid - 0.005, 1e-4), mid + 0.005)
    if residual_wave_range is None:
        residual_wave_range = (float(wave[0]) / (1 + z_range[1]), float(wave[-1]) / (1 + z_range[0]))
    bin_factor = int(bin_factor or max(1, len(wave) // 512))
    card = {"format": "sedppl-vae-1", "model": model_name, "residual": bool(residual), "n_latent": int(n_latent),
            "n_knots": int(n_knots), "residual_scale": float(residual_scale), "remove_trend": bool(remove_trend),
            "residual_hidden": list(residual_hidden), "residual_wave_range": list(residual_wave_range),
            "context": int(context), "transforms": int(transforms), "hidden": list(hidden),
            "bin_factor": bin_factor, "spectrum_bins": len(wave) // bin_factor,
            "bands": list(base.bands) if obs.has_photometry else [], "redshift_range": list(z_range),
            "wave": [float(wave[0]), float(wave[-1]), len(wave)], "n_train": n - n_valid, "n_valid": n_valid,
            "batch_size": batch_size, "lr": lr, "encoder_objective": encoder_objective, "num_particles": num_particles, "seed": seed}
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    vae = build_vae(base, card)
    card["sites"] = vae.guide.space.names
    _standardise(vae, obs)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    enc_params = list(vae.guide.parameters())
    dec_params = list(vae.model.residual.parameters()) if residual else []
    wake_params = dec_params + (enc_params if encoder_objective == "elbo" else [])
    opt = torch.optim.Adam(enc_params + dec_params, lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, patience // 3))
    meta = {"epoch": 0, "best": math.inf, "best_epoch": 0, "seconds": 0.0, "history": []}
    best_state = None
    resumed = ckpt.exists()
    if resumed:
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best_state = state["best_weights"]
        meta = json.loads(state["meta"])
    from tqdm.auto import tqdm

    train_obs = obs.select(train_idx)
    sim = EncoderSimulator(vae, train_obs, seed)
    if not resumed and sleep_sims:
        meta["sleep"] = sleep_phase(vae, sim, sleep_sims, sleep_epochs, batch_size, lr, progress)
    elbo = pyro.infer.Trace_ELBO(num_particles=num_particles)

    bar = tqdm(total=max_epochs, initial=meta["epoch"], disable=not progress, desc="training VAE")
    stale = meta["epoch"] - meta["best_epoch"]
    while meta["epoch"] < max_epochs and stale < patience:
        if max_minutes is not None and meta["seconds"] > 60 * max_minutes:
            break
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed + 1000 + meta["epoch"])
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total = 0.0
        for i in range(0, len(order), batch_size):  # wake: the ELBO on the spectra
            batch = obs.select(order[i:i + batch_size])
            loss = wake_loss(vae, batch, elbo, encoder_objective == "sleep") / batch.n_galaxies
            total += float(loss.detach()) * batch.n_galaxies
            if not wake_params:  # physics only, encoder asleep: the ELBO is only watched
                continue
            opt.zero_grad()
            loss.backward()
            for p in enc_params if encoder_objective == "sleep" else []:
                p.grad = None
            torch.nn.utils.clip_grad_norm_(wake_params, 10.0)
            opt.step()
        if encoder_objective == "sleep":  # sleep: the encoder on fresh simulations of the current decoder
            pyro.set_rng_seed(seed + 2000 + meta["epoch"])
            x, target = sim.simulate(sleep_per_epoch or len(train_idx))
            fit_encoder(vae, x, target, opt, batch_size, gen)
        train_loss = total / len(order)
        valid_loss = validation_loss(vae, obs.select(valid_idx), seed, batch_size) if n_valid else train_loss
        sched.step(valid_loss)
        meta["epoch"] += 1
        meta["seconds"] += time.perf_counter() - t0
        meta["history"].append([train_loss, valid_loss])
        if valid_loss < meta["best"]:
            meta["best"], meta["best_epoch"] = valid_loss, meta["epoch"]
            best_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        stale = meta["epoch"] - meta["best_epoch"]
        _write_checkpoint(ckpt, vae, opt, sched, best_state, meta)
        bar.update(1)
        bar.set_postfix(train=f"{train_loss:.1f}", valid=f"{valid_loss:.1f}")
    bar.close()
    if best_state is not None:
        vae.load_state_dict(best_state)
    if final_sleep_sims and "final_sleep" not in meta:
        meta["final_sleep"] = sleep_phase(vae, sim, final_sleep_sims, sleep_epochs, batch_size, lr, progress)
    vae.card.update({"epochs": meta["epoch"], "best_epoch": meta["best_epoch"],
                     "valid_loss_per_galaxy": meta["best"], "sleep": meta.get("sleep"), "final_sleep": meta.get("final_sleep"), "train_seconds": round(meta["seconds"], 1),
                     "history": meta["history"]})
    vae.save(out)
    ckpt.unlink(missing_ok=True)
    return vae


def wake_loss(vae: SpectrumVAE, obs: Observation, elbo, encoder_fixed: bool) -> torch.Tensor:
    """-ELBO of ``obs`` (summed over galaxies); with ``encoder_fixed`` from one guide draw taken without
    gradients (the decoder's gradient needs none through the encoder: cheaper than ``elbo``)."""
    if not encoder_fixed:
        return elbo.differentiable_loss(vae.model, vae.guide, obs)
    with torch.no_grad():
        guide_tr = pyro.poutine.trace(vae.guide).get_trace(obs)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=guide_tr)).get_trace(obs)
    return guide_tr.log_prob_sum() - model_tr.log_prob_sum()


class EncoderSimulator:
    """Simulations for the encoder's maximum-likelihood fits: (inputs, standardised unconstrained truths)
    from the VAE's current decoder, observed like the training spectra.

    Each simulated galaxy takes the redshift of a random training spectrum and that spectrum's
    median S/N per pixel (flat ivar in flux: sigma = median model flux / S/N) and its mask (pixels
    with ivar 0 stay 0). Photometry, when the encoder reads it, gets the model's own noise.
    """

    def __init__(self, vae: SpectrumVAE, obs: Observation, seed: int, chunk: int = 1000):
        self.vae, self.wave, self.chunk = vae, obs.wave, chunk
        self.gen = torch.Generator().manual_seed(seed + 17)
        flux, ivar = spectrum_rows(obs)
        self.used = ivar > 0
        self.snr = torch.stack([torch.median((flux[i] * ivar[i].sqrt())[self.used[i]])
                                for i in range(flux.shape[0])]).clamp(min=1)
        self.z = obs.redshift.reshape(-1).expand(flux.shape[0])

    def simulate(self, n: int) -> tuple[dict, torch.Tensor]:
        """``n`` simulations: encoder inputs {name: (n, ...)} and z = (u - shift) / scale, (n, D)."""
        g, m = self.vae.guide, self.used.shape[-1]
        xs, us = [], []
        for i in range(0, n, self.chunk):
            k = min(self.chunk, n - i)
            pick = torch.randint(0, len(self.z), (k,), generator=self.gen)
            with torch.no_grad(), pyro.poutine.block():
                tr = pyro.poutine.trace(self.vae.model).get_trace(n_galaxies=k, redshift=self.z[pick])
            mean = site_mean(tr.nodes["spectrum"]).reshape(k, m)
            sigma = mean.median(-1).values.abs()[:, None] / self.snr[pick, None]
            ivar = torch.where(self.used[pick], 1 / sigma**2, torch.zeros_like(mean))
            flux = mean + sigma * torch.randn(mean.shape, generator=self.gen)
            kw = {}
            if g.bands:
                kw = {"bands": g.bands, "band_flux": tr.nodes["photometry"]["value"].reshape(k, -1),
                      "band_ivar": site_scale(tr.nodes["photometry"]).reshape(k, -1) ** -2}
            sim = Observation(redshift=self.z[pick], wave=self.wave, flux=flux, ivar=ivar, **kw)
            xs.append(guide_inputs(sim, g.bin_factor, g.bands))
            us.append(g.space.to_unconstrained({s.name: tr.nodes[s.name]["value"] for s in g.space.sites}))
        x = {key: None if xs[0][key] is None else torch.cat([p[key] for p in xs]) for key in xs[0]}
        return x, (torch.cat(us) - g.theta_shift) / g.theta_scale


def _nll(vae: SpectrumVAE, x: dict, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    g = vae.guide
    part = {key: None if v is None else v[rows] for key, v in x.items()}
    return -g.flow(g.encoder(**part)).log_prob(target[rows]).mean()


def fit_encoder(vae: SpectrumVAE, x: dict, target: torch.Tensor, opt, batch_size: int,
                gen: torch.Generator) -> float:
    """One pass of maximum likelihood of the encoder over simulations (x, target); returns the mean -log q."""
    order = torch.randperm(target.shape[0], generator=gen)
    total = 0.0
    for i in range(0, len(order), batch_size):
        loss = _nll(vae, x, target, order[i:i + batch_size])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * min(batch_size, len(order) - i)
    return total / len(order)


def sleep_phase(vae: SpectrumVAE, sim: EncoderSimulator, n_sims: int, max_epochs: int, batch_size: int,
                lr: float, progress: bool = True) -> dict:
    """Fit the encoder to ``n_sims`` simulations from the decoder (``sim``) by maximum likelihood,
    10% held out for early stopping (patience 5 epochs).

    Returns:
        {"epochs", "valid_nll"}: epochs run and the best held-out -log q(u | x) per galaxy.
    """
    from tqdm.auto import tqdm

    g = vae.guide
    x, target = sim.simulate(n_sims)
    n_valid = max(1, n_sims // 10)
    train = {key: None if v is None else v[n_valid:] for key, v in x.items()}
    opt = torch.optim.Adam(g.parameters(), lr=lr)
    best, best_epoch, best_state, epoch = math.inf, 0, None, 0
    bar = tqdm(total=max_epochs, disable=not progress, desc="VAE encoder on simulations")
    for epoch in range(1, max_epochs + 1):
        fit_encoder(vae, train, target[n_valid:], opt, batch_size, sim.gen)
        with torch.no_grad():
            valid = float(_nll(vae, x, target, torch.arange(n_valid)))
        bar.update(1)
        bar.set_postfix(valid=f"{valid:.2f}")
        if valid < best:
            best, best_epoch = valid, epoch
            best_state = {k: v.detach().clone() for k, v in g.state_dict().items()}
        elif epoch - best_epoch >= 5:
            break
    bar.close()
    g.load_state_dict(best_state)
    # the log-Jacobian of the standardisation, so the figure is a density of u
    return {"epochs": epoch, "valid_nll": best + float(torch.log(g.theta_scale).sum())}


def validation_loss(vae: SpectrumVAE, obs: Observation, seed: int, batch_size: int) -> float:
    """Negative ELBO per galaxy of ``obs`` (one particle, noise seeded by ``seed``: comparable across epochs)."""
    elbo = pyro.infer.Trace_ELBO()
    total = 0.0
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed + 7)
        for i in range(0, obs.n_galaxies, 4 * batch_size):
            part = obs.select(torch.arange(i, min(obs.n_galaxies, i + 4 * batch_size)))
            total += float(elbo.differentiable_loss(vae.model, vae.guide, part))
    return total / obs.n_galaxies


def _standardise(vae: SpectrumVAE, obs: Observation, n_prior: int = 4096) -> None:
    """Set the encoder's input scales from the training spectra and the flow's coordinates from
    the prior spread of the latent sites (a prior draw in derived-only mode: no light is simulated)."""
    g = vae.guide
    x = guide_inputs(obs, g.bin_factor, g.bands)
    for j, key in enumerate(("spectrum", "photometry")):
        if x[key] is None:
            continue
        keep = (x[f"{key}_ivar"] > 0).any(-1)
        if not torch.any(keep):
            continue
        _, ls = scale_free(x[key][keep], x[f"{key}_ivar"][keep])
        g.encoder.scale_shift[j] = ls.mean()
        g.encoder.scale_sd[j] = ls.std().clamp(min=1e-3) if keep.sum() > 1 else 1.0
    lo, hi = vae.card["redshift_range"]
    zs = torch.linspace(lo, hi, n_prior)
    with torch.no_grad(), derived_only(), pyro.poutine.block():
        tr = pyro.poutine.trace(vae.model).get_trace(n_galaxies=n_prior, redshift=zs)
    u = g.space.to_unconstrained({s.name: tr.nodes[s.name]["value"] for s in g.space.sites})
    g.theta_shift.copy_(u.mean(0))
    g.theta_scale.copy_(u.std(0).clamp(min=1e-3))


def _write_checkpoint(path: Path, vae: SpectrumVAE, opt, sched, best_state, meta: dict) -> None:
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save({"weights": vae.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "best_weights": best_state, "meta": json.dumps(meta)}, tmp)
    tmp.replace(path)
