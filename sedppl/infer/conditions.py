"""Observing conditions drawn at training time: noise level, masks, missing bands.

One amortized posterior must serve galaxies observed at any S/N, with masked
pixels and missing bands. At every epoch, each noise-free simulation of a bank
gets new conditions drawn from :class:`ObservingConditions`, and noise drawn from
the same noise model the Pyro program uses (:mod:`sedppl.noise`): Gaussian with
the reported inverse variance, plus the photometric floor in quadrature.

The reported noise scales with the noise-free flux through a random S/N (log-
uniform over a wide range, with independent offsets per band and a smooth
random tilt across the spectrum), so the inverse variance given to the network
carries almost no information about the flux beyond what the data carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..noise import photometry_sigma


@dataclass
class ObservingConditions:
    """Ranges of the conditions a posterior is trained for (and warns outside of).

    Attributes:
        snr_spectrum: (low, high) median S/N per native spectral pixel, log-uniform.
        spectrum_tilt: Largest change of log10 sigma across the spectrum (a random
            smooth tilt and curvature, e.g. sky and throughput), dex.
        bin_factor: Native pixels per bin of the binned spectrum (the S/N per bin
            is sqrt(bin_factor) times that per pixel).
        masked_fraction: Largest fraction of the spectrum masked in one random
            contiguous stretch (drawn for a third of the galaxies), plus 1% of
            random single bins for every galaxy.
        edge_fraction: Largest fraction of the spectrum masked at its blue end and,
            independently, at its red end (each drawn for a third of the galaxies): a
            spectrograph that covers less than the model's grid (e.g. SDSS's 3800-9200 A
            on DESI's 3600-9824 A grid). 0 for none.
        snr_photometry: (low, high) S/N per band, log-uniform, with an independent
            offset of up to +-0.5 dex per band.
        missing_band_probability: Chance that each band is missing (ivar 0).
        no_photometry_probability: Chance that a galaxy has no photometry at all (for
            models with a spectrum: trains the posterior to serve spectra alone).
        photometry_floor: Fractional systematic error of the model's likelihood
            (added to the noise, not to the reported ivar).
    """

    snr_spectrum: tuple[float, float] = (0.5, 30.0)
    spectrum_tilt: float = 0.3
    bin_factor: int = 8
    masked_fraction: float = 0.1
    edge_fraction: float = 0.0
    snr_photometry: tuple[float, float] = (5.0, 200.0)
    missing_band_probability: float = 0.1
    no_photometry_probability: float = 0.0
    photometry_floor: float = 0.0

    def spectrum(self, flux: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Noisy binned spectrum and its reported ivar (0 = masked) for noise-free binned ``flux`` (N, Mb)."""
        n, m = flux.shape
        lo, hi = torch.log(torch.tensor(self.snr_spectrum))
        snr = torch.exp(lo + (hi - lo) * torch.rand(n, 1, generator=gen))
        x = torch.linspace(-1, 1, m)
        a, b = (torch.rand(2, n, 1, generator=gen) * 2 - 1) * 0.5 * self.spectrum_tilt
        shape = 10 ** (a * x + b * (x**2 - 1 / 3))
        sigma_pix = flux.abs().median(-1, keepdim=True).values.clamp(min=1e-30) / snr * shape
        ivar = self.bin_factor / sigma_pix**2
        valid = torch.rand(n, m, generator=gen) > 0.01
        start = torch.rand(n, 1, generator=gen)
        width = torch.rand(n, 1, generator=gen) * self.masked_fraction
        chunk = (x[None] + 1) / 2
        stretch = (chunk >= start) & (chunk < start + width) & (torch.rand(n, 1, generator=gen) < 1 / 3)
        valid &= ~stretch
        if self.edge_fraction > 0:
            cut = torch.rand(n, 2, generator=gen) * self.edge_fraction * (torch.rand(n, 2, generator=gen) < 1 / 3)
            valid &= (chunk >= cut[:, :1]) & (chunk <= 1 - cut[:, 1:])
        noisy = flux + torch.randn(flux.shape, generator=gen) / torch.sqrt(ivar)
        ivar = torch.where(valid, ivar, torch.zeros_like(ivar))
        return torch.where(valid, noisy, torch.zeros_like(noisy)), ivar

    def photometry(self, flux: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Noisy band fluxes (N, K) and reported ivar (0 = missing) for noise-free ``flux`` (nanomaggies)."""
        n, k = flux.shape
        lo, hi = torch.log10(torch.tensor(self.snr_photometry))
        level = lo + (hi - lo) * torch.rand(n, 1, generator=gen)
        snr = 10 ** (level + (torch.rand(n, k, generator=gen) - 0.5)).clamp(min=1.0)
        ivar = (snr / flux.abs().clamp(min=1e-30)) ** 2
        sigma = photometry_sigma(flux, ivar, self.photometry_floor)
        noisy = flux + sigma * torch.randn(flux.shape, generator=gen)
        present = torch.rand(n, k, generator=gen) >= self.missing_band_probability
        # keep at least one band (unless the galaxy has no photometry at all, below)
        present[torch.arange(n), torch.randint(0, k, (n,), generator=gen)] = True
        if self.no_photometry_probability > 0:
            present &= torch.rand(n, 1, generator=gen) >= self.no_photometry_probability
        ivar = torch.where(present, ivar, torch.zeros_like(ivar))
        return torch.where(present, noisy, torch.zeros_like(noisy)), ivar
