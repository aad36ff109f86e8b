"""Sequential Monte Carlo: posteriors and evidences by tempering from the prior, many galaxies at once.

MCMC chains started in different modes of a galaxy's posterior stay there
(docs/data.md: four HMC chains of NGC 3522 in separate SFH modes), and R-hat
can only report it. A tempered SMC sampler instead moves a population of
particles from the prior to the posterior through the densities

    pi_beta(u) ∝ p(u) L(u)^beta,   beta = 0 -> 1,

reweighting by L^(beta' - beta) between steps, resampling, and moving every
particle with a few HMC transitions that leave pi_beta' invariant. Modes are
weighted by their posterior mass as the likelihood is switched on, and the
product of the mean incremental weights estimates the evidence
Z = integral of p(u) L(u) du (for model comparison; Bayes factors).

Adaptive choices (per target, so galaxies with sharp and flat likelihoods share
a batch): the next beta by bisection so that the incremental weights keep an
effective sample size of ``ess_target`` x particles; the HMC mass matrix from
the weighted particle covariance at each step; the leapfrog step size from the
previous moves' acceptance. Every (run, galaxy) pair is a *target* and all of
them move in one batched computation of the Pyro program (as
:mod:`sedppl.infer.hmc`); independent runs of the same galaxy give R-hat and
the spread of log Z.

References:
    Del Moral, Doucet & Jasra 2006, "Sequential Monte Carlo samplers", JRSS B 68, 411.
    Jasra et al. 2011, "Inference for Levy-driven stochastic volatility models via
    adaptive SMC", Scand. J. Stat. 38, 1 (the ESS-bisection choice of the next beta).
    Buchholz, Chopin & Jacob 2021, "Adaptive tuning of HMC within SMC", Bayesian Analysis 16, 745.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .hmc import _to_arviz, hmc_transition
from .potential import BatchedPotential, physics_dtype


def _split(potential: BatchedPotential, u: Tensor, base_scale: float | None) -> tuple[Tensor, Tensor]:
    """(log reference density, log L) (B,) at u: the reference is the prior (with the coordinates'
    log|J|; ``base_scale`` None) and L the likelihood, or the normal N(0, base_scale^2 I) of the
    coordinates (a flow's base space) and L the rest of the posterior density (p J / N)."""
    total, loglik, _ = potential.log_densities(u)
    if base_scale is None:
        ll = sum(loglik.values()) if loglik else torch.zeros_like(total)
        return total - ll, ll
    w = u / base_scale
    base = -0.5 * (w * w).sum(-1) - u.shape[-1] * (0.5 * math.log(2 * math.pi) + math.log(base_scale))
    return base, total - base


def _tempered(potential: BatchedPotential, u: Tensor, beta: Tensor,
              base_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """U_beta = -(log reference + beta log L) (B,), its gradient (B, D), and log L (B,) (see :func:`_split`)."""
    u = u.detach().requires_grad_(True)
    base, ll = _split(potential, u, base_scale)
    pot = -(base + beta * ll)
    (grad,) = torch.autograd.grad(pot.sum(), u, allow_unused=False)
    return pot.detach(), grad.detach(), ll.detach()


def _next_beta(ll: Tensor, beta: Tensor, ess_target: float, iters: int = 50) -> Tensor:
    """Per target, the largest beta' <= 1 whose incremental weights L^(beta' - beta) keep an ESS
    of at least ``ess_target`` x particles (bisection). ll: (P, T) log-likelihoods; beta: (T,)."""
    p = ll.shape[0]

    def ess(delta):
        logw = delta * ll
        logw = torch.where(torch.isfinite(logw), logw, torch.full_like(logw, -math.inf))
        w = torch.exp(logw - logw.max(0).values)
        return w.sum(0) ** 2 / (w * w).sum(0) / p

    room = 1.0 - beta
    done = ess(room) >= ess_target
    lo, hi = torch.zeros_like(beta), room.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = ess(mid) >= ess_target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    # at least a tiny step, so that a target whose particles all have the same log L still advances
    step = torch.minimum(torch.maximum(beta + lo, beta + 1e-12), torch.ones_like(beta))
    return torch.where(done, torch.ones_like(beta), step)


def _systematic_resample(logw: Tensor, gen: torch.Generator) -> Tensor:
    """Indices (P, T) of a systematic resampling of each target's particles by weights exp(logw) (P, T)."""
    p, t = logw.shape
    w = torch.softmax(logw, 0)
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0
    pos = (torch.rand(t, generator=gen, dtype=logw.dtype) + torch.arange(p, dtype=logw.dtype)[:, None]) / p
    return torch.searchsorted(cdf.T.contiguous(), pos.T.contiguous()).T.clamp(max=p - 1)


def _particle_covariance(u: Tensor, logw: Tensor) -> Tensor:
    """Weighted covariance (T, D, D) of particles u (P, T, D), eigenvalues floored at 1e-10 of the largest."""
    w = torch.softmax(logw, 0)[..., None]
    mean = (w * u).sum(0)
    x = u - mean
    cov = torch.einsum("ptd,pte->tde", w * x, x)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=1e-10 * evals[..., -1:].clamp(min=1e-30))
    return (evecs * evals[:, None, :]) @ evecs.transpose(-1, -2)


def _hmc_moves(potential, u, beta_b, chol, eps_t, p, t, moves, trajectory_length, max_steps, gen, base_scale):
    """``moves`` HMC transitions of every particle (P * T rows) leaving pi_beta invariant, the step
    size of each target adapted towards a mean acceptance of 0.75 after each.

    Returns (u, U, log L, mean acceptance per target (T,) of the last move, step sizes (T,),
    batched gradient evaluations)."""
    pot, grad, ll = _tempered(potential, u, beta_b, base_scale)
    evaluations = 0
    acc_t = torch.zeros(t, dtype=u.dtype)
    for _ in range(moves):
        out = hmc_transition(lambda x: _tempered(potential, x, beta_b, base_scale), u, pot, grad, ll, chol,
                             eps_t.repeat(p), trajectory_length, max_steps, gen)
        u, pot, grad, ll = out["u"], out["potential"], out["grad"], out["extra"]
        evaluations += out["iterations"]
        acc_t = out["accept_prob"].reshape(p, t).mean(0)
        eps_t = eps_t * torch.exp(2.0 * (acc_t - 0.75)).clamp(0.5, 2.0)
    return u, pot, ll, acc_t, eps_t, evaluations


def sample_smc(potential: BatchedPotential, num_particles: int, ess_target: float = 0.5, moves: int = 5,
               trajectory_length: float = 0.5 * math.pi, max_steps: int = 32, max_stages: int = 500,
               step_size: float = 0.5, generator: torch.Generator | None = None, reference: str = "prior",
               base_scale: float = 1.0, progress: bool = True) -> dict[str, Tensor]:
    """Tempered SMC for every target of a batched potential, from its prior (or a flow) to its posterior.

    Arguments:
        potential: Over B = P x T rows, row ``p * T + t`` being particle p of target t
            (e.g. a model on ``obs.tile(P)``): T independent targets.
        num_particles: P.
        ess_target: Fraction of P the incremental weights' effective sample size is kept at
            when choosing the next beta (0.5: 24-27 steps from the prior for the SDSS spectra of
            docs/data.md, 1-2 from a good flow on photometry).
        moves: HMC transitions of every particle after each resampling.
        trajectory_length, max_steps: HMC integration time (whitened by the particles'
            covariance; jittered 0.5-1.5x) and cap on leapfrog steps per transition.
        step_size: Starting leapfrog step size (whitened units), adapted per target.
        max_stages: Stop with an error if beta has not reached 1 after this many steps.
        reference: "prior": start from prior draws and temper the likelihood; "base": the
            coordinates are a flow's base space (:class:`sedppl.infer.neutra.FlowCoordinates`),
            start from N(0, s^2 I) (the amortized posterior's own draws, s = ``base_scale``) and
            temper the rest of the posterior density, p J / N(0, s^2 I): few steps where the flow
            is good.
        base_scale: s, the standard deviation of the flow's base distribution (its card's
            ``base_scale``); used only with ``reference="base"``.

    Returns:
        {"u": (P, T, D) equal-weight posterior particles, "potential": (P, T) at beta = 1,
        "log_evidence": (T,) log Z in nats, "stages": (T,) tempering steps of each target,
        "betas": list of (T,) per step, "acceptance": (T,) mean acceptance of the last
        moves, "step_size": (T,), "n_grad": leapfrog gradient evaluations per particle}.

    Raises:
        RuntimeError: no particle with a finite likelihood for a target, or ``max_stages`` reached.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    p = num_particles
    if reference not in ("prior", "base"):
        raise ValueError(f"reference must be 'prior' or 'base', not {reference!r}")
    with torch.no_grad():
        u = potential.prior_draw().to(torch.float64)
        if reference == "base":
            u = base_scale * torch.randn(u.shape, generator=gen, dtype=torch.float64)
    ref_scale = float(base_scale) if reference == "base" else None
    bsz, d = u.shape
    if bsz % p:
        raise ValueError(f"the potential has {bsz} rows, not a multiple of {p} particles")
    t = bsz // p
    with torch.no_grad():
        ll = _split(potential, u, ref_scale)[1]
    ll = torch.where(torch.isnan(ll), torch.full_like(ll, -math.inf), ll)
    if not torch.all(torch.isfinite(ll.reshape(p, t)).any(0)):
        raise RuntimeError("no prior draw has a finite likelihood for some target; check the data")
    beta = torch.zeros(t, dtype=torch.float64)
    log_z = torch.zeros(t, dtype=torch.float64)
    eps_t = torch.full((t,), float(step_size), dtype=torch.float64)
    stages = torch.zeros(t, dtype=torch.long)
    betas, n_grad, acc_t = [], 0, torch.ones(t, dtype=torch.float64)
    bar = tqdm(total=1000, disable=not progress, desc="SMC", unit="beta/1000")
    while bool((beta < 1).any()):
        if len(betas) >= max_stages:
            raise RuntimeError(f"SMC: beta reached only {float(beta.min()):.3g} after {max_stages} steps")
        ll_pt = ll.reshape(p, t)
        new = torch.where(beta < 1, _next_beta(ll_pt, beta, ess_target), beta)
        delta = new - beta
        # a particle with log L = -inf gets weight 0 once the likelihood moves; a finished target keeps its weights
        logw = torch.where(delta[None, :] > 0, delta * ll_pt, torch.zeros_like(ll_pt))
        log_z = log_z + torch.logsumexp(logw, 0) - math.log(p)
        stages = stages + (delta > 0).long()
        beta = new
        betas.append(beta.clone())
        cov = _particle_covariance(u.reshape(p, t, d), logw)
        idx = _systematic_resample(logw, gen)
        idx = torch.where((delta > 0)[None, :], idx, torch.arange(p)[:, None].expand(p, t))
        rows = (idx * t + torch.arange(t)[None, :]).reshape(-1)
        u = u[rows]
        chol = torch.linalg.cholesky(cov).repeat(p, 1, 1)
        u, pot, ll, acc_t, eps_t, steps = _hmc_moves(potential, u, beta.repeat(p), chol, eps_t, p, t, moves,
                                                     trajectory_length, max_steps, gen, ref_scale)
        ll = torch.where(torch.isnan(ll), torch.full_like(ll, -math.inf), ll)
        n_grad += steps
        bar.n = int(1000 * float(beta.min()))
        bar.set_postfix(stage=len(betas), beta_min=f"{float(beta.min()):.2e}", accept=f"{float(acc_t.mean()):.2f}",
                        step=f"{float(eps_t.median()):.3g}")
        bar.refresh()
    bar.close()
    return {"u": u.reshape(p, t, d), "potential": pot.reshape(p, t), "log_evidence": log_z, "stages": stages,
            "betas": betas, "acceptance": acc_t, "step_size": eps_t, "n_grad": n_grad}


def run_smc(model: Callable, *args, obs, num_particles: int = 256, num_runs: int = 2, seed: int = 0,
            ess_target: float = 0.5, moves: int = 5, max_steps: int = 32, dtype: torch.dtype = torch.float32,
            posterior=None, predictive: int = 0, student_t_quantiles: bool = True, progress: bool = True,
            **kwargs):
    """Posteriors and evidences of every galaxy of ``obs`` by tempered SMC (:func:`sample_smc`).

    Arguments:
        model: A Pyro program taking ``obs=`` whose latent sites lie in one plate sized from the
            observation (the zoo models; as :func:`sedppl.infer.hmc.run_hmc`).
        obs: An :class:`sedppl.data.Observation` with G galaxies.
        num_particles: P, particles per run and galaxy (the posterior draws of each run).
        num_runs: Independent SMC runs per galaxy, reported as ArviZ chains (R-hat across
            runs, and the spread of log Z, say whether P was enough).
        seed, ess_target, moves, max_steps: See :func:`sample_smc`.
        dtype, student_t_quantiles: Precision of the physics and coordinates of Student-t
            sites, as for :func:`sedppl.infer.hmc.run_hmc` (float64 for high-S/N spectra).
        posterior: A :class:`sedppl.infer.npe.NeuralPosterior` of ``model``: start from its
            draws and temper from it to the exact posterior, in its flow's coordinates
            (``reference="base"`` of :func:`sample_smc`); the result is still the exact
            posterior, and a good flow needs few steps. None: start from the prior.
        predictive: Noise-free model data of this many particles per run (group
            ``posterior_predictive``), 0 for none.
        kwargs: Other keyword arguments of the model.

    Returns:
        ``arviz.InferenceData`` with groups ``posterior`` (chain = run, draw = particle,
        galaxy, ...), ``sample_stats`` (``lp``, ``acceptance_rate`` of the last moves,
        ``step_size``, ``n_steps`` = gradient evaluations a particle, ``diverging`` (none
        are kept: rejected moves stay in place)), ``log_likelihood``, ``observed_data`` and
        ``smc``: ``log_evidence`` (chain, galaxy) in nats and ``stages`` (chain, galaxy).
    """
    import xarray as xr

    with physics_dtype(model, dtype):
        pyro.set_rng_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        g, p, r = obs.n_galaxies, num_particles, num_runs
        t = r * g
        def batched(tiled):
            if posterior is None:
                return BatchedPotential(model, args, {**kwargs, "obs": tiled}, dtype=dtype,
                                        student_t_quantiles=student_t_quantiles)
            from .neutra import FlowCoordinates

            return BatchedPotential(model, args, {**kwargs, "obs": tiled},
                                    coordinates=FlowCoordinates(posterior, tiled, dtype))

        res = sample_smc(batched(obs.tile(p * r)), p, ess_target=ess_target, moves=moves, max_steps=max_steps,
                         generator=gen, reference="prior" if posterior is None else "base",
                         base_scale=1.0 if posterior is None else float(posterior.flow.base.scale[0]),
                         progress=progress)
        out = batched(obs.tile(r))
        full = (lambda v: v[None, :].expand(p, t).clone())  # noqa: E731
        stats = {"u": res["u"], "potential": res["potential"], "diverging": torch.zeros(p, t, dtype=torch.bool),
                 "accept_prob": full(res["acceptance"]), "step_size": full(res["step_size"]),
                 "n_steps": torch.full((p, t), res["n_grad"], dtype=torch.long)}
        idata = _to_arviz(out, stats, r, g, predictive)
    smc = xr.Dataset({"log_evidence": (("chain", "galaxy"), res["log_evidence"].reshape(r, g).numpy()),
                      "stages": (("chain", "galaxy"), res["stages"].reshape(r, g).numpy())},
                     coords={"chain": np.arange(r), "galaxy": np.arange(g)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "smc" is not one of ArviZ's standard groups
        idata.add_groups({"smc": smc})
    return idata
