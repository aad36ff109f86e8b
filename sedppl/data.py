"""The Observation container: what a model conditions on, validated on creation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def _tensor(x, dtype=torch.float32) -> Tensor | None:
    return None if x is None else torch.as_tensor(np.asarray(x), dtype=dtype)


@dataclass
class Observation:
    """One galaxy, or a batch sharing a wavelength grid and bands.

    Arguments:
        redshift: Spectroscopic redshift, () or (B,); None to let a model sample it.
        wave: Observed wavelengths, (M,), vacuum Angstrom, strictly increasing.
        flux: Spectrum, (M,) or (B, M), 1e-17 erg/s/cm^2/A.
        ivar: Its inverse variance, same shape, (1e-17 erg/s/cm^2/A)^-2; 0 = no data.
        mask: Optional boolean, same shape; False drops a pixel.
        resolution: Optional DESI-layout resolution data, (M,)-wide: (2H+1, M) or (B, 2H+1, M).
        bands: Filter names of the photometry.
        band_flux: (K,) or (B, K) nanomaggies; band_ivar: same shape, nmgy^-2 (0 = missing band).
        name: Label(s) for outputs.
    """

    redshift: Tensor | float | None = None
    wave: Tensor | None = None
    flux: Tensor | None = None
    ivar: Tensor | None = None
    mask: Tensor | None = None
    resolution: Tensor | None = None
    bands: list[str] = field(default_factory=list)
    band_flux: Tensor | None = None
    band_ivar: Tensor | None = None
    name: str | list[str] = "galaxy"

    def __post_init__(self) -> None:
        self.redshift = _tensor(self.redshift)
        self.wave = _tensor(self.wave, torch.float64)
        self.flux, self.ivar = _tensor(self.flux), _tensor(self.ivar)
        self.mask = None if self.mask is None else torch.as_tensor(np.asarray(self.mask), dtype=torch.bool)
        self.resolution = _tensor(self.resolution)
        self.band_flux, self.band_ivar = _tensor(self.band_flux), _tensor(self.band_ivar)
        self.bands = list(self.bands)
        self.validate()

    @property
    def has_spectrum(self) -> bool:
        """True when the observation carries a spectrum (``flux``)."""
        return self.flux is not None

    @property
    def has_photometry(self) -> bool:
        """True when the observation carries band fluxes (``band_flux``, nanomaggies)."""
        return self.band_flux is not None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem if the data cannot be fitted."""
        if not self.has_spectrum and not self.has_photometry:
            raise ValueError("the observation has neither a spectrum nor photometry")
        if self.redshift is not None:
            if torch.any(~torch.isfinite(self.redshift)) or torch.any(self.redshift < 0):
                raise ValueError(f"redshift must be finite and >= 0, got {self.redshift}")
        if self.has_spectrum:
            if self.wave is None or self.ivar is None:
                raise ValueError("a spectrum needs wave and ivar")
            if self.wave.ndim != 1 or self.flux.shape[-1] != self.wave.shape[0] or self.ivar.shape != self.flux.shape:
                raise ValueError(f"mismatched shapes: wave {tuple(self.wave.shape)}, flux {tuple(self.flux.shape)}, "
                                 f"ivar {tuple(self.ivar.shape)}")
            if torch.any(~torch.isfinite(self.wave)) or torch.any(torch.diff(self.wave) <= 0):
                raise ValueError("wavelengths must be finite and strictly increasing")
            if torch.any(self.ivar < 0) or torch.any(torch.isnan(self.ivar)):
                raise ValueError("inverse variance must be >= 0 (negative or NaN ivar found)")
            used = self.ivar > 0
            if self.mask is not None:
                if self.mask.shape != self.flux.shape:
                    raise ValueError("mask must have the shape of flux")
                used = used & self.mask
            if torch.any(~torch.isfinite(self.flux) & used):
                raise ValueError("NaN or infinite flux in pixels with ivar > 0 (mask them or set ivar = 0)")
            if torch.any(used.sum(-1) == 0):
                raise ValueError("every pixel of a spectrum is masked (ivar = 0 or mask False)")
        if self.has_photometry:
            if self.band_ivar is None or self.band_ivar.shape != self.band_flux.shape:
                raise ValueError("band_flux needs band_ivar of the same shape")
            if self.band_flux.shape[-1] != len(self.bands):
                raise ValueError(f"{self.band_flux.shape[-1]} band fluxes for {len(self.bands)} bands")
            if torch.any(self.band_ivar < 0) or torch.any(torch.isnan(self.band_ivar)):
                raise ValueError("band inverse variance must be >= 0")
            if torch.any(~torch.isfinite(self.band_flux) & (self.band_ivar > 0)):
                raise ValueError("NaN or infinite band flux with band_ivar > 0")

    def on_grid(self, wave) -> "Observation":
        """The same observation with its spectrum rebinned onto ``wave`` ((M,), vacuum Angstrom).

        Information-conserving (see :func:`sedppl.resample.rebin_spectrum`); pixels of the new
        grid outside the spectrum's coverage get ivar 0. The mask is applied before rebinning;
        a per-galaxy resolution matrix (tied to the old pixels) is dropped.
        """
        from .resample import rebin_spectrum

        if not self.has_spectrum:
            raise ValueError("the observation has no spectrum to rebin")
        ivar = self.ivar if self.mask is None else torch.where(self.mask, self.ivar, torch.zeros_like(self.ivar))
        flux, ivar = rebin_spectrum(self.wave, self.flux, ivar, torch.as_tensor(np.asarray(wave, float)))
        return Observation(redshift=self.redshift, wave=wave, flux=flux, ivar=ivar, bands=self.bands,
                           band_flux=self.band_flux, band_ivar=self.band_ivar, name=self.name)

    @property
    def n_galaxies(self) -> int:
        """Galaxies in the batch (1 for an unbatched observation)."""
        x = self.flux if self.has_spectrum else self.band_flux
        return x.shape[0] if x.ndim == 2 else 1

    def tile(self, n: int) -> "Observation":
        """The batch repeated ``n`` times, galaxy index fastest: galaxy g of copy c is row
        ``c * n_galaxies + g`` (e.g. one copy per MCMC chain)."""
        if n < 1:
            raise ValueError(f"tile needs n >= 1, got {n}")
        g = self.n_galaxies

        def rep(t, event_dims):
            if t is None:
                return None
            if t.ndim == event_dims:  # unbatched: one galaxy
                t = t[None]
            if t.shape[0] != g:
                raise ValueError(f"a field has {t.shape[0]} rows for {g} galaxies")
            return t.repeat((n,) + (1,) * event_dims)

        names = self.name if isinstance(self.name, list) else [self.name] * g
        z = None if self.redshift is None else self.redshift.expand(g) if self.redshift.ndim == 0 else self.redshift
        return Observation(redshift=rep(z, 0), wave=self.wave, flux=rep(self.flux, 1),
                           ivar=rep(self.ivar, 1), mask=rep(self.mask, 1), resolution=rep(self.resolution, 2),
                           bands=self.bands, band_flux=rep(self.band_flux, 1), band_ivar=rep(self.band_ivar, 1),
                           name=names * n)

    def select(self, index) -> "Observation":
        """The galaxies ``index`` (row numbers, a list or a 1-D tensor) of the batch, as a batch."""
        g = self.n_galaxies
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.min() < -g or idx.max() >= g):
            raise IndexError(f"galaxy index out of range for a batch of {g}")

        def rows(t, event_dims):
            if t is None:
                return None
            if t.ndim == event_dims:  # unbatched: one galaxy
                t = t[None]
            return t[idx]

        names = self.name if isinstance(self.name, list) else [self.name] * g
        z = None if self.redshift is None else self.redshift.expand(g) if self.redshift.ndim == 0 else self.redshift
        return Observation(redshift=rows(z, 0), wave=self.wave, flux=rows(self.flux, 1), ivar=rows(self.ivar, 1),
                           mask=rows(self.mask, 1), resolution=rows(self.resolution, 2), bands=self.bands,
                           band_flux=rows(self.band_flux, 1), band_ivar=rows(self.band_ivar, 1),
                           name=[names[i] for i in idx.tolist()])

    @classmethod
    def concat(cls, observations: list["Observation"]) -> "Observation":
        """One batch of the galaxies of several observations, in order (e.g. one SDSS spec file each).

        Every part must hold the same kind of data: spectra on the same wavelength grid
        (vacuum Angstrom) and the same bands, redshifts given for all or for none. A mask
        present in some parts only keeps every pixel of the others; resolution data are
        kept only when every part has them with the same width (else dropped, with a warning:
        the model's own resolution applies).

        Raises:
            ValueError naming the first part that does not match the first.
        """
        if not observations:
            raise ValueError("concat needs at least one observation")
        first = observations[0]
        for i, o in enumerate(observations[1:], 1):
            if o.has_spectrum != first.has_spectrum or o.has_photometry != first.has_photometry:
                raise ValueError(f"observation {i} holds other data (spectrum {o.has_spectrum}, photometry "
                                 f"{o.has_photometry}) than observation 0 ({first.has_spectrum}, {first.has_photometry})")
            if first.has_spectrum and (o.wave.shape != first.wave.shape or not torch.allclose(o.wave, first.wave)):
                raise ValueError(f"observation {i} has another wavelength grid than observation 0; put both on one "
                                 "grid first (Observation.on_grid)")
            if list(o.bands) != list(first.bands):
                raise ValueError(f"observation {i} has bands {o.bands}, observation 0 {first.bands}")
            if (o.redshift is None) != (first.redshift is None):
                raise ValueError(f"observation {i} {'lacks' if o.redshift is None else 'has'} a redshift and "
                                 f"observation 0 {'has' if o.redshift is None else 'lacks'} one")
        parts = [o.select(list(range(o.n_galaxies))) for o in observations]  # each a batch (B_i, ...)

        def stack(name, fill=None):
            v = [getattr(p, name) for p in parts]
            if all(t is None for t in v):
                return None
            if any(t is None for t in v):
                if fill is None:
                    return None
                v = [fill(p) if t is None else t for p, t in zip(parts, v)]
            return torch.cat(v)

        keep_all = (lambda p: torch.ones_like(p.flux, dtype=torch.bool))  # noqa: E731
        resolution = None
        if all(p.resolution is not None for p in parts) and len({p.resolution.shape[1:] for p in parts}) == 1:
            resolution = stack("resolution")
        elif any(p.resolution is not None for p in parts):
            warnings.warn("resolution data missing or of different widths in some observations: dropped for all")
        names = [n for p in parts for n in p.name]
        return cls(redshift=stack("redshift"), wave=first.wave, flux=stack("flux"), ivar=stack("ivar"),
                   mask=stack("mask", keep_all), resolution=resolution, bands=first.bands,
                   band_flux=stack("band_flux"), band_ivar=stack("band_ivar"), name=names)

    def check_bands(self, model_bands: list[str]) -> None:
        """Raise ``ValueError`` if the observation's bands differ from a model's."""
        if self.has_photometry and list(self.bands) != list(model_bands):
            missing = [b for b in self.bands if b not in model_bands]
            raise ValueError(f"the model has bands {model_bands}; the observation has {self.bands}"
                             + (f" (the model lacks {missing})" if missing else ""))
