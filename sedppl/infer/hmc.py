"""Hamiltonian Monte Carlo for many galaxies at once: one batched computation.

Pyro's NUTS follows one potential at a time; a catalog of galaxies, or the
several chains of one galaxy, would run one after another, each paying the
full per-gradient overhead of the forward model (tens of milliseconds for
one galaxy on a CPU, mostly small tensor operations). Here every
(chain, galaxy) pair is an independent *target* and all targets move
together: one gradient of a Pyro program whose plate holds chains x galaxies
gives every target's gradient (measured for ``SpecPhotModel``, 2 threads:
one target 86 ms, 80 targets 393 ms; ``PhotometryModel``: 29 ms and 51 ms;
benchmarks/RESULTS.md).

Each target has its own step size (dual averaging to a target acceptance
rate), its own dense mass matrix (started at the Laplace approximation of its
mode, then re-estimated from its own warmup draws in Stan's widening windows)
and its own accept/reject, so one difficult galaxy does not slow or spoil the
others, except that the batch waits for the longest trajectory. Trajectories
are static HMC with a jittered length in the whitened coordinates (a random
multiple 0.5-1.5 of ``trajectory_length``, drawn independently of the state,
so detailed balance holds); a transition whose energy error exceeds 1000 is
divergent.

The model must put every latent site inside one plate over galaxies
(``pyro.plate("galaxies", n)`` sized from the observation, as the zoo models
do); the observation is tiled once per chain (:meth:`sedppl.data.Observation.tile`).

References:
    Neal 2011, "MCMC using Hamiltonian dynamics", Handbook of MCMC, ch. 5.
    Hoffman & Gelman 2014, JMLR 15, 1593 (dual-averaging step size).
    Stan Reference Manual, "HMC algorithm parameters" (windowed adaptation).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from tqdm.auto import tqdm

from .hmc_checkpoint import read_state, saved_start, write_state
from .potential import BatchedPotential, find_modes, laplace_covariance, physics_dtype

DIVERGENCE_ENERGY = 1000.0


def warmup_windows(num_warmup: int) -> list[int]:
    """Iterations (0-based) after which the mass matrix is re-estimated, as Stan does:
    a fast phase of 75 iterations (step size only), slow windows of 25, 50, 100, ...
    (the last stretched to the end), a final fast phase of 50; for warmups under 150,
    15% / 75% / 10%."""
    if num_warmup < 20:
        return []
    init, term, width = 75, 50, 25
    if num_warmup < init + term + width:
        init, term = int(0.15 * num_warmup), int(0.1 * num_warmup)
        width = num_warmup - init - term
    ends, start = [], init
    while start < num_warmup - term:
        end = start + width
        if end + 2 * width > num_warmup - term:
            end = num_warmup - term
        ends.append(end - 1)
        start, width = end, 2 * width
    return ends


def _to_white(chol: Tensor, u: Tensor) -> Tensor:
    """Whitened coordinates w = L^-1 u (B, D) for inverse mass matrices L L^T."""
    return torch.linalg.solve_triangular(chol, u[..., None], upper=False)[..., 0]


def _from_white(chol: Tensor, w: Tensor) -> Tensor:
    """u = L w (B, D)."""
    return (chol @ w[..., None])[..., 0]


def _white_grad(chol: Tensor, grad: Tensor) -> Tensor:
    """dU/dw = L^T dU/du (B, D); non-finite entries set to 0 (the caller rejects those targets)."""
    return (chol.transpose(-1, -2) @ torch.nan_to_num(grad)[..., None])[..., 0]


def hmc_transition(value_and_grad: Callable, u: Tensor, pot: Tensor, grad: Tensor, extra: Tensor | None,
                   chol: Tensor, eps: Tensor, trajectory_length: float, max_steps: int,
                   gen: torch.Generator) -> dict:
    """One static HMC transition of every target, in the coordinates whitened by ``chol``.

    The leapfrog length is ``trajectory_length`` x a uniform 0.5-1.5 jitter / ``eps`` steps
    (at most ``max_steps``); a target whose potential or gradient turns non-finite stops
    and is rejected as divergent, as is an energy error above ``DIVERGENCE_ENERGY``.

    Arguments:
        value_and_grad: u (B, D) -> (U (B,), dU/du (B, D), extra (B,) or None): the potential,
            its gradient and one more per-target quantity carried with the state (SMC's log
            likelihood), or None.
        u, pot, grad, extra: The current state: (B, D), (B,), (B, D), (B,) or None.
        chol: (B, D, D) Cholesky factors of the inverse mass matrices (u = L w).
        eps: (B,) leapfrog step sizes in whitened units.
        trajectory_length, max_steps: Integration time and the cap on leapfrog steps.
        gen: The random generator (jitter, momenta, acceptance, in that order).

    Returns:
        {"u", "potential", "grad", "extra": the state after the transition; "accept_prob",
        "diverging", "n_steps": (B,); "iterations": batched gradient evaluations (int)}.
    """
    b, d = u.shape
    dtype = u.dtype
    jit = 0.5 + torch.rand(b, generator=gen, dtype=dtype)
    n_steps = torch.clamp(torch.ceil(trajectory_length * jit / eps), 1, max_steps).long()
    p = torch.randn(b, d, generator=gen, dtype=dtype)
    h0 = pot + 0.5 * (p * p).sum(-1)
    # whitened coordinates: u = L w, so grad_w = L^T grad_u and the kinetic energy is |p|^2 / 2
    w = _to_white(chol, u)
    alive = torch.isfinite(pot)
    w_new, p_new = w.clone(), p - 0.5 * eps[:, None] * _white_grad(chol, grad)
    pot_new, g_new, x_new = pot.clone(), grad.clone(), None if extra is None else extra.clone()
    iterations = 0
    for step in range(int(n_steps.max())):
        moving = alive & (step < n_steps)
        if not moving.any():
            break
        w_try = torch.where(moving[:, None], w_new + eps[:, None] * p_new, w_new)
        pot_try, g_try, x_try = value_and_grad(_from_white(chol, w_try))
        iterations += 1
        bad = moving & (~torch.isfinite(pot_try) | ~torch.isfinite(g_try).all(-1))
        alive, moving = alive & ~bad, moving & ~bad
        last = (step + 1 == n_steps)[:, None]
        p_try = p_new - torch.where(last, 0.5, 1.0) * eps[:, None] * _white_grad(chol, g_try)
        m = moving[:, None]
        w_new, p_new = torch.where(m, w_try, w_new), torch.where(m, p_try, p_new)
        pot_new, g_new = torch.where(moving, pot_try, pot_new), torch.where(m, g_try, g_new)
        if x_new is not None:
            x_new = torch.where(moving, x_try, x_new)
    delta = pot_new + 0.5 * (p_new * p_new).sum(-1) - h0
    diverging = ~alive | ~torch.isfinite(delta) | (delta > DIVERGENCE_ENERGY)
    accept_prob = torch.where(diverging, torch.zeros_like(delta), torch.exp(-delta).clamp(max=1.0))
    accept = torch.rand(b, generator=gen, dtype=dtype) < accept_prob
    return {"u": torch.where(accept[:, None], _from_white(chol, w_new), u),
            "potential": torch.where(accept, pot_new, pot), "grad": torch.where(accept[:, None], g_new, grad),
            "extra": None if extra is None else torch.where(accept, x_new, extra),
            "accept_prob": accept_prob, "diverging": diverging, "n_steps": n_steps, "iterations": iterations}


class _DualAveraging:
    """Nesterov dual averaging of log step size per target (Hoffman & Gelman 2014, Alg. 5)."""

    def __init__(self, step: Tensor, target: float, gamma=0.05, t0=10.0, kappa=0.75):
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.reset(step)

    def reset(self, step: Tensor) -> None:
        self.mu = torch.log(10 * step)
        self.hbar = torch.zeros_like(step)
        self.log_avg = torch.zeros_like(step)
        self.t = 0

    def update(self, accept: Tensor) -> Tensor:
        self.t += 1
        w = 1 / (self.t + self.t0)
        self.hbar = (1 - w) * self.hbar + w * (self.target - accept)
        log_step = self.mu - math.sqrt(self.t) / self.gamma * self.hbar
        eta = self.t ** -self.kappa
        self.log_avg = eta * log_step + (1 - eta) * self.log_avg
        return torch.exp(log_step)

    def final(self) -> Tensor:
        return torch.exp(self.log_avg)


def sample_hmc(potential: BatchedPotential, start: Tensor, num_warmup: int, num_samples: int,
               inverse_mass: Tensor | None = None, trajectory_length: float = 0.5 * math.pi,
               target_accept: float = 0.8, max_steps: int = 128, step_size: float = 1.0,
               generator: torch.Generator | None = None, progress: bool = True,
               checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 25) -> dict[str, Tensor]:
    """Batched static HMC with jittered trajectory lengths and per-target adaptation.

    Arguments:
        potential: The targets' potential (B targets, D dimensions).
        start: u (B, D) float64 starting points.
        num_warmup, num_samples: Iterations of adaptation (discarded) and of sampling.
        inverse_mass: (B, D, D) starting inverse mass matrices (covariances), e.g.
            :func:`laplace_covariance`; identity by default.
        trajectory_length: Integration time in whitened units (pi/2 is a quarter orbit of a
            unit Gaussian); each transition uses a uniform random 0.5-1.5 multiple.
        target_accept: Mean acceptance probability the step sizes adapt to.
        max_steps: Cap on leapfrog steps per transition.
        step_size: Largest starting step size (whitened units); halved per target until one
            leapfrog step is accepted with probability > 0.5.
        checkpoint: A file that holds the whole state of the run (position, adaptation,
            draws so far, random generator), rewritten atomically every ``checkpoint_every``
            iterations and at the end. If it exists, the run continues from it and gives the
            same draws as an uninterrupted run; a finished run's file returns its result
            without sampling, or, with a larger ``num_samples``, goes on to draw the rest.
            Read with ``torch.load(weights_only=True)`` (tensors and numbers only). A file
            written for other settings, starting points or a potential that differs at its
            saved positions (another observation or model) raises ValueError.

    Returns:
        {"u": (S, B, D) draws, "potential": (S, B), "accept_prob", "diverging", "n_steps",
        "step_size": (S, B), "inverse_mass": (B, D, D), "warmup_divergences": (B,)}.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    b, d = start.shape
    dtype = start.dtype
    settings = {"targets": b, "dimensions": d, "num_warmup": num_warmup, "num_samples": num_samples,
                "trajectory_length": float(trajectory_length), "target_accept": float(target_accept),
                "max_steps": int(max_steps)}
    keys = ("u", "potential", "accept_prob", "diverging", "n_steps", "step_size")
    ends = set(warmup_windows(num_warmup))
    saved = read_state(checkpoint, settings, start, potential) if checkpoint is not None else None
    if saved is None:
        cov = (torch.eye(d, dtype=dtype).expand(b, d, d).clone() if inverse_mass is None
               else inverse_mass.to(dtype).clone())
        chol = torch.linalg.cholesky(cov)
        eps = _initial_step_size(potential, start, chol, float(step_size), gen)
        adapt = _DualAveraging(eps, target_accept)
        window: list[Tensor] = []
        u = start.clone()
        pot, grad = potential.value_and_grad(u)
        if not torch.all(torch.isfinite(pot)):
            raise ValueError(f"{int((~torch.isfinite(pot)).sum())} starting points have no finite density")
        out: dict[str, list] = {k: [] for k in keys}
        warm_div = torch.zeros(b, dtype=torch.long)
        first = 0
    else:
        first, u, pot, grad, eps, cov = (saved[k] for k in ("iteration", "u", "pot", "grad", "eps", "cov"))
        chol = torch.linalg.cholesky(cov)
        adapt = _DualAveraging(eps, target_accept)
        adapt.mu, adapt.hbar, adapt.log_avg = saved["adapt_mu"], saved["adapt_hbar"], saved["adapt_log_avg"]
        adapt.t = int(saved["adapt_t"])
        window = list(saved["window"].unbind(1))
        out = {k: list(saved["out_" + k].unbind(0)) for k in keys}
        warm_div = saved["warm_div"]
        gen.set_state(saved["generator"])

    def save(iteration: int) -> None:
        state = {**settings, "iteration": iteration, "start": start, "u": u, "pot": pot, "grad": grad,
                 "eps": eps, "cov": cov, "adapt_mu": adapt.mu, "adapt_hbar": adapt.hbar,
                 "adapt_log_avg": adapt.log_avg, "adapt_t": adapt.t, "warm_div": warm_div,
                 "window": torch.stack(window, 1) if window else torch.empty(b, 0, d, dtype=dtype),
                 "generator": gen.get_state()}
        for k in keys:
            state["out_" + k] = torch.stack(out[k]) if out[k] else torch.empty(0)
        write_state(state, checkpoint)

    bar = tqdm(total=num_warmup + num_samples, initial=first, disable=not progress, desc="HMC", unit="it")
    for it in range(first, num_warmup + num_samples):
        warm = it < num_warmup
        step_out = hmc_transition(lambda x: (*potential.value_and_grad(x), None), u, pot, grad, None, chol, eps,
                                  trajectory_length, max_steps, gen)
        u, pot, grad = step_out["u"], step_out["potential"], step_out["grad"]
        accept_prob, diverging, n_steps = step_out["accept_prob"], step_out["diverging"], step_out["n_steps"]
        if warm:
            warm_div += diverging.long()
            eps = adapt.update(accept_prob)
            window.append(u.clone())
            if it in ends:
                cov = _window_covariance(torch.stack(window, 1), cov)
                chol = torch.linalg.cholesky(cov)
                window = []
                adapt.reset(eps)
            if it == num_warmup - 1:
                eps = adapt.final()
        else:
            for k, v in zip(keys, (u, pot, accept_prob, diverging, n_steps, eps)):
                out[k].append(v.clone())
        bar.update(1)
        if it % 10 == 0:
            bar.set_postfix(step=f"{float(eps.median()):.3g}", accept=f"{float(accept_prob.mean()):.2f}")
        if checkpoint is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == num_warmup + num_samples):
            save(it + 1)
    bar.close()
    res = {k: torch.stack(v) if v else torch.empty(0) for k, v in out.items()}
    res["inverse_mass"] = cov
    res["warmup_divergences"] = warm_div
    return res


def _initial_step_size(potential, u: Tensor, chol: Tensor, step: float, gen: torch.Generator,
                       tries: int = 12) -> Tensor:
    """Per-target starting step size: halved from ``step`` until one leapfrog step from ``u``
    has an acceptance probability above 0.5 (cf. Hoffman & Gelman 2014, Alg. 4)."""
    b, d = u.shape
    eps = torch.full((b,), step, dtype=u.dtype)
    pot, grad = potential.value_and_grad(u)
    gw, w = _white_grad(chol, grad), _to_white(chol, u)
    todo = torch.ones(b, dtype=torch.bool)
    for _ in range(tries):
        p = torch.randn(b, d, generator=gen, dtype=u.dtype)
        p1 = p - 0.5 * eps[:, None] * gw
        w1 = w + eps[:, None] * p1
        pot1, g1 = potential.value_and_grad(_from_white(chol, w1))
        p1 = p1 - 0.5 * eps[:, None] * _white_grad(chol, g1)
        delta = pot1 + 0.5 * (p1 * p1).sum(-1) - pot - 0.5 * (p * p).sum(-1)
        ok = torch.isfinite(delta) & (delta < math.log(2.0))
        todo = todo & ~ok
        if not todo.any():
            break
        eps = torch.where(todo, 0.5 * eps, eps)
    return eps


def _window_covariance(draws: Tensor, previous: Tensor) -> Tensor:
    """Covariance of a window of draws (B, n, D), shrunk towards the previous estimate with
    a weight of D pseudo-draws (so it stays positive definite for short windows)."""
    n, d = draws.shape[1], draws.shape[2]
    x = draws - draws.mean(1, keepdim=True)
    s = x.transpose(1, 2) @ x / max(n - 1, 1)
    cov = (n * s + d * previous) / (n + d)
    return 0.5 * (cov + cov.transpose(-1, -2))


def run_hmc(model: Callable, *args, obs, num_samples: int = 500, warmup_steps: int = 500,
            num_chains: int = 4, seed: int = 0, posterior=None, map_restarts: int = 4, map_steps: int = 200,
            jitter: float = 1.0, trajectory_length: float = 0.5 * math.pi, target_accept: float = 0.8,
            max_steps: int = 128, dtype: torch.dtype = torch.float32, neutra: bool = True, init_draws: int = 64,
            predictive: int = 0, student_t_quantiles: bool = True, progress: bool = True,
            checkpoint: str | os.PathLike | None = None, laplace_mass: bool = False, **kwargs):
    """Sample the posteriors of every galaxy of ``obs``, with several chains each, in one batch.

    With ``posterior`` (a trained amortized posterior of this model), the chains
    run in its flow's base space (:mod:`sedppl.infer.neutra`) and start from
    independent flow draws, with identity mass matrices; with ``neutra=False`` it
    only finds the starts: the mode search begins at the best (highest posterior
    density) of ``init_draws`` amortized draws per galaxy instead of prior draws,
    which matters for spectra, whose posteriors have many local optima far from
    the prior's bulk. Otherwise they run in
    the model's unconstrained coordinates and start near each galaxy's mode (the
    best of ``map_restarts`` L-BFGS runs from prior draws): chain 0 at the mode,
    the others at a draw of the Laplace approximation scaled by ``jitter``, with
    the mass matrices started at the Laplace covariance.

    Arguments:
        model: A Pyro program taking ``obs=`` whose latent sites all lie in one plate sized
            from the observation (the zoo models; see the module docstring).
        obs: An :class:`sedppl.data.Observation` with G galaxies.
        num_samples, warmup_steps, num_chains: Per chain.
        seed: Seed of everything random here.
        posterior: A :class:`sedppl.infer.npe.NeuralPosterior` of ``model`` to precondition with, or None.
        map_restarts, map_steps: Mode search (random starts per galaxy; L-BFGS iterations).
        neutra, init_draws: With ``posterior``: sample in its flow's coordinates (True), or
            start the mode search from the best of ``init_draws`` of its draws (False).
        predictive: Keep the noise-free model data (the means of the observed sites: the
            model spectrum and band fluxes) of this many evenly spaced draws per chain, as
            group ``posterior_predictive`` (for chi2/dof and plots); 0 for none.
        jitter: Scale of the Laplace draw that starts chains 1, 2, ... (0: all at the mode).
        trajectory_length, target_accept, max_steps: See :func:`sample_hmc`.
        dtype: Precision of the site values and of the model's physics during the run
            (:func:`sedppl.infer.potential.physics_dtype`): ``torch.float64`` for high-S/N
            spectra, whose float32 potential carries rounding errors of order 1 (docs/inference.md);
            float32 (the default) for photometry.
        student_t_quantiles: Without a flow: sample Student-t sites (the continuity prior's
            ``log_sfr_ratio``) in their prior-quantile coordinates (True) or as they are
            (False); see :class:`sedppl.infer.potential.UnconstrainedCoordinates`.
        laplace_mass: With ``posterior`` and ``neutra``: every chain climbs from its own flow
            draw to a mode in the flow's coordinates (L-BFGS, ``map_steps`` iterations), starts
            at a draw of the Laplace approximation there (scaled by ``jitter``) and takes its
            Laplace covariance as the first inverse mass matrix. Chains of one galaxy that end
            at different local optima show it in R-hat. For posteriors much narrower than the
            amortized one (spectra): a raw flow draw can lie 10^5 nats below the mode, where a
            chain adapts a tiny step and stays for hundreds of iterations.
        checkpoint: A file to save the sampler's state to as it runs, and to continue from
            if it exists (:func:`sample_hmc`): the run picks up at the saved iteration, with
            no new search for starts, once the potential at the saved positions matches.
        kwargs: Other keyword arguments of the model.

    Returns:
        ``arviz.InferenceData``: ``posterior`` (latent and deterministic sites,
        (chain, draw, galaxy, ...)), ``sample_stats`` (``diverging``,
        ``acceptance_rate``, ``n_steps`` = gradient evaluations, ``step_size``,
        ``lp``), ``log_likelihood`` (per observed site, summed over its pixels or
        bands) and ``observed_data``; R-hat / ESS / divergences are checked with a
        warning (:func:`sedppl.infer.nuts.check_convergence`).
    """
    with physics_dtype(model, dtype):
        return _run_hmc(model, args, kwargs, obs, num_samples, warmup_steps, num_chains, seed, posterior,
                        map_restarts, map_steps, jitter, trajectory_length, target_accept, max_steps, dtype,
                        neutra, init_draws, predictive, student_t_quantiles, progress, checkpoint, laplace_mass)


def _run_hmc(model, args, kwargs, obs, num_samples, warmup_steps, num_chains, seed, posterior, map_restarts,
             map_steps, jitter, trajectory_length, target_accept, max_steps, dtype, neutra, init_draws, predictive,
             quantiles, progress, checkpoint, laplace_mass):
    from .nuts import check_convergence

    pyro.set_rng_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g = obs.n_galaxies
    tiled = obs.tile(num_chains)
    resumed = saved_start(checkpoint)  # a run to continue: its saved state replaces the search for starts
    if posterior is not None and neutra:
        from .neutra import FlowCoordinates
        from .npe import NeuralPosterior

        if not isinstance(posterior, NeuralPosterior):
            raise ValueError(f"sampling in a flow's coordinates (neutra=True) needs a NeuralPosterior, not a "
                             f"{type(posterior).__name__}; pass neutra=False to start the chains from its draws")

        potential = BatchedPotential(model, args, {**kwargs, "obs": tiled},
                                     coordinates=FlowCoordinates(posterior, tiled, dtype))
        start, inverse_mass = resumed, None
        if start is None:
            start, inverse_mass = _flow_starts(potential, num_chains, g, laplace_mass, map_steps, jitter, gen)
    elif resumed is not None:
        potential = BatchedPotential(model, args, {**kwargs, "obs": tiled}, dtype=dtype, student_t_quantiles=quantiles)
        start, inverse_mass = resumed, None
    else:
        starts = None if posterior is None else _posterior_draws(model, args, kwargs, obs, posterior,
                                                                 init_draws, seed, dtype, quantiles)
        start, cov = _mode_starts(model, args, kwargs, obs, num_chains, map_restarts, map_steps, jitter, gen,
                                  dtype, quantiles, starts)
        potential = BatchedPotential(model, args, {**kwargs, "obs": tiled}, dtype=dtype, student_t_quantiles=quantiles)
        with torch.no_grad():
            ok = torch.isfinite(potential(start))
        start = torch.where(ok[:, None], start, start[:g].repeat(num_chains, 1))
        inverse_mass = cov.repeat(num_chains, 1, 1)
    res = sample_hmc(potential, start, warmup_steps, num_samples, inverse_mass=inverse_mass,
                     trajectory_length=trajectory_length, target_accept=target_accept, max_steps=max_steps,
                     generator=gen, progress=progress, checkpoint=checkpoint)
    idata = _to_arviz(potential, res, num_chains, g, predictive)
    check_convergence(idata)
    return idata


#: A chain whose mode lies this many nats above the best mode of its galaxy's chains restarts from that one.
STRANDED_NATS = 100.0


def _flow_starts(potential: BatchedPotential, chains: int, g: int, laplace_mass: bool, steps: int, jitter: float,
                 gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Starts (chains * G, D) in a flow's base space and the first inverse mass matrices (None: identity):
    flow draws, or (``laplace_mass``) Laplace draws at the modes the flow draws climb to.

    With ``laplace_mass``, a chain whose climb ended more than ``STRANDED_NATS`` above the best
    of its galaxy's chains (a far local optimum, or L-BFGS stalled on a sum of potentials that
    one bad start dominates) takes the best chain's mode instead: such a region holds a
    fraction ~exp(-100) of the posterior, and a chain left there adapts a vanishing step and
    never leaves (seen on a DESI-like mock: 4e8 nats above, step size 4e-11). Likewise a
    chain whose Laplace draw lands more than ``STRANDED_NATS`` above its mode (a direction
    where the finite-difference Hessian is wrong: 4e7 nats on another mock) starts at the mode."""
    start = torch.randn(chains * g, potential.dim, generator=gen, dtype=torch.float64)
    for _ in range(20):  # redraw the rare start outside the support
        with torch.no_grad():
            bad = ~torch.isfinite(potential(start))
        if not bad.any():
            break
        start[bad] = torch.randn(int(bad.sum()), potential.dim, generator=gen, dtype=torch.float64)
    inverse_mass = None
    if laplace_mass:  # every chain climbs from its own flow draw to a mode, then starts a Laplace draw off it
        mode, pot = find_modes(potential, start, steps=steps)
        pot = torch.where(torch.isfinite(pot), pot, torch.full_like(pot, float("inf"))).reshape(chains, g)
        best = pot.argmin(0)  # per galaxy
        stranded = (pot > pot.min(0).values + STRANDED_NATS).reshape(-1)
        mode = mode.reshape(chains, g, -1)
        mode = torch.where(stranded.reshape(chains, g, 1), mode[best, torch.arange(g)], mode).reshape(chains * g, -1)
        if stranded.any():  # again, now that no stranded start dominates the summed objective
            mode, _ = find_modes(potential, mode, steps=steps)
        inverse_mass = laplace_covariance(potential, mode)
        kick = (torch.linalg.cholesky(inverse_mass) @ torch.randn(*mode.shape, 1, generator=gen,
                                                                  dtype=mode.dtype))[..., 0]
        start = mode + jitter * kick
        with torch.no_grad():  # a kick along a direction the Laplace fit got wrong can land far out: not taken
            rise = potential(start) - potential(mode)
        start = torch.where((torch.isfinite(rise) & (rise < STRANDED_NATS))[:, None], start, mode)
    return start, inverse_mass


def _posterior_draws(model, args, kwargs, obs, posterior, n, seed, dtype, quantiles) -> Tensor:
    """u (G, D): the highest-density of ``n`` amortized draws of every galaxy."""
    g = obs.n_galaxies
    post = posterior.sample(obs, n, derived=False, seed=seed).posterior
    pot = BatchedPotential(model, args, {**kwargs, "obs": obs.tile(n)}, dtype=dtype, student_t_quantiles=quantiles)
    values = {}
    for k in pot.names:  # (1, draw, galaxy, *event) -> (draw * galaxy, *event), galaxy fastest as in tile
        v = torch.as_tensor(post[k].values)
        values[k] = v.reshape((n * g,) + tuple(v.shape[3:]))
    u = pot.flatten(values)
    with torch.no_grad():
        p = pot(u)
    p = torch.where(torch.isfinite(p), p, torch.full_like(p, float("inf"))).reshape(n, g)
    return u.reshape(n, g, -1)[p.argmin(0), torch.arange(g)]


def _mode_starts(model, args, kwargs, obs, chains, restarts, steps, jitter, gen, dtype, quantiles,
                 starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Starting points (chains * G, D) near each galaxy's mode, and the Laplace covariances (G, D, D).

    The mode search starts from ``restarts`` prior draws per galaxy, or from ``starts`` (G, D)."""
    g = obs.n_galaxies
    if starts is not None:
        restarts = 1
    many = BatchedPotential(model, args, {**kwargs, "obs": obs.tile(restarts)}, dtype=dtype,
                            student_t_quantiles=quantiles)
    u_r, pot_r = find_modes(many, many.prior_draw() if starts is None else starts, steps=steps)
    pot_r = torch.where(torch.isfinite(pot_r), pot_r, torch.full_like(pot_r, float("inf"))).reshape(restarts, g)
    if not torch.all(torch.isfinite(pot_r.min(0).values)):
        raise RuntimeError("no finite posterior density found from any start for some galaxy; check the data")
    mode = u_r.reshape(restarts, g, -1)[pot_r.argmin(0), torch.arange(g)]
    cov = laplace_covariance(BatchedPotential(model, args, {**kwargs, "obs": obs}, dtype=dtype,
                                              student_t_quantiles=quantiles), mode)
    chol = torch.linalg.cholesky(cov)
    kick = (chol.repeat(chains, 1, 1) @ torch.randn(chains * g, mode.shape[1], 1, generator=gen,
                                                    dtype=mode.dtype))[..., 0]
    kick[:g] = 0.0  # chain 0 starts at the mode
    return mode.repeat(chains, 1) + jitter * kick, cov


def _to_arviz(potential: BatchedPotential, res: dict, chains: int, g: int, predictive: int = 0):
    """(draw, chain * galaxy) draws to InferenceData with (chain, draw, galaxy, ...) variables
    (and the observed sites' means at ``predictive`` evenly spaced draws)."""
    import arviz as az

    draws = res["u"]
    s = draws.shape[0]
    post: dict[str, list] = {}
    loglik: dict[str, list] = {}
    pred: dict[str, list] = {}
    keep = set(np.linspace(0, s - 1, min(predictive, s)).round().astype(int).tolist()) if predictive else set()
    observed = {}
    with torch.no_grad():
        for i in range(s):
            _, ll, tr = potential.log_densities(draws[i])
            for name, site in tr.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if name in potential.names or site["infer"].get("_deterministic", False):
                    post.setdefault(name, []).append(site["value"].detach())
                    continue
                if i == 0:
                    observed[name] = site["value"].detach()[:g].numpy()
                if i in keep:
                    pred.setdefault(name, []).append(site["fn"].mean.detach())
            for k, v in ll.items():
                loglik.setdefault(k, []).append(v)

    def layout(v: Tensor) -> np.ndarray:  # (draw, chain * galaxy, ...) -> (chain, draw, galaxy, ...)
        v = v.reshape((v.shape[0], chains, g) + tuple(v.shape[2:]))
        return v.transpose(0, 1).numpy()

    posterior = {k: layout(torch.stack(v)) for k, v in post.items()}
    stats = {"diverging": layout(res["diverging"]), "acceptance_rate": layout(res["accept_prob"]),
             "n_steps": layout(res["n_steps"]), "step_size": layout(res["step_size"]),
             "lp": layout(-res["potential"])}
    dims = {k: ["galaxy"] + [f"{k}_dim_{j}" for j in range(v.ndim - 3)] for k, v in posterior.items()}
    dims.update({k: ["galaxy"] for k in stats})
    ll = {k: layout(torch.stack(v)) for k, v in loglik.items()}
    dims.update({k: ["galaxy"] for k in ll})
    pp = {k: layout(torch.stack(v)) for k, v in pred.items()}
    dims.update({k: ["galaxy"] + [f"{k}_dim_{j}" for j in range(v.ndim - 3)] for k, v in pp.items()})
    return az.from_dict(posterior=posterior, sample_stats=stats, log_likelihood=ll, observed_data=observed,
                        posterior_predictive=pp or None, dims=dims)
