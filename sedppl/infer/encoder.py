"""Embedding networks: observed data (flux, ivar, masks, redshift) -> a context vector for the flow.

Inputs are made scale-free before the networks see them. A spectrum is divided
by its inverse-variance weighted mean flux s (floored at twice its standard
error, so faint noisy spectra stay finite); each pixel then gives three
channels: flux / s, log(s * sqrt(ivar)) (the S/N scale), and a validity flag
(masked pixels are zero in all three). Photometry is treated alike with the
mean of the valid band fluxes. log10 s of each, and the scaled redshift when it
is given, enter as scalars. Amplitudes (hence masses) are learned from log10 s.

With ``distance_inputs`` (and a given redshift), three more scalars enter: log10 z
scaled over the trained range, and each amplitude corrected for distance,
log10 s + 2 log10 d_L(z) (a log luminosity, up to (1+z) terms). Without them a
network must learn that the flux per unit mass changes by 0.6 dex between
z = 0.002 and 0.004 from a linear z input, which it does not (nearby galaxies
came out 4-5x too bright).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def amplitude(flux: Tensor, ivar: Tensor, allow_empty: bool = False) -> Tensor:
    """Per-galaxy flux scale s (N,) of fluxes with inverse variance (the unit of the fluxes).

    s is the plain mean of the valid values (the inverse-variance weighted mean where that is not
    positive), floored at twice its standard error and at 1e-30; 1 for a galaxy with no valid value.

    Arguments:
        flux: (N, L) any flux unit; values where ivar = 0 are ignored.
        ivar: (N, L) inverse variance, 0 = masked or missing.
        allow_empty: Accept galaxies with no valid value; otherwise they raise ``ValueError``
            (not checked inside ``torch.compile``: there the caller checks first).

    Returns:
        s (N,).
    """
    return _amplitude(flux, ivar, allow_empty)[0]


def _amplitude(flux: Tensor, ivar: Tensor, allow_empty: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`amplitude`, with the validity mask (N, L) and the fluxes zeroed where invalid (N, L)."""
    valid = ivar > 0
    f = torch.where(valid, flux, torch.zeros_like(flux))
    wsum = ivar.sum(-1)
    empty = wsum <= 0
    # inside torch.compile the caller has checked (NeuralPosterior.inputs): a data-dependent branch would
    # split the compiled graph
    if not allow_empty and not torch.compiler.is_compiling() and torch.any(empty):
        raise ValueError("a galaxy has no valid pixels or bands (all ivar = 0)")
    wsum = torch.where(empty, torch.ones_like(wsum), wsum)
    mean = (f * ivar).sum(-1) / wsum
    # plain mean (not ivar-weighted) of the valid values, floored by its standard error
    n_valid = valid.sum(-1).clamp(min=1)
    plain = f.sum(-1) / n_valid
    err = torch.sqrt(torch.where(valid, 1 / ivar.clamp(min=1e-30), torch.zeros_like(ivar)).sum(-1)) / n_valid
    s = torch.maximum(torch.where(plain > 0, plain, mean), 2 * err).clamp(min=1e-30)
    return torch.where(empty, torch.ones_like(s), s), valid, f


def scale_free(flux: Tensor, ivar: Tensor, allow_empty: bool = False) -> tuple[Tensor, Tensor]:
    """Per-galaxy channels (N, 3, L) and log10 scale (N,) of fluxes with inverse variance.

    Arguments:
        flux: (N, L) any flux unit; values where ivar = 0 are ignored.
        ivar: (N, L) inverse variance, 0 = masked or missing.
        allow_empty: Accept galaxies with no valid value (all channels 0, log10 scale 0:
            e.g. a spectrum without photometry); otherwise they raise ``ValueError``.

    Returns:
        (channels, log10 scale): channels are flux / s, log(s sqrt(ivar)) and the
        validity flag, zero where invalid; s from :func:`amplitude`.
    """
    s, valid, f = _amplitude(flux, ivar, allow_empty)
    scaled = (f / s[:, None]).clamp(-50, 50)
    snr = torch.where(valid, torch.log(s[:, None] * torch.sqrt(ivar.clamp(min=1e-30))).clamp(-10, 15),
                      torch.zeros_like(ivar))
    return torch.stack([scaled, snr, valid.float()], dim=1), torch.log10(s)


class SpectrumEncoder(nn.Module):
    """1D convolutional encoder of a binned spectrum's channels (N, 3, L) -> (N, out).

    Arguments:
        length: L, bins of the spectrum.
        out: Size of the embedding.
        channels: Channels of the convolutional stages (each halves the length).
    """

    def __init__(self, length: int, out: int = 64, channels: tuple[int, ...] = (16, 32, 32, 64, 64)):
        super().__init__()
        layers, c_in, n = [], 3, length
        for c in channels:
            layers += [nn.Conv1d(c_in, c, 5, padding=2), nn.GELU(), nn.MaxPool1d(2)]
            c_in, n = c, n // 2
        if n < 1:
            raise ValueError(f"a spectrum of {length} bins is too short for {len(channels)} pooling stages")
        self.conv = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * n, 256), nn.GELU(), nn.Linear(256, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x))


class DataEncoder(nn.Module):
    """Context for the flow from spectrum and/or photometry and redshift.

    Arguments:
        spectrum_bins: Bins of the binned spectrum, or 0 for photometry only.
        n_bands: Number of bands, or 0 for a spectrum only.
        redshift_range: (low, high) when the redshift is given (a condition), None when inferred.
        out: Size of the context vector.
        distance_inputs: Add log10 z and the distance-corrected amplitudes as inputs
            (needs a given redshift with low > 0).
    """

    def __init__(self, spectrum_bins: int, n_bands: int, redshift_range: tuple[float, float] | None,
                 out: int = 64, distance_inputs: bool = False):
        super().__init__()
        if distance_inputs and (redshift_range is None or redshift_range[0] <= 0):
            raise ValueError("distance inputs need a given redshift range with a positive lower end")
        self.distance_inputs = distance_inputs
        self.spectrum = SpectrumEncoder(spectrum_bins, out) if spectrum_bins else None
        self.photometry = (nn.Sequential(nn.Linear(3 * n_bands, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                                         nn.Linear(128, out)) if n_bands else None)
        self.redshift_range = redshift_range
        n_scalar = int(bool(spectrum_bins)) + int(bool(n_bands)) + int(redshift_range is not None)
        if distance_inputs:
            from ..cosmology import Cosmology

            # not a submodule: its tables are not part of the weights
            self.__dict__["_cosmology"] = Cosmology(z_max=max(2.0, 1.5 * redshift_range[1]))
            n_scalar += 1 + int(bool(spectrum_bins)) + int(bool(n_bands))
            # standardisation of the distance-corrected log amplitudes, set from the training bank
            self.register_buffer("luminosity_shift", torch.zeros(2))
            self.register_buffer("luminosity_sd", torch.ones(2))
        width = out * (int(bool(spectrum_bins)) + int(bool(n_bands))) + n_scalar
        self.mix = nn.Sequential(nn.Linear(width, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, out))
        # standardisation of the log10 scales, set from the training bank
        self.register_buffer("scale_shift", torch.zeros(2))
        self.register_buffer("scale_sd", torch.ones(2))

    def forward(self, spectrum: Tensor | None = None, spectrum_ivar: Tensor | None = None,
                photometry: Tensor | None = None, photometry_ivar: Tensor | None = None,
                redshift: Tensor | None = None) -> Tensor:
        """Arguments: binned spectrum and ivar (N, L); band fluxes and ivar (N, K) nanomaggies; redshift (N,).
        Returns: context (N, out)."""
        parts, scalars, amplitudes = [], [], []
        if self.spectrum is not None:
            ch, ls = scale_free(spectrum, spectrum_ivar)
            parts.append(self.spectrum(ch))
            scalars.append((ls - self.scale_shift[0]) / self.scale_sd[0])
            amplitudes.append((0, ls, None))
        if self.photometry is not None:
            # with a spectrum, the photometry may be missing altogether (all ivar 0)
            ch, ls = scale_free(photometry, photometry_ivar, allow_empty=self.spectrum is not None)
            parts.append(self.photometry(ch.flatten(1)))
            scalars.append((ls - self.scale_shift[1]) / self.scale_sd[1])
            amplitudes.append((1, ls, (photometry_ivar > 0).any(-1)))
        if self.redshift_range is not None:
            if redshift is None:
                raise ValueError("this posterior is conditioned on the redshift: give it")
            lo, hi = self.redshift_range
            scalars.append((redshift - lo) / (hi - lo) * 2 - 1)
            if self.distance_inputs:
                llo, lhi = np.log10(lo), np.log10(hi)
                scalars.append((torch.log10(redshift.clamp(min=lo)) - llo) / (lhi - llo) * 2 - 1)
                for j, lum in self.luminosities(amplitudes, redshift):
                    scalars.append((lum - self.luminosity_shift[j]) / self.luminosity_sd[j])
        return self.mix(torch.cat(parts + [torch.stack(scalars, -1)], -1))

    def luminosities(self, amplitudes: list, redshift: Tensor) -> list[tuple[int, Tensor]]:
        """[(0 spectrum | 1 photometry, log10 s + 2 log10 d_L(z) / Mpc)]; 0 where a galaxy has no photometry."""
        two_log_dl = 2 * torch.log10(self._cosmology.luminosity_distance(redshift.double()).float())
        out = []
        for j, ls, present in amplitudes:
            lum = ls + two_log_dl
            if present is not None:
                lum = torch.where(present, lum, self.luminosity_shift[j].expand_as(lum))
            out.append((j, lum))
        return out
