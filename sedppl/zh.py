"""Metallicity histories and their priors, as Pyro building blocks.

A metallicity history gives log10(Z/Zsun) (Zsun = 0.02) per SFH bin, inside the
SSP grid's range (BC03: -2.3 to 0.7).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

#: log10(Z/Zsun) range of the BC03 grid (0.005 - 5 Zsun).
LOG_Z_RANGE = (-2.3, 0.69897)


def constant_zh(n_bins: int, log_z_range: tuple[float, float] = LOG_Z_RANGE) -> Tensor:
    """One metallicity for all stars: site ``log_z`` ~ Uniform(range), returns (..., n_bins)."""
    lo, hi = log_z_range
    log_z = pyro.sample("log_z", dist.Uniform(lo, hi))
    return log_z[..., None].expand(*log_z.shape, n_bins)


def smooth_zh(edges: Tensor, n_epochs: int = 3, step: float = 0.5,
              log_z_range: tuple[float, float] = LOG_Z_RANGE) -> Tensor:
    """A non-parametric history that favours smooth enrichment.

    The metallicity is free at ``n_epochs`` anchor ages (log-spaced from 30 Myr
    to the oldest edge) and linear in log lookback time in between. In the
    logit of the grid range, the youngest anchor ``zh_logit[0]`` ~ Normal(0, 1.6)
    (close to uniform in log Z) and each older anchor differs from the
    previous one by Normal(0, ``step``): a Gaussian random walk, so smooth
    histories are favoured and every value stays inside the grid.

    Arguments:
        edges: SFH bin edges, (..., N+1) Gyr.
        n_epochs: Number of anchors.
        step: Random-walk scale in logit units.

    Returns:
        log10(Z/Zsun) per bin, (..., N).
    """
    lo, hi = log_z_range
    first = pyro.sample("zh_logit_now", dist.Normal(0.0, 1.6))
    steps = pyro.sample("zh_logit_step", dist.Normal(0.0, step).expand([n_epochs - 1]).to_event(1))
    logits = torch.cat([first[..., None], first[..., None] + torch.cumsum(steps, -1)], -1)
    anchors_t = torch.log(torch.tensor(0.03, dtype=edges.dtype)) + \
        (torch.log(edges[..., -1:]) - torch.log(torch.tensor(0.03, dtype=edges.dtype))) * \
        torch.linspace(0, 1, n_epochs, dtype=edges.dtype)
    batch = torch.broadcast_shapes(logits.shape[:-1], edges.shape[:-1])
    logits = logits.expand(*batch, n_epochs)
    anchors_t = anchors_t.expand(*batch, n_epochs)
    edges = edges.expand(*batch, edges.shape[-1])
    mid = torch.log(0.5 * (edges[..., 1:] + edges[..., :-1]).clamp(min=1e-4))
    # linear interpolation in log time between anchors (constant beyond)
    x = mid.clamp(anchors_t[..., :1], anchors_t[..., -1:])
    j = (torch.searchsorted(anchors_t.detach().contiguous(), x.detach().contiguous(), right=True) - 1).clamp(0, n_epochs - 2)
    t0, t1 = torch.gather(anchors_t, -1, j), torch.gather(anchors_t, -1, j + 1)
    l0, l1 = torch.gather(logits, -1, j), torch.gather(logits, -1, j + 1)
    logit = l0 + (l1 - l0) * (x - t0) / (t1 - t0)
    return lo + (hi - lo) * torch.sigmoid(logit)
