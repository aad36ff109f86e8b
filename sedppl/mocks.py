"""Mock observations drawn from a model's own prior, with survey-like noise.

A mock is one run of the Pyro program with no data: the latent sites are the
truth, the noise-free spectrum and photometry are the means of the observe
sites, and Gaussian noise is added at a stated signal-to-noise ratio. The same
mocks serve the recovery and calibration tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .data import Observation


@dataclass
class Mock:
    """Mock galaxies with their truth.

    Attributes:
        obs: The noisy observation (what a fit sees).
        truth: {site: value} of every latent and deterministic site, leading dim = galaxies.
        spectrum: Noise-free model spectrum, (N, M), 1e-17 erg/s/cm^2/A (None without a spectrum).
        photometry: Noise-free band fluxes, (N, K), nanomaggies.
    """

    obs: Observation
    truth: dict[str, Tensor]
    spectrum: Tensor | None
    photometry: Tensor | None


def make_mocks(model, n: int, seed: int, redshift: float | Tensor | None = 0.1,
               snr_spectrum: float = 3.0, snr_photometry: float = 30.0,
               site_values: dict[str, Tensor] | None = None) -> Mock:
    """Draw ``n`` mock galaxies from ``model``'s prior and add noise.

    Spectral noise is white with sigma = median(noise-free flux) / ``snr_spectrum``
    per pixel (DESI BGS spectra have a median S/N of a few per 0.8 A pixel);
    photometric noise has sigma = flux / ``snr_photometry`` per band.

    Arguments:
        model: A zoo model (or any program with ``spectrum``/``photometry`` observe sites
            and the signature ``model(obs=None, n_galaxies=n, redshift=z)``).
        n: Number of galaxies.
        seed: Random seed (fixes truth and noise).
        redshift: Fixed redshift(s); None lets a model that samples z draw it.
        snr_spectrum: Median S/N per spectral pixel.
        snr_photometry: S/N per band.
        site_values: Optional fixed values {site: (N, ...) tensor} for some latents.

    Returns:
        :class:`Mock`.
    """
    pyro.set_rng_seed(seed)
    run = model if site_values is None else poutine.condition(model, data=site_values)
    tr = poutine.trace(run).get_trace(n_galaxies=n, redshift=redshift)
    truth = {name: site["value"].detach() for name, site in tr.nodes.items()
             if site["type"] == "sample" and not site_is_subsample(site)
             and (not site["is_observed"] or site["infer"].get("_deterministic", False))}
    gen = torch.Generator().manual_seed(seed + 7919)
    spec = phot = None
    kw = {}
    if "spectrum" in tr.nodes:
        spec = _mean(tr.nodes["spectrum"])
        sigma = spec.median(-1, keepdim=True).values.abs() / snr_spectrum
        ivar = (1 / sigma**2).expand_as(spec).clone()
        kw.update(wave=_wave(model), flux=spec + sigma * torch.randn(spec.shape, generator=gen), ivar=ivar)
    if "photometry" in tr.nodes:
        phot = _mean(tr.nodes["photometry"])
        sigma = phot.abs() / snr_photometry
        kw.update(bands=list(model.bands), band_flux=phot + sigma * torch.randn(phot.shape, generator=gen),
                  band_ivar=1 / sigma**2)
    z = truth.get("redshift") if redshift is None else torch.as_tensor(redshift, dtype=torch.float32).expand(n)
    obs = Observation(redshift=None if redshift is None else z, **kw)
    if redshift is None:
        truth.setdefault("redshift", z)
    return Mock(obs=obs, truth=truth, spectrum=spec, photometry=phot)


def _mean(site) -> Tensor:
    fn = site["fn"]
    while not hasattr(fn, "loc") and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn.loc.detach()


def galaxy(mock: Mock, i: int) -> Mock:
    """The ``i``-th galaxy of a batch of mocks, as a batch of one."""
    o = mock.obs
    pick = (lambda t: None if t is None else t[i:i + 1])
    obs = Observation(redshift=pick(o.redshift), wave=o.wave, flux=pick(o.flux), ivar=pick(o.ivar),
                      mask=pick(o.mask), bands=o.bands, band_flux=pick(o.band_flux), band_ivar=pick(o.band_ivar))
    return Mock(obs=obs, truth={k: v[i:i + 1] for k, v in mock.truth.items()},
                spectrum=pick(mock.spectrum), photometry=pick(mock.photometry))


def _wave(model):
    fm = getattr(model, "forward_model", None)
    return None if fm is None else getattr(fm, "wave_obs", None)
