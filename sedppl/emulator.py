"""Neural emulator of stellar population spectra (PCA + MLP, after Alsing et al. 2020).

The emulator maps physical parameters theta (D,) to a rest-frame log spectrum on
a fixed wavelength grid plus any scalar outputs (e.g. the log surviving-mass
fraction), so a model can replace its exact synthesis by one small network:

1. log spectra are standardised per pixel (mean, sd over the training set) and
   projected on their first ``n_components`` principal components;
2. an MLP with the Speculator activation
   a(x) = [gamma + (1 - gamma) sigmoid(beta x)] x  (beta, gamma learned per unit)
   maps standardised parameters to standardised PCA coefficients and scalars;
3. the spectrum is rebuilt as mean + sd * (coefficients @ basis).

A card may cut the wavelength grid into chunks (``chunks``: pixel indices where
a new chunk starts). Each chunk then has its own PCA basis of ``n_components``
and its own MLP (Kwon, Hahn & Alsing 2023 chunk their PROVABGS emulator the same
way): each network has a simpler function to fit, at the cost of one network
evaluation per chunk. The scalar outputs come from the first chunk's network.
Around each cut, neighbouring chunks overlap by ``chunk_overlap`` pixels on either
side and their spectra are blended with linear weights, so the emulated spectrum
has no step where one chunk's errors give way to the next one's.

Inputs that the simulator interpolates linearly on a grid (the metallicity of an
SSP synthesis) make the spectrum a piecewise-linear function of them, with a kink
at every grid point that a smooth network can only round off. The card can name
such inputs (``grid_inputs``, ``input_grid``): the network then also sees their
linear-interpolation (hat) weights on the grid, which carry the kinks exactly.

Weights are saved as safetensors with a JSON card (parameter names and ranges,
wavelengths, training size, validation accuracy, a checksum of the weights),
so loading never runs code; see :mod:`sedppl.emulator_training` for training.

References:
    Alsing et al. 2020, ApJS 249, 5 (Speculator).
    Kwon, Hahn & Alsing 2023, ApJS 265, 23 (PROVABGS emulator, chunked PCA).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .sps.synthesis import linear_interp_weights

CARD_VERSION = 1


class SpeculatorActivation(nn.Module):
    """a(x) = [gamma + (1 - gamma) sigmoid(beta x)] x, with learned beta, gamma per unit (Alsing et al. 2020)."""

    def __init__(self, width: int):
        super().__init__()
        self.beta = nn.Parameter(torch.randn(width) * 0.1 + 1.0)
        self.gamma = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return (self.gamma + (1 - self.gamma) * torch.sigmoid(self.beta * x)) * x


@dataclass
class EmulatorCard:
    """What an emulator was trained for and how well it does.

    Attributes:
        param_names: Names of the D inputs, in order.
        param_low, param_high: The box the training draws covered (inputs outside warn).
        wave: Rest-frame wavelengths of the spectrum, Angstrom (vacuum unless ``air``).
        air: Whether ``wave`` is in air.
        flux_unit: Unit of the (non-log) spectrum, e.g. "Lsun/A per Msun formed".
        scalar_names: Names of the scalar outputs.
        grid_inputs: Indices of the inputs the simulator interpolates linearly on ``input_grid``
            (e.g. log10 Z/Zsun per SFH bin); the network also sees their hat weights ([]: none).
        input_grid: The grid nodes of those inputs, increasing, in the inputs' units.
        n_components: PCA components (per chunk); hidden: MLP widths (per chunk).
        chunks: Pixel indices, increasing, in 1..L-1, where a new wavelength chunk starts, each with its
            own PCA and MLP ([]: one chunk).
        chunk_overlap: Pixels on either side of each cut that both neighbouring chunks cover; their
            spectra are blended there with weights linear in pixel index (0: abutting chunks).
        n_train, n_valid: Training and validation set sizes.
        accuracy: Validation figures, e.g. {"median_abs_frac": ..., "p99_abs_frac": ...}.
        sha256: Checksum of the weights file.
        notes: Free text (simulator, prior).
    """

    param_names: list[str]
    param_low: list[float]
    param_high: list[float]
    wave: list[float]
    air: bool = False
    flux_unit: str = ""
    scalar_names: list[str] = field(default_factory=list)
    grid_inputs: list[int] = field(default_factory=list)
    input_grid: list[float] = field(default_factory=list)
    n_components: int = 32
    hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    chunks: list[int] = field(default_factory=list)
    chunk_overlap: int = 0
    n_train: int = 0
    n_valid: int = 0
    accuracy: dict = field(default_factory=dict)
    sha256: str = ""
    notes: str = ""
    version: int = CARD_VERSION


class SpectrumEmulator(nn.Module):
    """PCA + Speculator-MLP emulator of log spectra and scalars.

    Arguments:
        card: The :class:`EmulatorCard` (sizes and ranges).

    Call with theta (..., D) in the card's parameter order and units; returns
    (log_spectrum (..., L) natural log of the flux in ``card.flux_unit``,
    scalars (..., S)).
    """

    def __init__(self, card: EmulatorCard):
        super().__init__()
        self.card = card
        d, n_wave, k, s = len(card.param_names), len(card.wave), card.n_components, len(card.scalar_names)
        if card.grid_inputs and (len(card.input_grid) < 2 or np.any(np.diff(card.input_grid) <= 0)
                                 or not all(0 <= i < d for i in card.grid_inputs)):
            raise ValueError("grid_inputs need input indices in 0..D-1 and an increasing input_grid of >= 2 "
                             f"nodes; got {card.grid_inputs} and {card.input_grid}")
        if list(card.chunks) != sorted(set(card.chunks)) or any(not 0 < c < n_wave for c in card.chunks):
            raise ValueError(f"chunks must be increasing pixel indices in 1..{n_wave - 1}, got {card.chunks}")
        self.bounds = [0, *card.chunks, n_wave]
        n_chunks = len(self.bounds) - 1
        ov = card.chunk_overlap
        if ov < 0 or (n_chunks > 1 and 2 * ov > min(np.diff(self.bounds))):
            raise ValueError(f"chunk_overlap must be >= 0 and at most half the narrowest chunk "
                             f"({min(np.diff(self.bounds)) // 2} pixels), got {ov}")
        self.register_buffer("input_grid", torch.tensor(card.input_grid, dtype=torch.float32), persistent=False)
        d = d + len(card.grid_inputs) * len(card.input_grid)  # network inputs
        self.register_buffer("param_shift", torch.zeros(d))
        self.register_buffer("param_scale", torch.ones(d))
        self.register_buffer("log_mean", torch.zeros(n_wave))
        self.register_buffer("log_sd", torch.ones(n_wave))
        # (C K, L): chunk c's principal components times its blending weight, zero outside its span
        self.register_buffer("basis", torch.zeros(n_chunks * k, n_wave))
        self.register_buffer("out_shift", torch.zeros(n_chunks * k + s))
        self.register_buffer("out_scale", torch.ones(n_chunks * k + s))
        self.register_buffer("low", torch.tensor(card.param_low, dtype=torch.float32))
        self.register_buffer("high", torch.tensor(card.param_high, dtype=torch.float32))
        # one chunk: a single network (the form of the first shipped files); several: one per chunk
        nets = [_mlp(d, card.hidden, k + s if c == 0 else k) for c in range(n_chunks)]
        self.mlp = nets[0] if n_chunks == 1 else nn.ModuleList(nets)
        self.warn_outside = True

    @property
    def n_chunks(self) -> int:
        """Number of wavelength chunks, each with its own PCA basis and network."""
        return len(self.bounds) - 1

    def network(self, x: Tensor) -> Tensor:
        """The networks' standardised outputs (..., C K + S) from standardised inputs x: every chunk's K
        coefficients in wavelength order, then the scalars."""
        if self.n_chunks == 1:
            return self.mlp(x)
        k = self.card.n_components
        outs = [net(x) for net in self.mlp]
        return torch.cat([outs[0][..., :k], *outs[1:], outs[0][..., k:]], -1)

    def spans(self) -> list[tuple[int, int]]:
        """Pixel range [lo, hi) of each chunk, overlaps included."""
        ov, b = self.card.chunk_overlap, self.bounds
        return [(max(0, lo - ov), min(b[-1], hi + ov)) for lo, hi in zip(b[:-1], b[1:])]

    def blend_weights(self) -> Tensor:
        """Weight of each chunk at each pixel, (C, L), float64: 1 inside the chunk, 0 outside its span,
        linear in pixel index across the 2 ``chunk_overlap`` pixels around a cut, where the two
        neighbours' weights sum to 1."""
        ov, b = self.card.chunk_overlap, self.bounds
        pix = torch.arange(b[-1], dtype=torch.float64)

        def past(cut: int) -> Tensor:  # 0 before the cut's ramp, 1 after it
            return ((pix - cut + ov + 0.5) / (2 * ov)).clamp(0, 1) if ov else (pix >= cut).double()

        ones = torch.ones_like(pix)
        return torch.stack([(past(lo) if c else ones) * (1 - past(hi) if c < self.n_chunks - 1 else ones)
                            for c, (lo, hi) in enumerate(zip(b[:-1], b[1:]))])

    def project(self, z: Tensor) -> Tensor:
        """The coefficients (N, C K) whose rebuilt spectra are closest (least squares) to standardised log
        spectra z (N, L); with one chunk, or abutting ones, their PCA projections."""
        gram = (self.basis.double() @ self.basis.double().T)
        return torch.linalg.solve(gram, (self.basis @ z.T).double()).T.to(z.dtype)

    def rebuild(self, coef: Tensor, pixels: slice | None = None) -> Tensor:
        """Log spectra (..., L) from PCA coefficients (..., C K); only the card's wavelengths
        ``pixels`` (a slice, contiguous) when given."""
        if pixels is None:
            return self.log_mean + self.log_sd * (coef @ self.basis)
        return self.log_mean[pixels] + self.log_sd[pixels] * (coef @ self.basis[:, pixels])

    @property
    def wave(self) -> Tensor:
        """Rest-frame wavelengths, (L,), Angstrom."""
        return torch.tensor(self.card.wave, dtype=torch.float64)

    def check_inputs(self, theta: Tensor) -> None:
        """Raise on NaN inputs and warn on inputs outside the trained box."""
        if theta.shape[-1] != len(self.card.param_names):
            raise ValueError(f"emulator expects {len(self.card.param_names)} parameters "
                             f"({', '.join(self.card.param_names)}), got {theta.shape[-1]}")
        if torch.isnan(theta).any():
            raise ValueError("NaN in emulator inputs")
        if self.warn_outside:
            t = theta.detach()
            out = (t < self.low - 1e-6) | (t > self.high + 1e-6)
            if out.any():
                bad = [n for n, o in zip(self.card.param_names, out.reshape(-1, out.shape[-1]).any(0)) if o]
                warnings.warn(f"emulator inputs outside the trained range for {', '.join(bad)}: "
                              "its accuracy there is unknown; use the exact synthesis", stacklevel=3)

    def features(self, theta: Tensor) -> Tensor:
        """The network's inputs before standardisation: theta (..., D), then the hat weights of each
        of the card's ``grid_inputs`` on ``input_grid`` (clamped to the grid), (..., D + n G)."""
        theta = theta.to(self.param_shift.dtype)
        if not self.card.grid_inputs:
            return theta
        g = self.input_grid
        x = theta[..., self.card.grid_inputs].clamp(float(g[0]), float(g[-1]))
        hats = linear_interp_weights(g, x, "emulator grid input")
        return torch.cat([theta, hats.flatten(-2)], -1)

    def standardise(self, theta: Tensor) -> Tensor:
        """The network's standardised inputs (..., D + n G) of parameters theta (..., D)."""
        return (self.features(theta) - self.param_shift) / self.param_scale

    def coefficients(self, theta: Tensor) -> Tensor:
        """Standardised network outputs mapped back: (..., C K + S) PCA coefficients and scalars."""
        return self.network(self.standardise(theta)) * self.out_scale + self.out_shift

    def forward(self, theta: Tensor, check: bool = True, pixels: slice | None = None) -> tuple[Tensor, Tensor]:
        """Emulate.

        Arguments:
            theta: Parameters, (..., D), in the card's ``param_names`` order.
            check: Raise on NaN inputs and warn outside the trained box.
            pixels: A contiguous slice of the card's wavelengths to emulate (cheaper than all of
                them); None for all.

        Returns:
            The log spectra (..., L) in the card's ``flux_unit`` and the scalars (..., S).
        """
        if check:
            self.check_inputs(theta)
        out = self.coefficients(theta)
        kc = self.card.n_components * self.n_chunks
        return self.rebuild(out[..., :kc], pixels), out[..., kc:]

    # ----------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and ``path`` with suffix .json (the card, with checksum)."""
        from safetensors.torch import save_file

        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        self.card.sha256 = _sha256(tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(asdict(self.card), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SpectrumEmulator":
        """Load weights (safetensors, no code execution) and check them against the card."""
        from safetensors.torch import load_file

        path = Path(path).with_suffix(".safetensors")
        card_path = path.with_suffix(".json")
        if not path.exists() or not card_path.exists():
            raise FileNotFoundError(f"emulator needs both {path} and {card_path}")
        card = EmulatorCard(**json.loads(card_path.read_text()))
        if card.version != CARD_VERSION:
            raise ValueError(f"emulator card version {card.version}; this sedppl reads version {CARD_VERSION}")
        if card.sha256 and card.sha256 != _sha256(path):
            raise ValueError(f"checksum of {path.name} does not match its card: the weights were changed")
        emu = cls(card)
        state = load_file(str(path))
        missing = set(emu.state_dict()) ^ set(state)
        if missing:
            raise ValueError(f"weights do not match the card's architecture: {sorted(missing)[:5]}")
        emu.load_state_dict(state)
        return emu.eval()


def _mlp(n_in: int, hidden: list[int], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), SpeculatorActivation(h)]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fractional_errors(emulated_log: Tensor | np.ndarray, exact_log: Tensor | np.ndarray) -> np.ndarray:
    """|f_emu / f_exact - 1| per pixel from natural-log spectra, (N, L)."""
    d = np.asarray(emulated_log, dtype=np.float64) - np.asarray(exact_log, dtype=np.float64)
    return np.abs(np.expm1(d))
