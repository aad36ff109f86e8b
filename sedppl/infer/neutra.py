"""MCMC in the coordinates of an amortized posterior (neural transport, "NeuTra").

The amortized flow q(theta | data) of :mod:`sedppl.infer.npe` is a bijection
from a standard normal z to the model's parameters, conditioned on one galaxy's
data. Written in z, the *exact* posterior p(theta | data) is whatever the flow
did not learn: close to N(0, I) when the flow is good. HMC in z then takes long
steps where HMC in the model's own coordinates needs short ones (the
age-metallicity-dust curvature of an SED posterior that no constant mass
matrix removes), and it starts in the typical set from a flow draw, without a
mode search.

The result is still exact MCMC on the model's posterior: the flow only changes
coordinates (with the log-Jacobian of the change in the potential), so a poor
flow costs efficiency, never correctness, and the chains can check the flow.

    theta = g(shift + scale * T^-1(z; context)),   log p(z) = log p(theta, data) + log|d theta / d z|

with T the flow's transform (parameters -> base), ``shift``/``scale`` its
standardisation and g the prior whitening (:mod:`sedppl.infer.whitening`) or
``biject_to`` of each site.

References:
    Hoffman et al. 2019, arXiv:1903.03704 (NeuTra-lizing bad geometry in HMC).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import Observation
from .npe import NeuralPosterior

#: Largest |coordinate| of the flow's parameter space treated as inside the support.
U_MAX = 8.0


class FlowCoordinates:
    """Latent sites as the base-space z (B, D) of a posterior's flow, conditioned on each target's data.

    Arguments:
        posterior: A trained :class:`~sedppl.infer.npe.NeuralPosterior` of the model to be sampled.
        obs: The observation of the B targets (e.g. galaxies tiled once per chain).
        dtype: Floating type of the site values handed to the model.

    Use as ``coordinates`` of :class:`sedppl.infer.potential.BatchedPotential`.
    """

    def __init__(self, posterior: NeuralPosterior, obs: Observation, dtype: torch.dtype = torch.float32):
        if not hasattr(posterior, "flow"):
            raise ValueError("NeuTra coordinates need one posterior's flow (a bijection); an ensemble is a "
                             "mixture: pass one of its members (ensemble.members[0])")
        self.posterior = posterior
        self.dtype = dtype
        self.space = posterior.space
        self.names = self.space.names
        self.dim = self.space.dim
        for p in posterior.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            ctx = posterior.context(posterior.inputs(obs, warn=False))
        self.flow = posterior.flow(ctx)  # batch (B,): one distribution per target
        self.log_scale = torch.log(posterior.theta_scale).sum().double()

    def constrain(self, z: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """{site: value (B, *event)} (``dtype``) and log |d theta / d z| (B,) from z (B, D).

        Targets whose parameter coordinates leave |u| <= ``U_MAX`` (prior tail mass
        < 1e-15 in whitened coordinates) get a log-Jacobian of -inf (zero density), so
        HMC rejects them, instead of overflowing the model (e.g. 10**(SFR ratio))."""
        std, ladj = self.flow.transform.inv.call_and_ladj(z.float())
        u = (self.posterior.theta_shift + self.posterior.theta_scale * std).to(z.dtype)
        bad = ~torch.isfinite(u).all(-1) | (u.abs() > U_MAX).any(-1)
        u = torch.where(bad[:, None], torch.zeros_like(u), u)
        values, logdet = self.space.to_constrained(u, differentiable=True)
        logdet = torch.where(bad, torch.full_like(logdet, -float("inf")), logdet)
        return {k: v.to(self.dtype) for k, v in values.items()}, ladj.to(z.dtype) + self.log_scale + logdet

    def flatten(self, values: dict[str, Tensor]) -> Tensor:
        """z (B, D) float64 from constrained {site: value (B, *event)}."""
        u = self.space.to_unconstrained(values)
        std = (u - self.posterior.theta_shift) / self.posterior.theta_scale
        with torch.no_grad():
            return self.flow.transform(std).double()
