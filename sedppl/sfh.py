"""Non-parametric star-formation histories and their priors, as Pyro building blocks.

Histories are piecewise constant in lookback-time bins (Gyr, youngest first) and
are returned as (mass formed per bin [Msun], bin edges [Gyr]), the input of
:class:`sedppl.forward.ForwardModel`. The sample statements carry supports so
that every inference engine can move to the unconstrained space alike.

References:
    Leja et al. 2019, ApJ 876, 3 (continuity prior, Prospector-alpha bins).
    Leja et al. 2017, ApJ 837, 170 (Dirichlet prior).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

#: PROVABGS / Prospector range of log10(mass formed / Msun).
LOG_MASS_RANGE = (7.0, 12.5)


def continuity_edges(t_univ: Tensor, n_bins: int = 7, young: tuple[float, ...] = (0.03, 0.1),
                     last_fraction: float = 0.85) -> Tensor:
    """Leja et al. (2019) bin edges that follow the age of the universe.

    Edges: 0, 30 Myr, 100 Myr, then log-spaced edges up to ``last_fraction`` x
    t_univ, then t_univ (for t_univ = 13.7 Gyr and 7 bins: 0, 0.03, 0.1, 0.33,
    1.08, 3.55, 11.6, 13.7 Gyr, Prospector's ``adjust_continuity_agebins``).

    Arguments:
        t_univ: Age of the universe at the galaxy's redshift, (...,), Gyr.
        n_bins: Number of bins (>= len(young) + 2).
        young: The fixed edges after 0, Gyr.
        last_fraction: The last log-spaced edge as a fraction of t_univ.

    Returns:
        Edges, (..., n_bins + 1), Gyr lookback, differentiable in t_univ.
    """
    t_univ = torch.as_tensor(t_univ)
    n_log = n_bins - len(young)  # log-spaced edges from young[-1] to last_fraction * t_univ, inclusive
    if n_log < 2:
        raise ValueError(f"continuity_edges needs n_bins >= {len(young) + 2}")
    if torch.any(last_fraction * t_univ <= young[-1]):
        raise ValueError("the universe is too young for these bins")
    u = torch.linspace(0, 1, n_log, dtype=t_univ.dtype)
    lo = torch.log(torch.tensor(young[-1], dtype=t_univ.dtype))
    hi = torch.log(last_fraction * t_univ)[..., None]
    logs = torch.exp(lo + (hi - lo) * u)  # (..., n_log) from young[-1] to 0.85 t
    zero = torch.zeros_like(t_univ)[..., None]
    fixed = torch.tensor(young[:-1], dtype=t_univ.dtype).expand(*t_univ.shape, len(young) - 1)
    return torch.cat([zero, fixed, logs, t_univ[..., None]], dim=-1)


def mass_from_sfr_ratios(log_mass: Tensor, log_ratios: Tensor, edges: Tensor) -> Tensor:
    """Mass formed per bin from log10(SFR_j / SFR_j+1) (youngest first) and the total.

    Arguments:
        log_mass: log10(total mass formed / Msun), (...,).
        log_ratios: (..., N-1), r_j = log10(SFR_j / SFR_{j+1}), j = 0 the youngest bin.
        edges: (..., N+1) Gyr.

    Returns:
        (..., N) Msun.
    """
    # log10 SFR_j relative to the oldest bin: sum of the ratios from j to N-2
    rel = torch.flip(torch.cumsum(torch.flip(log_ratios, [-1]), -1), [-1])
    log_sfr = torch.cat([rel, torch.zeros_like(rel[..., :1])], dim=-1)
    weights = torch.pow(10.0, log_sfr - log_sfr.max(-1, keepdim=True).values) * torch.diff(edges, dim=-1)
    return torch.pow(10.0, log_mass)[..., None] * weights / weights.sum(-1, keepdim=True)


def continuity_sfh(t_univ: Tensor, n_bins: int = 7, scale: float = 0.3, df: float = 2.0,
                   log_mass_range: tuple[float, float] = LOG_MASS_RANGE) -> tuple[Tensor, Tensor]:
    """The continuity prior: Student-t on the log SFR ratios of adjacent bins.

    Sample sites: ``log_mass`` ~ Uniform(log_mass_range) (log10 Msun formed) and
    ``log_sfr_ratio`` ~ StudentT(df, 0, scale) per adjacent pair, youngest first.

    Arguments:
        t_univ: Age of the universe at z, (...,) Gyr (the bins follow it).
        n_bins, scale, df: Leja et al. (2019): 7 bins, scale 0.3, 2 degrees of freedom.

    Returns:
        (mass per bin (..., N) Msun, edges (..., N+1) Gyr).
    """
    lo, hi = log_mass_range
    log_mass = pyro.sample("log_mass", dist.Uniform(lo, hi))
    ratios = pyro.sample("log_sfr_ratio", dist.StudentT(df, 0.0, scale).expand([n_bins - 1]).to_event(1))
    edges = continuity_edges(t_univ, n_bins)
    return mass_from_sfr_ratios(log_mass, ratios, edges), edges


def dirichlet_sfh(edges: Tensor, alpha: float | Tensor = 1.0,
                  log_mass_range: tuple[float, float] = LOG_MASS_RANGE) -> tuple[Tensor, Tensor]:
    """Dirichlet prior on the fractions of mass formed per bin (Leja et al. 2017).

    Sample sites: ``log_mass`` (log10 Msun formed) and ``mass_fraction`` ~
    Dirichlet(alpha), a proper Dirichlet (alpha = 1 is flat on the simplex,
    unlike independent uniform stick breaking).

    Arguments:
        edges: Bin edges, (..., N+1) Gyr.
        alpha: Concentration, scalar or (N,).

    Returns:
        (mass per bin (..., N) Msun, edges).
    """
    n = edges.shape[-1] - 1
    conc = torch.as_tensor(alpha, dtype=edges.dtype).expand(n)
    lo, hi = log_mass_range
    log_mass = pyro.sample("log_mass", dist.Uniform(lo, hi))
    frac = pyro.sample("mass_fraction", dist.Dirichlet(conc))
    return torch.pow(10.0, log_mass)[..., None] * frac, edges


def sfr_averaged(mass: Tensor, edges: Tensor, window: float) -> Tensor:
    """Mean SFR over the last ``window`` Gyr, (...,) in Msun/yr."""
    lo, hi = edges[..., :-1], edges[..., 1:]
    overlap = (torch.clamp(hi, max=window) - torch.clamp(lo, max=window)).clamp(min=0)
    rate = mass / (hi - lo)  # Msun per Gyr
    return (rate * overlap).sum(-1) / window / 1e9


def mass_weighted_age(mass: Tensor, edges: Tensor) -> Tensor:
    """Mass-weighted lookback age of the stars formed, (...,) Gyr (bin mid-points)."""
    mid = 0.5 * (edges[..., 1:] + edges[..., :-1])
    return (mass * mid).sum(-1) / mass.sum(-1)


def fine_edges(t_univ: Tensor, n_bins: int = 40, first: float = 0.01) -> Tensor:
    """Bin edges 0, then log-spaced from ``first`` Gyr to t_univ: (..., n_bins + 1) Gyr lookback."""
    t_univ = torch.as_tensor(t_univ)
    u = torch.linspace(0, 1, n_bins, dtype=t_univ.dtype)
    lo = torch.log(torch.tensor(first, dtype=t_univ.dtype))
    logs = torch.exp(lo + (torch.log(t_univ)[..., None] - lo) * u)
    return torch.cat([torch.zeros_like(t_univ)[..., None], logs], dim=-1)


class BasisSFH(torch.nn.Module):
    """A user-supplied basis of star-formation histories s_i(t) (e.g. PROVABGS's NMF basis).

    Arguments:
        t: Lookback times of the table, (T,) Gyr, increasing (reverse a table stored oldest first).
        basis: SFR shapes, (K, T), non-negative, linear in t between samples and
            constant from t = 0 to t[0]; each is normalised to unit mass formed
            between 0 and t_univ of the galaxy.

    References:
        Hahn et al. 2023, AJ 165, 253 (PROVABGS: NMF basis from Illustris plus a burst).
    """

    def __init__(self, t, basis):
        super().__init__()
        from .sps.synthesis import AgeIntegrator

        t = torch.as_tensor(t, dtype=torch.float64)
        basis = torch.as_tensor(basis, dtype=torch.float64)
        if t.ndim != 1 or basis.ndim != 2 or basis.shape[1] != t.numel():
            raise ValueError(f"basis must be (K, T) on t (T,); got {tuple(basis.shape)} and {tuple(t.shape)}")
        if torch.any(torch.diff(t) <= 0) or t[0] <= 0:
            raise ValueError("basis times must be positive and increasing (lookback Gyr, youngest first)")
        if torch.any(basis < 0) or torch.any(~torch.isfinite(basis)):
            raise ValueError("basis histories must be finite and non-negative")
        self.integrator = AgeIntegrator(torch.cat([torch.zeros(1, dtype=torch.float64), t]))
        self.register_buffer("basis", torch.cat([basis[:, :1], basis], dim=1))  # constant to t = 0
        self.t_max = float(t[-1])

    @property
    def n_basis(self) -> int:
        """Number of basis histories."""
        return self.basis.shape[0]

    def mass_fractions(self, edges: Tensor) -> Tensor:
        """Fraction of each basis history's mass (formed before edges[-1]) per bin, (..., K, N)."""
        e = edges.double().clamp(max=self.t_max)
        w = self.integrator(e[..., :-1], e[..., 1:])  # (..., N, T+1)
        m = torch.einsum("...nt,kt->...kn", w, self.basis)
        return (m / m.sum(-1, keepdim=True).clamp(min=1e-300)).to(edges.dtype)


def place_burst(mass: Tensor, t_burst: Tensor, edges: Tensor) -> Tensor:
    """Mass per bin of a burst at lookback ``t_burst``, shared between the two bins whose
    log-centres bracket it (linear in log t, so differentiable in t_burst), (..., N)."""
    centre = torch.log(0.5 * (edges[..., 1:] + edges[..., :-1]))
    x = torch.log(torch.as_tensor(t_burst, dtype=edges.dtype))[..., None].clamp(centre[..., :1], centre[..., -1:])
    j = (torch.searchsorted(centre.detach().contiguous(), x.detach().contiguous(), right=True) - 1)
    j = j.clamp(0, centre.shape[-1] - 2)
    c0, c1 = torch.gather(centre, -1, j), torch.gather(centre, -1, j + 1)
    u = (x - c0) / (c1 - c0)
    out = torch.zeros_like(centre).scatter_add(-1, j, (1 - u)).scatter_add(-1, j + 1, u)
    return torch.as_tensor(mass, dtype=edges.dtype)[..., None] * out


def basis_burst_sfh(basis: BasisSFH, t_univ: Tensor, n_bins: int = 40,
                    log_mass_range: tuple[float, float] = LOG_MASS_RANGE,
                    t_burst_min: float = 0.01) -> tuple[Tensor, Tensor]:
    """PROVABGS-style SFH: (1 - f_burst) sum_i beta_i s_i(t) + f_burst delta(t - t_burst).

    Sample sites: ``log_mass`` (log10 Msun formed), ``basis_weight`` ~ Dirichlet(1)
    (a flat simplex), ``f_burst`` ~ U(0, 1), ``t_burst`` ~ U(t_burst_min, t_univ) Gyr
    lookback. The history is returned on ``n_bins`` fine bins (:func:`fine_edges`);
    the burst is shared between the two nearest bins.

    Returns:
        (mass per bin (..., n_bins) Msun, edges (..., n_bins + 1) Gyr).
    """
    lo, hi = log_mass_range
    t_univ = torch.as_tensor(t_univ)
    log_mass = pyro.sample("log_mass", dist.Uniform(lo, hi))
    beta = pyro.sample("basis_weight", dist.Dirichlet(torch.ones(basis.n_basis)))
    f_burst = pyro.sample("f_burst", dist.Uniform(0.0, 1.0))
    t_burst = pyro.sample("t_burst", dist.Uniform(torch.full_like(t_univ, t_burst_min), t_univ))
    edges = fine_edges(t_univ, n_bins)
    smooth = torch.einsum("...k,...kn->...n", beta.to(edges.dtype), basis.mass_fractions(edges))
    total = torch.pow(10.0, log_mass)
    mass = (total * (1 - f_burst))[..., None] * smooth + place_burst(total * f_burst, t_burst, edges)
    return mass, edges
