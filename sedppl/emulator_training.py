"""Training an emulator from any simulator and prior, resumable, with progress.

A *simulator* is a callable theta (N, D) -> (log_flux (N, L), scalars (N, S)):
the exact synthesis of a model by default, or anything else (e.g. FSPS run
elsewhere). A *prior* is a callable (n, generator) -> theta (n, D).

Training: draw the sets, fit the PCA on the training log spectra, then Adam on
the mean squared error of the rebuilt log spectrum and scalars through a schedule of
(learning rate, batch size) stages, each ending by early stopping on the
validation loss (or stages whose rate decays along a cosine over a fixed number
of epochs), on the CPU or a GPU. A checkpoint (safetensors) is written at every epoch, so a
run interrupted at any point resumes where it stopped (at a stage boundary the
result is identical to an uninterrupted run; within a stage Adam's moment
estimates restart).

References:
    Alsing et al. 2020, ApJS 249, 5 (Speculator; learning-rate / batch-size schedule).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .emulator import EmulatorCard, SpectrumEmulator, fractional_errors

Simulator = Callable[[Tensor], tuple[Tensor, Tensor]]
Prior = Callable[[int, torch.Generator], Tensor]

#: Largest training matrix (spectra x pixels) whose PCA is an exact SVD; larger ones use a randomized SVD.
EXACT_SVD_MAX = 100_000_000
DEFAULT_SCHEDULE = ((1e-3, 256), (3e-4, 1024), (1e-4, 2048), (3e-5, 4096))


def simulate(simulator: Simulator, theta: Tensor, chunk: int = 500, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Run ``simulator`` on ``theta`` in chunks (bounded memory), without gradients."""
    from tqdm.auto import tqdm

    logs, scalars = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(theta), chunk), disable=not progress, desc="simulating"):
            lf, sc = simulator(theta[i:i + chunk])
            logs.append(lf.float())
            scalars.append(sc.float().reshape(len(lf), -1))
    log_flux, sc = torch.cat(logs), torch.cat(scalars)
    if not torch.isfinite(log_flux).all():
        raise ValueError("the simulator returned non-finite log fluxes (zero or negative flux?)")
    return log_flux, sc


def fit_pca(emu: SpectrumEmulator, theta: Tensor, log_flux: Tensor, scalars: Tensor) -> None:
    """Set the emulator's standardisations and PCA basis (one per wavelength chunk) from a training set."""
    k = emu.card.n_components
    x = emu.features(theta)
    emu.param_shift.copy_(x.mean(0))
    emu.param_scale.copy_(x.std(0).clamp(min=1e-8))
    emu.log_mean.copy_(log_flux.mean(0))
    emu.log_sd.copy_(log_flux.std(0).clamp(min=1e-8))
    z = (log_flux - emu.log_mean) / emu.log_sd
    blend = emu.blend_weights().float()
    emu.basis.zero_()
    for c, (lo, hi) in enumerate(emu.spans()):
        emu.basis[c * k:(c + 1) * k, lo:hi] = _principal_components(z[:, lo:hi], k) * blend[c, lo:hi]
    out = torch.cat([emu.project(z), scalars], dim=1)
    emu.out_shift.copy_(out.mean(0))
    emu.out_scale.copy_(out.std(0).clamp(min=1e-8))


def _principal_components(z: Tensor, k: int) -> Tensor:
    """The first k principal directions (k, L) of the rows of z (N, L), float32."""
    if z.numel() <= EXACT_SVD_MAX:
        _, _, vh = torch.linalg.svd(z.double(), full_matrices=False)
        return vh[:k].float()
    # large sets (e.g. 50,000 spectra x 11,700 pixels): randomized SVD, Halko et al. 2011
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    _, _, v = torch.svd_lowrank(z, q=k + 32, niter=6)
    torch.random.set_rng_state(gen_state)
    return v[:, :k].T.float()


def _targets(emu: SpectrumEmulator, log_flux: Tensor, scalars: Tensor) -> Tensor:
    z = (log_flux - emu.log_mean) / emu.log_sd
    return (torch.cat([emu.project(z), scalars], dim=1) - emu.out_shift) / emu.out_scale


def train_emulator(simulator: Simulator, prior: Prior, card: EmulatorCard, out: str | Path,
                   n_train: int = 50_000, n_valid: int = 5_000, seed: int = 0,
                   schedule: tuple[tuple[float, ...], ...] = DEFAULT_SCHEDULE, patience: int = 20,
                   max_epochs: int = 500, progress: bool = True, device: str | torch.device = "cpu") -> SpectrumEmulator:
    """Train (or resume training) an emulator and save it with its card.

    Arguments:
        simulator: theta (N, D) -> (log flux (N, L) natural log, scalars (N, S)).
        prior: (n, generator) -> theta (n, D) draws covering the box in ``card``.
        card: Names, ranges, wavelengths and sizes (n_components, hidden).
        out: Path of the emulator (``.safetensors`` + ``.json``); a sibling
            ``*.ckpt`` folder keeps the simulations and checkpoint for resuming.
        n_train, n_valid: Set sizes.
        seed: Seed of the draws and of the network initialisation.
        schedule: Stages of (learning rate, batch size), or (learning rate, batch size, final
            learning rate) for a cosine decay over ``max_epochs`` (see :func:`fit_network`).
        patience: Epochs without validation improvement that end a stage.
        max_epochs: Cap on epochs per stage.
        progress: Show progress bars.
        device: Where the network is fitted (e.g. ``"cuda"``); simulation, PCA and the saved
            emulator stay on the CPU. The fit is not bitwise the same on another device.

    Returns:
        The trained emulator (best validation loss), on the CPU, also saved at ``out``.
    """
    from safetensors.torch import load_file, save_file

    out = Path(out).with_suffix(".safetensors")
    ckpt = out.with_suffix(".ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    data_file = ckpt / "data.safetensors"
    if data_file.exists():
        data = load_file(str(data_file))
    else:
        gen = torch.Generator().manual_seed(seed)
        theta = prior(n_train + n_valid, gen).float()
        log_flux, scalars = simulate(simulator, theta, progress=progress)
        data = {"theta": theta, "log_flux": log_flux, "scalars": scalars}
        save_file(data, str(ckpt / "data.tmp"))
        (ckpt / "data.tmp").replace(data_file)
    theta, log_flux, scalars = data["theta"], data["log_flux"], data["scalars"]
    card.n_train, card.n_valid = n_train, n_valid
    torch.manual_seed(seed)
    emu = SpectrumEmulator(card)
    fit_pca(emu, theta[:n_train], log_flux[:n_train], scalars[:n_train])
    with torch.no_grad():
        x_tr, x_va = emu.standardise(theta[:n_train]), emu.standardise(theta[n_train:])
    y_all = _targets(emu, log_flux, scalars)
    y_tr, y_va = y_all[:n_train], y_all[n_train:]
    fit_network(emu, *(t.to(device) for t in (x_tr, y_tr, x_va, y_va)), schedule=schedule, patience=patience,
                max_epochs=max_epochs, seed=seed, checkpoint=ckpt, progress=progress)
    emu.cpu()
    with torch.no_grad():
        pred, sc = emu(theta[n_train:], check=False)
    err = fractional_errors(pred, log_flux[n_train:])
    card.accuracy = accuracy_summary(err, np.asarray(card.wave))
    card.accuracy["scalars_max_abs"] = float((sc - scalars[n_train:]).abs().max()) if sc.numel() else 0.0
    emu.save(out)
    return emu


def fit_network(emu: SpectrumEmulator, x_tr: Tensor, y_tr: Tensor, x_va: Tensor, y_va: Tensor,
                schedule: tuple[tuple[float, ...], ...] = DEFAULT_SCHEDULE, patience: int = 20,
                max_epochs: int = 500, seed: int = 0, checkpoint: str | Path | None = None,
                progress: bool = True) -> float:
    """Fit an emulator's network(s) to standardised targets, on the device the tensors are on.

    Arguments:
        emu: The emulator, its PCA and standardisations already set (:func:`fit_pca`); it is moved
            to the device of ``x_tr`` and left with its best weights (lowest validation loss).
        x_tr, x_va: Standardised network inputs, (N, D + n G) (:meth:`SpectrumEmulator.standardise`).
        y_tr, y_va: Standardised targets, (N, C K + S): PCA coefficients, then scalars.
        schedule: Stages, each ``(learning rate, batch size)``, ending by early stopping after
            ``patience`` epochs without improvement or at ``max_epochs``; or ``(learning rate, batch
            size, final learning rate)``: the rate falls along a cosine to the final one over
            ``max_epochs`` epochs, which all run.
        patience, max_epochs: Early stopping and the cap on epochs, per stage.
        seed: Seed of the batch order (it depends only on seed, stage and epoch).
        checkpoint: Folder for the resumable state (``state.safetensors``, ``state.json``); None: none.
        progress: Show a progress bar per stage.

    Returns:
        The best validation loss: mean square error of the rebuilt natural-log spectrum per pixel
        plus that of the scalars.
    """
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    emu.to(x_tr.device)
    loss_fn = _loss_function(emu)
    meta = {"stage": 0, "epoch": 0, "best": float("inf"), "stale": 0}
    best_state = {k: v.clone() for k, v in emu.state_dict().items()}
    state_file = meta_file = None
    if checkpoint is not None:
        state_file, meta_file = Path(checkpoint) / "state.safetensors", Path(checkpoint) / "state.json"
        if state_file.exists() and meta_file.exists():
            meta = json.loads(meta_file.read_text())
            saved = load_file(str(state_file), device=str(x_tr.device))
            emu.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("curr.")})
            best_state = {k[5:]: v for k, v in saved.items() if k.startswith("best.")}
    n_train = len(x_tr)
    for stage in range(meta["stage"], len(schedule)):
        lr, batch, *final = schedule[stage]
        opt = torch.optim.Adam(emu.mlp.parameters(), lr=lr)
        bar = tqdm(total=max_epochs, initial=meta["epoch"], disable=not progress, desc=f"stage {stage + 1}/{len(schedule)}")
        while meta["epoch"] < max_epochs and (final or meta["stale"] < patience):
            if final:
                for group in opt.param_groups:
                    group["lr"] = cosine_rate(lr, final[0], meta["epoch"], max_epochs)
            # batches depend only on (seed, stage, epoch), so a resumed run sees what an uninterrupted one does
            gen = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + meta["epoch"])
            perm = torch.randperm(n_train, generator=gen).to(x_tr.device)
            emu.mlp.train()
            for i in range(0, n_train, batch):
                idx = perm[i:i + batch]
                loss = loss_fn(emu.network(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            emu.mlp.eval()
            with torch.no_grad():
                val = float(loss_fn(emu.network(x_va), y_va))
            meta["epoch"] += 1
            if val < meta["best"]:
                meta["best"], meta["stale"] = val, 0
                best_state = {k: v.clone() for k, v in emu.state_dict().items()}
            else:
                meta["stale"] += 1
            _checkpoint(emu, best_state, meta, state_file, meta_file)
            bar.set_postfix(val=f"{val:.2e}", best=f"{meta['best']:.2e}")
            bar.update(1)
        bar.close()
        emu.load_state_dict(best_state)  # next stage starts from the best so far
        meta.update(stage=stage + 1, epoch=0, stale=0)
        _checkpoint(emu, best_state, meta, state_file, meta_file)
    emu.load_state_dict(best_state)
    return meta["best"]


def cosine_rate(start: float, end: float, epoch: int, n_epochs: int) -> float:
    """Learning rate of a cosine decay from ``start`` (epoch 0) to ``end`` (epoch ``n_epochs`` - 1)."""
    frac = min(epoch / max(n_epochs - 1, 1), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * frac))


def _loss_function(emu: SpectrumEmulator) -> Callable[[Tensor, Tensor], Tensor]:
    """Mean squared error of the rebuilt log spectrum (natural log, i.e. ~fractional flux error) over
    pixels, plus that of the scalars: PCA components weigh by what they carry.

    With d the error of the standardised coefficients, the spectrum's error is
    (d * scale) @ basis * sd per pixel; its mean square over L pixels is the quadratic form
    d G d / L with G = diag(scale) basis diag(sd^2) basis^T diag(scale), (C K, C K) for C
    wavelength chunks, computed once, so a training step costs O((C K)^2) rather than O(C K L)
    per spectrum."""
    k = emu.card.n_components * emu.n_chunks
    basis = emu.basis.double() * emu.log_sd.double()
    scale = emu.out_scale[:k].double()
    gram = (scale[:, None] * (basis @ basis.T) * scale[None, :] / basis.shape[1]).float()
    scalar_scale = emu.out_scale[k:]

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        d = pred - target
        value = ((d[:, :k] @ gram) * d[:, :k]).sum(1).mean()
        if d.shape[1] > k:
            value = value + torch.mean((d[:, k:] * scalar_scale) ** 2)
        return value

    return loss


def _checkpoint(emu, best_state, meta, state_file: Path | None, meta_file: Path | None) -> None:
    """Write the current and best weights and the progress; nothing when there is no checkpoint folder."""
    from safetensors.torch import save_file

    if state_file is None:
        return
    tensors = {f"curr.{k}": v.detach().contiguous() for k, v in emu.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().contiguous() for k, v in best_state.items()})
    save_file(tensors, str(state_file.with_suffix(".tmp")))
    state_file.with_suffix(".tmp").replace(state_file)
    meta_file.write_text(json.dumps(meta))


def accuracy_summary(frac_err: np.ndarray, wave: np.ndarray,
                     chunks: tuple[float, ...] = (1000, 2000, 4000, 7000, 10000, 30000, 60000)) -> dict:
    """Median and 99th percentile of |delta f / f| overall and per wavelength chunk (Angstrom)."""
    summary = {"median_abs_frac": float(np.median(frac_err)), "p99_abs_frac": float(np.percentile(frac_err, 99))}
    for lo, hi in zip(chunks[:-1], chunks[1:]):
        sel = (wave >= lo) & (wave < hi)
        if sel.any():
            e = frac_err[:, sel]
            summary[f"{lo:.0f}-{hi:.0f}A"] = {"median": float(np.median(e)), "p99": float(np.percentile(e, 99))}
    return summary
