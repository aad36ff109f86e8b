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
from .npe import NeuralPosterior
from .parameters import ParameterSpace
from .posterior_card import PosteriorCard
from .simulations import Bank, simulate_bank
from .splines import use_fast_splines


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
              interleaved_transforms: int = 0, whiten: bool = True, chunk: int = 1000, n_sims_log_z: int = 0,
              distance_inputs: bool = False,
              init_from: str | Path | None = None, schedule: str = "plateau",
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
        interleaved_transforms: Further coupling transforms whose groups are the even and the odd
            parameters (:func:`sedppl.infer.npe.interleaved_coupling`); they start as the identity,
            so they can be added in a warm-start stage.
        whiten: Prior-whitened flow coordinates (:mod:`sedppl.infer.whitening`).
        chunk: Simulations per chunk.
        n_sims_log_z: Further simulations with redshifts drawn uniformly in log z (denser
            at low z; the training distribution of a condition does not bias the posterior,
            it only sets where the network learns well).
        distance_inputs: Give the encoder log10 z and distance-corrected amplitudes.
        init_from: A trained posterior of the same model and layout whose weights start
            this training (warm start; inputs it lacks start with zero weight, so the
            starting network computes what it did). Its coordinate standardisation is kept.
        schedule: ``"plateau"``: the learning rate halves when the validation loss stalls for
            ``patience // 3`` epochs, and training stops after ``patience`` stale epochs;
            ``"cosine"``: it falls from ``lr`` to ``lr / 1000`` along a cosine over all
            ``max_epochs`` epochs (stepped per batch), all of which run; the best epoch is kept
            (a fine-tuning stage after a warm start, e.g. on a larger bank).

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
    n_valid = min(n_valid, len(bank) // 5)
    train, valid = bank.split(n_valid)
    if n_sims_log_z:
        if not redshift_given:
            raise ValueError("n_sims_log_z needs a given redshift (redshift_given=True)")
        extra = simulate_bank(model, space, n_sims_log_z, seed, z_range, conditions.bin_factor, chunk,
                              ckpt / "simulations", progress, log_z=True)
        # validation draws from both, in proportion
        n_valid_log = max(1, round(n_valid * len(extra) / (len(bank) + len(extra))))
        train, valid = bank.split(n_valid - n_valid_log)
        extra_train, extra_valid = extra.split(n_valid_log)
        train, valid = train.concat(extra_train), valid.concat(extra_valid)
    t_sim = time.perf_counter() - t_sim  # on a resume, only the chunks simulated now
    fm = getattr(model, "forward_model", None)
    wave = [] if bank.spectrum is None else [float(w) for w in fm.wave_obs]
    card = PosteriorCard(model=model_name or getattr(model, "__name__", type(model).__name__),
                         sites=[[s.name, list(s.event_shape)] for s in space.sites],
                         bands=list(getattr(model, "bands", [])) if bank.photometry is not None else [],
                         wave=wave, bin_factor=conditions.bin_factor, redshift_range=list(z_range),
                         redshift_given=redshift_given, conditions=asdict(conditions), context=context,
                         transforms=transforms, hidden=list(hidden), conditional_affine=conditional_affine,
                         interleaved_transforms=interleaved_transforms,
                         whiten=whiten, distance_inputs=distance_inputs, n_sims_log_z=n_sims_log_z,
                         initialised_from=_describe(init_from), schedule=schedule, lr=lr,
                         n_train=len(train), n_valid=len(valid))
    torch.manual_seed(seed)
    post = NeuralPosterior(card, model)
    # robust standardisation: heavy-tailed priors (e.g. Student-t SFR ratios) have huge sds
    q = torch.quantile(train.theta, torch.tensor([0.25, 0.5, 0.75]), dim=0)
    post.theta_shift.copy_(q[1])
    post.theta_scale.copy_(((q[2] - q[0]) / 1.349).clamp(min=1e-6))
    gen = torch.Generator().manual_seed(seed + 1)
    x_valid = noisy_inputs(valid, conditions, gen, redshift_given)
    _set_input_ranges(post, noisy_inputs(train, conditions, gen, redshift_given))
    if init_from is not None:
        _warm_start(post, Path(init_from).with_suffix(".safetensors"))
    z_valid = (valid.theta - post.theta_shift) / post.theta_scale
    z_train = (train.theta - post.theta_shift) / post.theta_scale

    opt = torch.optim.AdamW(post.parameters(), lr=lr, weight_decay=1e-5)
    if schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, patience // 3))
    elif schedule == "cosine":
        steps = max_epochs * -(-len(train) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 1e-3)
        patience = max_epochs + 1  # every epoch runs
    else:
        raise ValueError(f"schedule must be 'plateau' or 'cosine', not {schedule!r}")
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
    elif init_from is not None:
        # the starting network is the one to beat: a fine-tuning stage never returns a worse one
        meta["best"] = meta["start"] = _valid_loss(post, z_valid, x_valid)
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
            if schedule == "cosine":
                sched.step()
        val = _valid_loss(post, z_valid, x_valid)
        if schedule == "plateau":
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
    use_fast_splines(post.flow)  # for drawing; training ran on zuko's own spline (same function)
    card.epochs, card.valid_loss = meta["epoch"], meta["best"]
    card.start_valid_loss = meta.get("start", float("nan"))
    card.train_seconds = round(meta["seconds"], 1)
    card.total_train_seconds = round(meta["seconds"] + _earlier_seconds(init_from), 1)
    card.simulation_seconds = round(t_sim, 1)
    post.save(out)
    return post


def _valid_loss(post: NeuralPosterior, z_valid: torch.Tensor, x_valid: dict) -> float:
    """Mean -log q of the standardised validation theta (nats), in blocks of 4,096."""
    post.eval()
    with torch.no_grad():
        return float(torch.cat([-post.log_prob_standard(z_valid[i:i + 4096],
                                                        post.context(_rows(x_valid, slice(i, i + 4096))))
                                for i in range(0, len(z_valid), 4096)]).mean())


def _start_card(init_from: str | Path | None) -> dict | None:
    """The card (JSON) of a warm start's posterior, or None without a warm start or a card."""
    card = None if init_from is None else Path(init_from).with_suffix(".json")
    return json.loads(card.read_text()) if card is not None and card.exists() else None


def _describe(init_from: str | Path | None) -> str:
    """The card's record of a warm start: file, checksum and that posterior's own budget."""
    if init_from is None:
        return ""
    c = _start_card(init_from)
    if c is None:
        return Path(init_from).name
    return (f"{Path(init_from).name} (sha256 {c.get('sha256', '')[:12]}: {c.get('n_train', 0)} training simulations, "
            f"{c.get('epochs', 0)} epochs, {c.get('train_seconds', 0)} s)")


def _earlier_seconds(init_from: str | Path | None) -> float:
    """Seconds of optimisation behind a warm start's posterior (its card's total, else its last stage's)."""
    c = _start_card(init_from) or {}
    return float(c.get("total_train_seconds") or c.get("train_seconds") or 0.0)


def _warm_start(post: NeuralPosterior, path: Path) -> None:
    """Copy the weights of a trained posterior into ``post``; a linear layer that gained
    inputs keeps the old columns and starts the new ones at zero. The base's width refitted
    after the old training (``base_scale``) is not copied: training fits the flow with the
    standard base, and the card's ``base_scale`` must describe the saved weights. Weights
    with no place in ``post`` (a start with more transforms) are an error, never dropped."""
    from safetensors.torch import load_file

    old = load_file(path)
    state = post.state_dict()
    unplaced = sorted(k for k in old if k not in state)
    if unplaced:  # e.g. a start with interleaved transforms that this posterior lacks
        raise ValueError(f"cannot start from {path}: {len(unplaced)} of its weights have no place in this "
                         f"posterior (first: {unplaced[0]}); it has more transforms than this one "
                         f"(interleaved_transforms, --interleaved) or is of another architecture")
    for key, new in state.items():
        if key not in old or key in ("log_scale_range", "band_ratio_range", "flow.base.scale"):
            continue
        w = old[key]
        if w.shape == new.shape:
            state[key] = w.clone()
        elif w.dim() == 2 and w.shape[0] == new.shape[0] and w.shape[1] < new.shape[1]:
            grown = torch.zeros_like(new)
            grown[:, :w.shape[1]] = w
            state[key] = grown
        else:
            raise ValueError(f"cannot start from {path}: {key} has shape {tuple(w.shape)}, "
                             f"this posterior needs {tuple(new.shape)}")
    post.load_state_dict(state)


def _set_input_ranges(post: NeuralPosterior, x: dict) -> None:
    """Standardisation of the input amplitudes and the 0.1-99.9% ranges for out-of-distribution checks."""
    rng = post.log_scale_range.clone()
    for j, key in enumerate(("spectrum", "photometry")):
        if x[key] is None:
            continue
        keep = (x[f"{key}_ivar"] > 0).any(-1)  # galaxies drawn without photometry do not count
        if not torch.any(keep):  # e.g. no_photometry_probability = 1: trained for spectra alone
            continue
        ch, ls = scale_free(x[key][keep], x[f"{key}_ivar"][keep])
        post.encoder.scale_shift[j] = ls.mean()
        post.encoder.scale_sd[j] = ls.std().clamp(min=1e-3)
        if post.encoder.distance_inputs:
            lum = post.encoder.luminosities([(j, ls, None)], x["redshift"][keep])[0][1]
            post.encoder.luminosity_shift[j] = lum.mean()
            post.encoder.luminosity_sd[j] = lum.std().clamp(min=1e-3)
        rng[:, j] = torch.quantile(ls, torch.tensor([0.001, 0.999]))
        if key == "photometry":
            r = ch[:, 0]
            valid = x["photometry_ivar"][keep] > 0
            lo = [torch.quantile(r[valid[:, b], b], 0.001) for b in range(r.shape[1])]
            hi = [torch.quantile(r[valid[:, b], b], 0.999) for b in range(r.shape[1])]
            post.band_ratio_range.copy_(torch.tensor([lo, hi]))
    post.log_scale_range.copy_(rng)
