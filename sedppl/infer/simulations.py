"""Training simulations for amortized inference, drawn from a model's own Pyro program.

A *bank* holds noise-free prior-predictive simulations: for each draw, the
latent sites (unconstrained, see :mod:`sedppl.infer.parameters`), the redshift,
the noise-free spectrum (binned, see :func:`bin_spectrum`) and band fluxes, read
from the means of the model's ``spectrum`` and ``photometry`` observe sites.
Noise, masks and missing bands are drawn afresh at every training epoch by
:mod:`sedppl.infer.conditions`.

Why a stored bank and fresh noise, rather than fresh simulations every epoch:
the physics (synthesis, dust, redshift, instrument) is the expensive part of a
simulation (~0.3 ms a galaxy for the photometry-only zoo model, ~4 ms for
the DESI-like spectrum on this 2-core CPU), while the noise is nearly free; a
bank is simulated once, in chunks written atomically so an interrupted run
resumes, and every epoch still sees new noise, masks and S/N.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import Tensor

from ..cache import load_npz, save_npz
from ..noise import site_mean
from .parameters import ParameterSpace


def bin_spectrum(flux: Tensor, ivar: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Inverse-variance weighted means over ``factor`` adjacent pixels.

    For Gaussian pixel noise the binned flux has inverse variance sum(ivar) over
    the bin, so a bank binned from noise-free spectra and noise drawn at the
    binned ivar match an observed spectrum binned here.

    Arguments:
        flux: (..., M) any flux unit; pixels with ivar = 0 do not count.
        ivar: (..., M) inverse variance (0 = masked).
        factor: Pixels per bin; a remainder at the red end is dropped.

    Returns:
        (flux (..., M // factor), ivar (..., M // factor)); empty bins have flux 0, ivar 0.
    """
    m = (flux.shape[-1] // factor) * factor
    f = flux[..., :m].reshape(*flux.shape[:-1], -1, factor)
    w = ivar[..., :m].reshape(*ivar.shape[:-1], -1, factor)
    wsum = w.sum(-1)
    mean = torch.where(wsum > 0, (torch.nan_to_num(f) * w).sum(-1) / wsum.clamp(min=1e-30), torch.zeros_like(wsum))
    return mean, wsum


@dataclass
class Bank:
    """Noise-free simulations.

    Attributes:
        theta: (N, D) unconstrained latent values.
        redshift: (N,) redshift of each draw.
        spectrum: (N, Mb) binned noise-free spectrum (model's flux unit), or None.
        photometry: (N, K) noise-free band fluxes (nanomaggies), or None.
    """

    theta: Tensor
    redshift: Tensor
    spectrum: Tensor | None
    photometry: Tensor | None

    def __len__(self) -> int:
        return self.theta.shape[0]

    def split(self, n_valid: int) -> tuple["Bank", "Bank"]:
        """(training, validation): the last ``n_valid`` draws validate."""
        def cut(sl):
            pick = (lambda t: None if t is None else t[sl])
            return Bank(self.theta[sl], self.redshift[sl], pick(self.spectrum), pick(self.photometry))
        return cut(slice(0, len(self) - n_valid)), cut(slice(len(self) - n_valid, len(self)))

    def concat(self, other: "Bank") -> "Bank":
        """This bank's draws followed by ``other``'s."""
        def cat(a, b):
            return None if a is None else torch.cat([a, b])
        return Bank(torch.cat([self.theta, other.theta]), torch.cat([self.redshift, other.redshift]),
                    cat(self.spectrum, other.spectrum), cat(self.photometry, other.photometry))


def simulate_chunk(model, space: ParameterSpace, n: int, seed: int, z_range: tuple[float, float] | None,
                   bin_factor: int = 1, log_z: bool = False) -> dict[str, np.ndarray]:
    """One chunk of prior-predictive simulations as arrays.

    Arguments:
        model: Pyro program ``model(obs=None, n_galaxies=n, redshift=z)``.
        space: Its latent sites.
        n: Draws.
        seed: Seed of this chunk.
        z_range: Redshifts are drawn uniformly in this range and passed to the
            model; None when the model samples its own ``redshift`` site.
        bin_factor: Spectral pixels per bin.
        log_z: Draw the redshifts uniformly in log z instead (denser at low z, where the
            flux per unit mass changes fastest with z); needs ``z_range[0] > 0``.

    Returns:
        {"theta", "redshift", and "spectrum" and/or "photometry"}.
    """
    pyro.set_rng_seed(seed)
    kwargs = {}
    if z_range is not None:
        gen = torch.Generator().manual_seed(seed + 104729)
        u = torch.rand(n, generator=gen)
        if log_z:
            if z_range[0] <= 0:
                raise ValueError(f"log-uniform redshifts need z_range[0] > 0, got {z_range}")
            lo, hi = np.log(z_range[0]), np.log(z_range[1])
            kwargs["redshift"] = torch.exp(lo + (hi - lo) * u).clamp(z_range[0], z_range[1])
        else:
            kwargs["redshift"] = z_range[0] + (z_range[1] - z_range[0]) * u
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(n_galaxies=n, **kwargs)
    values = {s.name: tr.nodes[s.name]["value"] for s in space.sites}
    z = kwargs["redshift"] if z_range is not None else tr.nodes["redshift"]["value"]
    out = {"theta": space.to_unconstrained(values).numpy(), "redshift": z.float().numpy()}
    if "spectrum" in tr.nodes:
        spec = site_mean(tr.nodes["spectrum"])
        out["spectrum"] = bin_spectrum(spec, torch.ones_like(spec), bin_factor)[0].numpy()
    if "photometry" in tr.nodes:
        out["photometry"] = site_mean(tr.nodes["photometry"]).numpy()
    if "spectrum" not in out and "photometry" not in out:
        raise ValueError("the model has neither a 'spectrum' nor a 'photometry' observe site")
    return out


def simulate_bank(model, space: ParameterSpace, n: int, seed: int, z_range: tuple[float, float] | None,
                  bin_factor: int = 1, chunk: int = 1000, folder: str | Path | None = None,
                  progress: bool = True, log_z: bool = False) -> Bank:
    """Simulate ``n`` draws in chunks; with ``folder``, each chunk is saved atomically and reused on resume.

    ``log_z`` draws the redshifts log-uniformly (see :func:`simulate_chunk`); its
    chunks are saved under their own names and use their own seeds.

    Draws whose simulation is not finite (e.g. overflow at extreme parameters)
    are dropped, and the count is reported by a warning.
    """
    from tqdm.auto import tqdm

    chunks = []
    n_chunks = -(-n // chunk)
    for i in tqdm(range(n_chunks), disable=not progress, desc="simulating" + (" (log z)" if log_z else "")):
        m = min(chunk, n - i * chunk)
        tag = "_logz" if log_z else ""
        path = None if folder is None else Path(folder) / f"sims_{seed}_{i:05d}_{m}_{bin_factor}{tag}.npz"
        arrays = None if path is None else load_npz(path)
        if arrays is None:
            chunk_seed = (seed * 100_003 + i + (50_021 if log_z else 0)) % 2**31
            arrays = simulate_chunk(model, space, m, chunk_seed, z_range, bin_factor, log_z)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_npz(path, **arrays)
        chunks.append(arrays)
    cat = {k: torch.as_tensor(np.concatenate([c[k] for c in chunks])) for k in chunks[0]}
    ok = torch.isfinite(cat["theta"]).all(-1)
    for key in ("spectrum", "photometry"):
        if key in cat:
            ok &= torch.isfinite(cat[key]).all(-1)
    if not ok.all():
        import warnings
        warnings.warn(f"dropped {int((~ok).sum())} of {len(ok)} simulations with non-finite values")
    cat = {k: v[ok] for k, v in cat.items()}
    return Bank(cat["theta"], cat["redshift"], cat.get("spectrum"), cat.get("photometry"))
