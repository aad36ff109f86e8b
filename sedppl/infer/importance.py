"""Exact posteriors from an amortized one: importance sampling with the flow as the proposal.

A neural posterior is calibrated on average over the prior but can be shifted or
too wide for a given galaxy (benchmarks/RESULTS.md: up to 1-1.6 posterior sd on
some ugriz mocks). Weighting its draws by w = p(theta, x) / q(theta | x), the
model's exact log joint (prior and likelihood) over the proposal density, turns
them into draws of the exact posterior, at the cost of one model evaluation a
draw (seconds for thousands of draws; NUTS on the same models takes minutes to
hours) (neural importance sampling: Dax et al. 2023).

The proposal is *defensive*: a fraction of the base draws comes from a wider
normal (N(0, ``wide``^2) instead of N(0, 1)) pushed through the same flow, so the
proposal's tails are heavier than the flow's and the weights stay bounded where
the flow is too narrow. Weights are Pareto-smoothed (PSIS; Vehtari et al. 2024);
their shape estimate k-hat says whether the estimate can be trusted (k-hat < 0.7)
and the effective sample size how precise it is. The result is resampled to
equal-weight draws so that every tool that takes posterior draws takes it.

References:
    Dax et al. 2023, "Neural Importance Sampling for Rapid and Reliable
    Gravitational-Wave Inference", PRL 130, 171403 (arXiv:2210.05686).
    Vehtari et al. 2024, "Pareto Smoothed Importance Sampling", JMLR 25(72).
    Owen & Zhou 2000, "Safe and effective importance sampling" (defensive mixtures).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ..data import Observation


def log_joint(model, values: dict[str, Tensor], obs: Observation, chunk: int = 20_000) -> Tensor:
    """log p(theta, x): the model's log prior plus log likelihood at S draws of N galaxies' latent sites.

    Arguments:
        model: The Pyro program (``model(obs=...)``, a plate over galaxies).
        values: {site: (S, N, *event)} in the model's constrained parameters.
        obs: The N galaxies' observation.
        chunk: Model rows (draws x galaxies) per call.

    Returns:
        (S, N), float64, nats.
    """
    s, n = next(iter(values.values())).shape[:2]
    flat = {k: v.reshape(s * n, *v.shape[2:]) for k, v in values.items()}
    rows = max(n, chunk // n * n)  # whole copies of the batch per call
    out = []
    for i in range(0, s * n, rows):
        part = {k: v[i:i + rows] for k, v in flat.items()}
        m = next(iter(part.values())).shape[0]
        with torch.no_grad():
            tr = poutine.trace(poutine.condition(model, data=part)).get_trace(obs=obs.tile(m // n))
        tr.compute_log_prob()
        out.append(sum(site["log_prob"].reshape(-1, m).sum(0).double() for site in tr.nodes.values()
                       if site["type"] == "sample" and not site_is_subsample(site)
                       and not site["infer"].get("_deterministic", False)))
    return torch.cat(out).reshape(s, n)


def defensive_draws(post, x: dict[str, Tensor | None], num_samples: int, defensive: float = 0.5,
                    wide: float = 1.5) -> tuple[Tensor, Tensor]:
    """Draws from the flow with a defensive base and their log proposal density.

    Arguments:
        post: A :class:`sedppl.infer.npe.NeuralPosterior`.
        x: Network inputs of N galaxies (``post.inputs(obs)``).
        num_samples: S, draws per galaxy.
        defensive: Fraction of the base draws from N(0, (``wide`` s)^2), s the flow's base scale.
        wide: Standard deviation of the defensive part of the base, in units of s.

    Returns:
        u (S, N, D) in the posterior's unconstrained coordinates and log q_defensive(u) (S, N).
    """
    n_gal = next(v for v in x.values() if v is not None).shape[0]
    d = post.space.dim
    n_wide = int(round(defensive * num_samples))
    scale = torch.ones(num_samples, 1, 1)
    scale[num_samples - n_wide:] = wide
    step = max(1, 20_000 // num_samples)
    s0 = float(post.flow.base.scale[0])  # the flow's own base N(0, s0^2 I) (card: base_scale)
    us, lqs = [], []
    with torch.no_grad():
        ctx = post.context(x)
        for i in range(0, n_gal, step):
            c = ctx[i:i + step]
            z = torch.randn(num_samples, c.shape[0], d) * scale * s0
            theta, ladj = post.flow(c).transform.inv.call_and_ladj(z)
            base = torch.distributions.Normal(0.0, s0).log_prob(z).sum(-1)
            if defensive > 0:  # the mixture's density
                base = torch.logaddexp(math.log1p(-defensive) + base, math.log(defensive)
                                       + torch.distributions.Normal(0.0, wide * s0).log_prob(z).sum(-1))
            us.append(post.theta_shift + post.theta_scale * theta)
            lqs.append(base - ladj - torch.log(post.theta_scale).sum())
    return torch.cat(us, 1), torch.cat(lqs, 1)


def psis_weights(log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pareto-smoothed, normalised importance weights of every galaxy's draws.

    Arguments:
        log_w: (N, S) log weights (nats) of S draws for each of N galaxies; NaN and
            infinite values count as zero weight.

    Returns:
        (weights (N, S) summing to 1 over S, Pareto k-hat (N,), effective sample size (N,)).
    """
    import arviz as az

    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    smoothed, k_hat = az.psislw(log_w)
    w = np.exp(smoothed - smoothed.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return w, np.atleast_1d(np.asarray(k_hat, float)), 1.0 / (w**2).sum(-1)


def importance_sample(post, obs: Observation, num_samples: int = 20_000, num_draws: int = 1000,
                      defensive: float = 0.5, wide: float = 1.5, seed: int | None = None, derived: bool = True,
                      predictive: bool | int = False, warn: bool = True):
    """Exact-posterior draws of each galaxy by importance sampling an amortized posterior.

    Arguments:
        post: A :class:`sedppl.infer.npe.NeuralPosterior` of ``post.model``.
        obs: One galaxy or a batch.
        num_samples: Proposal draws per galaxy (one model evaluation each).
        num_draws: Equal-weight draws returned per galaxy (resampled with the smoothed weights).
        defensive, wide: The defensive proposal (:func:`defensive_draws`).
        seed: Random seed.
        derived: Also compute the derived quantities (stellar mass, SFRs, ages) of the draws.
        predictive: Also the noise-free model data of every draw (True) or of the first
            ``predictive`` draws (as :meth:`NeuralPosterior.sample`).
        warn: Warn for galaxies whose estimate is unreliable (k-hat > 0.7 or ESS < 100).

    Returns:
        InferenceData as :meth:`NeuralPosterior.sample` (``posterior``: the resampled draws),
        with ``sample_stats`` per galaxy (repeated over draws): ``importance_ess`` (effective
        sample size of the smoothed weights, out of ``num_samples``) and ``pareto_k`` (k-hat).
    """
    from .inference_data import inference_data

    if not hasattr(post, "flow"):
        raise ValueError("importance sampling uses one posterior's flow as its proposal; an ensemble is a "
                         "mixture: pass one of its members (ensemble.members[0])")
    if not 0 <= defensive < 1 or wide < 1:
        raise ValueError(f"need 0 <= defensive < 1 and wide >= 1, got defensive={defensive}, wide={wide}")
    if seed is not None:
        torch.manual_seed(seed)
    x = post.inputs(obs, warn=warn)
    u, log_prop = defensive_draws(post, x, num_samples, defensive, wide)
    values, logdet = post.space.to_constrained(u)
    log_w = (log_joint(post.model, values, obs) - (log_prop - logdet).double()).T.numpy()  # (N, S)
    w, k_hat, ess = psis_weights(log_w)
    idx = torch.multinomial(torch.as_tensor(w), num_draws, replacement=True).T  # (num_draws, N)
    picked = torch.gather(u, 0, idx[..., None].expand(-1, -1, u.shape[-1]))
    idata = post.package(obs, x, picked, None, derived=derived, predictive=predictive)
    per_draw = (lambda a: np.broadcast_to(a, (1, num_draws, len(a))).copy())  # noqa: E731
    stats = inference_data({"sample_stats": {"importance_ess": per_draw(ess), "pareto_k": per_draw(k_hat)}},
                           {"importance_ess": ["galaxy"], "pareto_k": ["galaxy"]},
                           {"galaxy": list(idata.posterior["galaxy"].values)})
    idata.add_groups(sample_stats=stats.sample_stats)
    bad = (k_hat > 0.7) | (ess < 100)
    if warn and bad.any():
        warnings.warn(f"importance sampling unreliable for {int(bad.sum())} of {len(bad)} galaxies "
                      f"(Pareto k-hat up to {k_hat.max():.2f}, ESS down to {ess.min():.0f} of {num_samples}): "
                      "draw more (num_samples) or run MCMC", stacklevel=2)
    return idata
