"""Mock observations drawn from a model's own prior, with survey-like noise.

A mock is one run of the Pyro program with no data: the latent sites are the
truth, the noise-free spectrum and photometry are the means of the observe
sites, and Gaussian noise is added at a stated signal-to-noise ratio. The same
mocks serve the recovery and calibration tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .data import Observation
from .noise import site_mean


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
        spec = site_mean(tr.nodes["spectrum"])
        sigma = spec.median(-1, keepdim=True).values.abs() / snr_spectrum
        ivar = (1 / sigma**2).expand_as(spec).clone()
        kw.update(wave=_wave(model), flux=spec + sigma * torch.randn(spec.shape, generator=gen), ivar=ivar)
    if "photometry" in tr.nodes:
        phot = site_mean(tr.nodes["photometry"])
        sigma = phot.abs() / snr_photometry
        kw.update(bands=list(model.bands), band_flux=phot + sigma * torch.randn(phot.shape, generator=gen),
                  band_ivar=1 / sigma**2)
    z = truth.get("redshift") if redshift is None else torch.as_tensor(redshift, dtype=torch.float32).expand(n)
    obs = Observation(redshift=None if redshift is None else z, **kw)
    if redshift is None:
        truth.setdefault("redshift", z)
    return Mock(obs=obs, truth=truth, spectrum=spec, photometry=phot)


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


def write_mocks(mock: Mock, path: str | Path, model_name: str = "") -> Path:
    """Write mocks to one FITS file, atomically.

    HDUs: ``TRUTH`` (a row per galaxy: every latent and derived site; vector sites
    as array columns), ``PHOTOMETRY`` (``flux``, ``ivar`` (N, K) nanomaggies, and the
    noise-free ``model``; band names in the header as BAND0, BAND1, ...), and for
    spectra ``WAVELENGTH`` (vacuum A), ``FLUX``, ``IVAR``, ``MODEL`` (1e-17 erg/s/cm^2/A).
    Read back with :func:`read_mocks`.
    """
    from astropy.io import fits
    from astropy.table import Table

    path = Path(path)
    obs = mock.obs
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["MODEL"] = model_name
    hdus[0].header["ZFIXED"] = (obs.redshift is not None, "redshift given to fits (else inferred)")
    truth = Table({k: v.numpy() for k, v in mock.truth.items()})
    if obs.redshift is not None and "redshift" not in truth.colnames:
        truth["redshift"] = obs.redshift.numpy()
    hdus.append(fits.table_to_hdu(truth))
    hdus[-1].name = "TRUTH"
    if obs.has_photometry:
        ph = fits.table_to_hdu(Table({"flux": obs.band_flux.numpy(), "ivar": obs.band_ivar.numpy(),
                                      "model": mock.photometry.numpy()}))
        ph.name = "PHOTOMETRY"
        for i, b in enumerate(obs.bands):
            ph.header[f"BAND{i}"] = b
        hdus.append(ph)
    if obs.has_spectrum:
        for name, arr in (("WAVELENGTH", obs.wave), ("FLUX", obs.flux), ("IVAR", obs.ivar), ("MODEL", mock.spectrum)):
            hdus.append(fits.ImageHDU(arr.numpy(), name=name))
    tmp = path.with_name(path.name + ".tmp")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    tmp.replace(path)
    return path


def read_mocks(path: str | Path) -> Mock:
    """Read mocks written by :func:`write_mocks`."""
    from astropy.io import fits
    from astropy.table import Table

    with fits.open(path) as h:
        names = {x.name for x in h}
        if "TRUTH" not in names:
            raise ValueError(f"{path}: not a sedppl mock file (no TRUTH HDU)")
        truth_t = Table.read(h["TRUTH"])
        native = (lambda a: torch.as_tensor(np.asarray(a).astype(np.asarray(a).dtype.newbyteorder("="))))  # noqa: E731
        truth = {k: native(truth_t[k]) for k in truth_t.colnames}
        kw: dict = {"redshift": truth.get("redshift") if h[0].header.get("ZFIXED", True) else None}
        spec = phot = None
        if "PHOTOMETRY" in names:
            ph = h["PHOTOMETRY"]
            t = Table.read(ph)
            n_band = t["flux"].shape[1]
            kw.update(bands=[ph.header[f"BAND{i}"] for i in range(n_band)], band_flux=np.asarray(t["flux"]).astype(np.float32),
                      band_ivar=np.asarray(t["ivar"]).astype(np.float32))
            phot = native(t["model"])
        if "FLUX" in names:
            kw.update(wave=np.asarray(h["WAVELENGTH"].data, dtype=np.float64), flux=np.asarray(h["FLUX"].data).astype(np.float32),
                      ivar=np.asarray(h["IVAR"].data).astype(np.float32))
            spec = native(h["MODEL"].data)
    return Mock(obs=Observation(**kw), truth=truth, spectrum=spec, photometry=phot)
