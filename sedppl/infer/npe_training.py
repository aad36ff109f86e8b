"""Training a neural posterior from a model's prior predictive, resumable, with progress.

Steps: read the model's latent sites; simulate a bank of noise-free draws (in
chunks saved atomically, see :mod:`sedppl.infer.simulations`); standardise the
unconstrained parameters and the input amplitudes; then minimise the negative
log density of the true parameters under the flow, with new noise, masks and
missing bands every epoch (:mod:`sedppl.infer.conditions`), AdamW, a learning
rate halved when the validation loss stalls, and early stopping. The validation
set is a fixed noisy draw of held-out simulations. A checkpoint (state dicts
read back with ``weights_only=True``) is written every epoch, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .conditions import ObservingConditions
from .encoder import scale_free
from .npe import NeuralPosterior, PosteriorCard
from .parameters import ParameterSpace
from .simulations import Bank, simulate_bank


def noisy_inputs(bank: Bank, conditions: ObservingConditions, gen: torch.Generator,
                 redshift_given: bool) -> dict[str, torch.Tensor | None]:
    """Network inputs for a bank with freshly drawn noise, masks and missing bands."""
    x: dict[str, torch.Tensor | None] = {"spectrum": None, "spectrum_ivar": None, "photometry": None,
                                         "photometry_ivar": None, "redshift": None}
    if bank.spectrum is not None:
        x["spectrum"], x["spectrum_ivar"] = conditions.spectrum(bank.spectrum, gen)
    if bank.photometry is not None:
        x["photometry"], x["photometry_ivar"] = conditions.photometry(bank.photometry, gen)
    if redshift_given:
        x["redshift"] = bank.redshift
    return x


def _rows(x: dict, idx: torch.Tensor) -> dict:
    return {k: None if v is None else v[idx] for k, v in x.items()}


def train_npe(model, out: str | Path, n_sims: int = 100_000, n_valid: int = 5_000, *, model_name: str | None = None,
              z_range: tuple[float, float] | None = None, redshift_given: bool = True,
              conditions: ObservingConditions | None = None, seed: int = 0, batch_size: int = 256,
              lr: float = 1e-3, patience: int = 15, max_epochs: int = 200, context: int = 64,
              transforms: int = 6, hidden: tuple[int, int] = (128, 128), conditional_affine: bool = True,
              whiten: bool = True, chunk: int = 1000,
              progress: bool = True) -> NeuralPosterior:
    """Train (or resume training) a neural posterior for ``model`` and save it with its card.

    Arguments:
        model: Pyro program ``model(obs=None, n_galaxies=n, redshift=z)`` with ``spectrum``
            and/or ``photometry`` observe sites (a zoo model or a user's own).
        out: Path of the posterior (``.safetensors`` + ``.json``); a sibling ``.ckpt``
            folder holds the simulations and checkpoint for resuming.
        n_sims: Simulations in all (training + validation).
        n_valid: Held-out simulations for validation and early stopping.
        model_name: Name on the card (default: the model's class or function name).
        z_range: Redshift range of the draws (default: the model's ``forward_model.z_range``).
        redshift_given: Condition on the redshift (spectroscopic z known); False makes
            the model sample ``redshift`` and the posterior infer it.
        conditions: Observing conditions to train for (default :class:`ObservingConditions`,
            with the model's ``photometry_floor``).
        seed: Seed of simulations, noise and initialisation.
        batch_size, lr, patience, max_epochs: Optimisation.
        context, transforms, hidden: Sizes of the encoder output and of the flow.
        conditional_affine: Start the flow with a context-predicted affine map (sharper
            posteriors at high S/N for the same training budget).
        whiten: Prior-whitened flow coordinates (:mod:`sedppl.infer.whitening`).
        chunk: Simulations per chunk.

    Returns:
        The trained posterior (best validation loss), also saved at ``out``.
    """
    from tqdm.auto import tqdm

    out = Path(out).with_suffix(".safetensors")
    ckpt = out.with_suffix(".ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    if z_range is None:
        z_range = tuple(float(v) for v in model.forward_model.z_range)
    if conditions is None:
        conditions = ObservingConditions(photometry_floor=float(getattr(model, "photometry_floor", 0.0)))
    kw = {"redshift": float(np.mean(z_range))} if redshift_given else {}
    space = ParameterSpace.from_model(model, whiten=whiten, **kw)
    t_sim = time.perf_counter()
    bank = simulate_bank(model, space, n_sims, seed, z_range if redshift_given else None,
                         conditions.bin_factor, chunk, ckpt / "simulations", progress)
    t_sim = time.perf_counter() - t_sim  # on a resume, only the chunks simulated now
    train, valid = bank.split(min(n_valid, len(bank) // 5))
    fm = getattr(model, "forward_model", None)
    wave = [] if bank.spectrum is None else [float(w) for w in fm.wave_obs]
    card = PosteriorCard(model=model_name or getattr(model, "__name__", type(model).__name__),
                         sites=[[s.name, list(s.event_shape)] for s in space.sites],
                         bands=list(getattr(model, "bands", [])) if bank.photometry is not None else [],
                         wave=wave, bin_factor=conditions.bin_factor, redshift_range=list(z_range),
                         redshift_given=redshift_given, conditions=asdict(conditions), context=context,
                         transforms=transforms, hidden=list(hidden), conditional_affine=conditional_affine,
                         whiten=whiten, n_train=len(train), n_valid=len(valid))
    torch.manual_seed(seed)
    post = NeuralPosterior(card, model)
    # robust standardisation: heavy-tailed priors (e.g. Student-t SFR ratios) have huge sds
    q = torch.quantile(train.theta, torch.tensor([0.25, 0.5, 0.75]), dim=0)
    post.theta_shift.copy_(q[1])
    post.theta_scale.copy_(((q[2] - q[0]) / 1.349).clamp(min=1e-6))
    gen = torch.Generator().manual_seed(seed + 1)
    x_valid = noisy_inputs(valid, conditions, gen, redshift_given)
    _set_input_ranges(post, noisy_inputs(train, conditions, gen, redshift_given))
    z_valid = (valid.theta - post.theta_shift) / post.theta_scale
    z_train = (train.theta - post.theta_shift) / post.theta_scale

    opt = torch.optim.AdamW(post.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, patience // 3))
    meta = {"epoch": 0, "best": float("inf"), "stale": 0, "seconds": 0.0}
    state_file = ckpt / "state.pt"
    best = {k: v.clone() for k, v in post.state_dict().items()}
    if state_file.exists():
        saved = torch.load(state_file, weights_only=True)
        post.load_state_dict(saved["current"])
        best = saved["best"]
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        meta = json.loads((ckpt / "state.json").read_text())
    bar = tqdm(total=max_epochs, initial=meta["epoch"], disable=not progress, desc="training posterior")
    while meta["epoch"] < max_epochs and meta["stale"] < patience:
        t_epoch = time.perf_counter()
        # noise and batches depend only on (seed, epoch): a resumed run sees what an uninterrupted one does
        g = torch.Generator().manual_seed(seed * 1_000_003 + 17 + meta["epoch"])
        x_train = noisy_inputs(train, conditions, g, redshift_given)
        perm = torch.randperm(len(train), generator=g)
        post.train()
        for i in range(0, len(train), batch_size):
            idx = perm[i:i + batch_size]
            loss = -post.log_prob_standard(z_train[idx], post.context(_rows(x_train, idx))).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(post.parameters(), 5.0)
            opt.step()
        post.eval()
        with torch.no_grad():
            val = float(torch.cat([-post.log_prob_standard(z_valid[i:i + 4096],
                                                           post.context(_rows(x_valid, slice(i, i + 4096))))
                                   for i in range(0, len(valid), 4096)]).mean())
        sched.step(val)
        meta["epoch"] += 1
        meta["seconds"] += time.perf_counter() - t_epoch
        if val < meta["best"]:
            meta["best"], meta["stale"] = val, 0
            best = {k: v.clone() for k, v in post.state_dict().items()}
        else:
            meta["stale"] += 1
        tmp = state_file.with_suffix(".tmp")
        torch.save({"current": post.state_dict(), "best": best, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict()}, tmp)
        tmp.replace(state_file)
        (ckpt / "state.json").write_text(json.dumps(meta))
        bar.set_postfix(val=f"{val:.3f}", best=f"{meta['best']:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        bar.update(1)
    bar.close()
    post.load_state_dict(best)
    post.eval()
    card.epochs, card.valid_loss = meta["epoch"], meta["best"]
    card.train_seconds = round(meta["seconds"], 1)
    card.simulation_seconds = round(t_sim, 1)
    post.save(out)
    return post


def _set_input_ranges(post: NeuralPosterior, x: dict) -> None:
    """Standardisation of the input amplitudes and the 0.1-99.9% ranges for out-of-distribution checks."""
    rng = post.log_scale_range.clone()
    for j, key in enumerate(("spectrum", "photometry")):
        if x[key] is None:
            continue
        keep = (x[f"{key}_ivar"] > 0).any(-1)  # galaxies drawn without photometry do not count
        ch, ls = scale_free(x[key][keep], x[f"{key}_ivar"][keep])
        post.encoder.scale_shift[j] = ls.mean()
        post.encoder.scale_sd[j] = ls.std().clamp(min=1e-3)
        rng[:, j] = torch.quantile(ls, torch.tensor([0.001, 0.999]))
        if key == "photometry":
            r = ch[:, 0]
            valid = x["photometry_ivar"][keep] > 0
            lo = [torch.quantile(r[valid[:, b], b], 0.001) for b in range(r.shape[1])]
            hi = [torch.quantile(r[valid[:, b], b], 0.999) for b in range(r.shape[1])]
            post.band_ratio_range.copy_(torch.tensor([lo, hi]))
    post.log_scale_range.copy_(rng)
