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
from .encoder import scale_free
from .vae import SpectrumVAE, build_vae, guide_inputs


def train_vae(base, obs: Observation, out: str | Path, *, model_name: str = "", residual: bool = True,
              n_latent: int = 2, n_knots: int = 32, residual_scale: float = 0.05, remove_trend: bool = True,
              residual_hidden: tuple[int, ...] = (64, 64), residual_wave_range: tuple[float, float] | None = None,
              context: int = 64, transforms: int = 3, hidden: tuple[int, ...] = (128, 128),
              bin_factor: int | None = None, sleep_sims: int = 10_000, sleep_epochs: int = 30,
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
        sleep_sims, sleep_epochs: Before the ELBO, the encoder is fitted to ``sleep_sims`` simulations
            from the decoder's prior (noise at the training spectra's S/N) by maximum likelihood for
            up to ``sleep_epochs`` epochs (the "sleep" phase of wake-sleep: neural posterior
            estimation), so the ELBO starts from an encoder that already knows roughly where the
            posterior lies instead of from chi^2 ~ 10^10 at random masses; 0 to skip.
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
            "batch_size": batch_size, "lr": lr, "num_particles": num_particles, "seed": seed}
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    vae = build_vae(base, card)
    card["sites"] = vae.guide.space.names
    _standardise(vae, obs)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    params = list(vae.guide.parameters()) + (list(vae.model.residual.parameters()) if residual else [])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, patience // 3))
    meta = {"epoch": 0, "best": math.inf, "best_epoch": 0, "seconds": 0.0, "history": []}
    best_state = None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best_state = state["best_weights"]
        meta = json.loads(state["meta"])
    from tqdm.auto import tqdm

    if not ckpt.exists() and sleep_sims:
        meta["sleep"] = sleep_phase(vae, obs.select(train_idx), sleep_sims, sleep_epochs, batch_size, lr, seed,
                                    progress)
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
        for i in range(0, len(order), batch_size):
            batch = obs.select(order[i:i + batch_size])
            loss = elbo.differentiable_loss(vae.model, vae.guide, batch) / batch.n_galaxies
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            total += float(loss.detach()) * batch.n_galaxies
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
    vae.card.update({"epochs": meta["epoch"], "best_epoch": meta["best_epoch"],
                     "valid_loss_per_galaxy": meta["best"], "sleep": meta.get("sleep"), "train_seconds": round(meta["seconds"], 1),
                     "history": meta["history"]})
    vae.save(out)
    ckpt.unlink(missing_ok=True)
    return vae


def sleep_phase(vae: SpectrumVAE, obs: Observation, n_sims: int, max_epochs: int, batch_size: int, lr: float,
                seed: int, progress: bool = True, chunk: int = 1000) -> dict:
    """Fit the encoder to simulations from the decoder's prior by maximum likelihood (log q(u | x)).

    Each simulated galaxy takes the redshift of a random training spectrum and that spectrum's
    median S/N per pixel (flat ivar in flux: sigma = median model flux / S/N) and its mask (pixels
    with ivar 0 stay 0). Photometry, when the encoder reads it, gets the model's own noise (5% and
    the floor). 10% of the simulations are held out for early stopping (patience 5 epochs).

    Returns:
        {"epochs", "valid_nll"}: epochs run and the best held-out -log q per galaxy.
    """
    from tqdm.auto import tqdm

    from ..noise import site_mean

    g = vae.guide
    gen = torch.Generator().manual_seed(seed + 17)
    m = obs.flux.shape[-1]
    flux, ivar = obs.flux.reshape(-1, m), obs.ivar.reshape(-1, m)
    if obs.mask is not None:
        ivar = torch.where(obs.mask.reshape(ivar.shape), ivar, torch.zeros_like(ivar))
    used = ivar > 0
    snr = torch.stack([torch.median((flux[i] * ivar[i].sqrt())[used[i]]) for i in range(flux.shape[0])]).clamp(min=1)
    z_obs = obs.redshift.reshape(-1).expand(flux.shape[0])
    xs, us = [], []
    pyro.set_rng_seed(seed + 18)
    for i in range(0, n_sims, chunk):
        k = min(chunk, n_sims - i)
        pick = torch.randint(0, flux.shape[0], (k,), generator=gen)
        with torch.no_grad(), pyro.poutine.block():
            tr = pyro.poutine.trace(vae.model).get_trace(n_galaxies=k, redshift=z_obs[pick])
        mean = site_mean(tr.nodes["spectrum"]).reshape(k, m)
        sigma = mean.median(-1).values.abs()[:, None] / snr[pick, None]
        sim_ivar = torch.where(used[pick], 1 / sigma**2, torch.zeros_like(mean))
        sim_flux = mean + sigma * torch.randn(mean.shape, generator=gen)
        kw = {}
        if g.bands:
            kw = {"bands": g.bands, "band_flux": tr.nodes["photometry"]["value"].reshape(k, -1),
                  "band_ivar": 1 / _site_scale(tr.nodes["photometry"]["fn"]).reshape(k, -1) ** 2}
        sim = Observation(redshift=z_obs[pick], wave=obs.wave, flux=sim_flux, ivar=sim_ivar, **kw)
        xs.append(guide_inputs(sim, g.bin_factor, g.bands))
        us.append(g.space.to_unconstrained({s.name: tr.nodes[s.name]["value"] for s in g.space.sites}))
    x = {key: None if xs[0][key] is None else torch.cat([p[key] for p in xs]) for key in xs[0]}
    z_std = (torch.cat(us) - g.theta_shift) / g.theta_scale
    n_valid = max(1, n_sims // 10)
    opt = torch.optim.Adam(g.parameters(), lr=lr)
    best, best_epoch, best_state, epoch = math.inf, 0, None, 0

    def nll(rows):
        part = {key: None if v is None else v[rows] for key, v in x.items()}
        return -g.flow(g.encoder(**part)).log_prob(z_std[rows]).mean()

    bar = tqdm(total=max_epochs, disable=not progress, desc="VAE encoder on simulations")
    for epoch in range(1, max_epochs + 1):
        order = n_valid + torch.randperm(n_sims - n_valid, generator=gen)
        for i in range(0, len(order), batch_size):
            loss = nll(order[i:i + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            valid = float(nll(torch.arange(n_valid)))
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


def _site_scale(fn) -> torch.Tensor:
    while not hasattr(fn, "scale") and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn.scale.detach()


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
