"""A learned multiplicative correction to the rest-frame SED: what the SPS model cannot express.

The correction is smooth by construction: a network maps a few latent variables
per galaxy (``n_latent``; none for one correction shared by all) to the natural log
of the factor at ``n_knots`` knots uniform in ln(lambda), which is interpolated
linearly in ln(lambda) onto any rest-frame grid. Beyond the knots it tapers to 0
(a factor of 1) over one knot spacing, so bands outside the wavelengths the
training spectra covered (e.g. WISE for an optical spectrum) are left to the physics.

The correction multiplies the rest-frame SED before redshifting
(``ForwardModel(..., rest_factor=...)``), so redshift stays inside the causal
structure: one rest-frame defect appears at (1 + z) lambda in every galaxy.
:mod:`sedppl.infer.vae` learns it as the data-driven part of a VAE's decoder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RestFrameResidual(nn.Module):
    """ln(factor) at knots in rest-frame ln(lambda), from latent variables.

    Arguments:
        wave_range: (low, high) rest-frame wavelengths of the first and last knots,
            vacuum Angstrom.
        n_knots: Knots, uniform in ln(lambda) (their spacing sets the narrowest feature).
        n_latent: Latent variables per galaxy (standard normal prior in
            :class:`sedppl.infer.vae.ResidualModel`); 0 for one correction shared by all.
        hidden: Hidden widths of the network (latent -> ln factor at the knots).
        remove_trend: Project ln(factor) at the knots onto the complement of a constant and a
            straight line in ln(lambda): a correction's overall level and tilt are degenerate with
            the stellar mass and the dust, which the physics owns; the residual keeps the shapes
            the physics cannot make.

    The network's last layer starts at zero, so an untrained residual is exactly 1.
    """

    def __init__(self, wave_range: tuple[float, float] = (2000.0, 10000.0), n_knots: int = 32,
                 n_latent: int = 2, hidden: tuple[int, ...] = (64, 64), remove_trend: bool = True):
        super().__init__()
        lo, hi = float(wave_range[0]), float(wave_range[1])
        if not (0 < lo < hi):
            raise ValueError(f"wave_range must be 0 < low < high (Angstrom), got {wave_range}")
        if n_knots < 2:
            raise ValueError(f"n_knots must be >= 2, got {n_knots}")
        if n_latent < 0:
            raise ValueError(f"n_latent must be >= 0, got {n_latent}")
        self.n_latent, self.n_knots = int(n_latent), int(n_knots)
        self.wave_range = (lo, hi)
        self.register_buffer("log_knots", torch.linspace(math.log(lo), math.log(hi), n_knots))
        self.remove_trend = bool(remove_trend)
        # projector onto the complement of span{1, ln(lambda)} at the knots (identity without remove_trend)
        basis = torch.stack([torch.ones(n_knots), torch.linspace(-1.0, 1.0, n_knots)], 1).double()
        q, _ = torch.linalg.qr(basis)
        proj = torch.eye(n_knots, dtype=torch.float64) - (q @ q.T if remove_trend else 0.0)
        self.register_buffer("projector", proj.float())
        if n_latent:
            layers, width = [], n_latent
            for h in hidden:
                layers += [nn.Linear(width, h), nn.GELU()]
                width = h
            last = nn.Linear(width, n_knots)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.net = nn.Sequential(*layers, last)
        else:
            self.offset = nn.Parameter(torch.zeros(n_knots))
        self._weights: dict = {}

    def log_correction(self, latent: Tensor | None = None) -> Tensor:
        """ln(factor) at the knots, (..., n_knots), for latent variables (..., n_latent)
        (ignored, and may be None, when ``n_latent`` is 0: the shared correction, (n_knots,))."""
        if not self.n_latent:
            return self.projector @ self.offset
        if latent is None or latent.shape[-1] != self.n_latent:
            raise ValueError(f"the residual needs latent variables of size {self.n_latent}, got "
                             f"{None if latent is None else tuple(latent.shape)}")
        return self.net(latent) @ self.projector.T

    def interpolation(self, wave: Tensor) -> Tensor:
        """(L, n_knots) weights of linear interpolation in ln(lambda) from the knots onto rest-frame
        ``wave`` (L,) (vacuum Angstrom), tapering to 0 over one knot spacing beyond either end."""
        key = (wave.data_ptr(), tuple(wave.shape), wave.dtype, self.log_knots.data_ptr())
        if key not in self._weights:
            x = torch.log(wave.detach().double())
            k = self.log_knots.double()
            d = float(k[1] - k[0])
            ext = torch.cat([k[:1] - d, k, k[-1:] + d])
            i = torch.searchsorted(ext, x).clamp(1, len(ext) - 1)
            t = ((x - ext[i - 1]) / d).clamp(0, 1)
            inside = (x >= ext[0]) & (x <= ext[-1])
            w = torch.zeros(len(x), len(ext), dtype=torch.float64)
            rows = torch.arange(len(x))
            w[rows, i - 1] = torch.where(inside, 1 - t, torch.zeros_like(t))
            w[rows, i] += torch.where(inside, t, torch.zeros_like(t))
            if len(self._weights) > 8:
                self._weights.clear()
            self._weights[key] = w[:, 1:-1].to(wave.dtype)  # the outer (zero-valued) knots drop out
        return self._weights[key]

    def factor(self, log_correction: Tensor, wave: Tensor) -> Tensor:
        """Multiplicative factor (..., L) on rest-frame ``wave`` (L,) (vacuum Angstrom) of
        ln(factor) at the knots (..., n_knots)."""
        return torch.exp(log_correction.to(wave.dtype) @ self.interpolation(wave).T)

    def extra_repr(self) -> str:
        """The knots' range and count, the latent size and the trend removal, for ``print(module)``."""
        lo, hi = self.wave_range
        return (f"{lo:.0f}-{hi:.0f} A, n_knots={self.n_knots}, n_latent={self.n_latent}, "
                f"remove_trend={self.remove_trend}")
