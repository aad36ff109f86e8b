"""NUTS (Pyro) on any sedppl Pyro program, returning ArviZ InferenceData.

Chains start near the posterior mode: the minimum of the potential in NUTS's
unconstrained space (L-BFGS from several random draws of the prior, the best
kept), then each chain starts from it with a small jitter. The dense mass
matrix starts at the Laplace approximation there (inverse Hessian), so warmup
begins with sensible trajectories even for narrow, correlated posteriors, and
the potential is traced with TorchScript.
Chains run one after another (two cores do not gain from parallel chains) with
a progress bar each. The result has posterior, sample_stats (diverging,
tree depth, ...), log_likelihood, prior and posterior predictive and observed
data, and R-hat / ESS are checked with a warning when they are poor.
``sample_stats`` also has ``n_steps`` (leapfrog steps, i.e. gradient
evaluations, per draw), ``tree_depth`` = ceil(log2(n_steps + 1)) and ``step_size``.

References:
    Hoffman & Gelman 2014, JMLR 15, 1593 (NUTS).
    Vehtari et al. 2021, Bayesian Analysis 16, 667 (rank-normalised R-hat, ESS).
"""

from __future__ import annotations

import warnings
from typing import Callable

import pyro
import torch
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.autoguide.initialization import init_to_value


class _CountingNUTS(NUTS):
    """NUTS that counts its leapfrog steps (gradient evaluations) per draw, and can start
    from a given dense inverse mass matrix (e.g. a Laplace approximation) instead of identity."""

    leapfrog_steps = 0
    start_inverse_mass: torch.Tensor | None = None

    def _initialize_adapter(self):
        super()._initialize_adapter()
        if self.start_inverse_mass is not None and self._adapter.dense_mass is True:
            key = tuple(sorted(self.initial_params))
            m = self.start_inverse_mass.to(self._potential_energy_last.dtype)
            self.mass_matrix_adapter.inverse_mass_matrix = {key: m}
            self._adapter.reset_step_size_adaptation(self._initial_params)

    def _build_basetree(self, *args, **kwargs):
        self.leapfrog_steps += 1
        return super()._build_basetree(*args, **kwargs)


def deterministic_sites(model: Callable, *args, **kwargs) -> set[str]:
    """Names of a model's ``pyro.deterministic`` sites (derived quantities)."""
    return set(_deterministic_shapes(model, *args, **kwargs))


def _deterministic_shapes(model: Callable, *args, **kwargs) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a model's ``pyro.deterministic`` sites, from one trace."""
    tr = pyro.poutine.trace(model).get_trace(*args, **kwargs)
    return {name: tuple(site["value"].shape) for name, site in tr.nodes.items()
            if site["type"] == "sample" and site["infer"].get("_deterministic", False)}


class _FlatPotential:
    """A model's potential energy (Pyro's ``initialize_model``) as a function of one flat
    vector of unconstrained values, sites in sorted order (as Pyro's dense mass matrix)."""

    def __init__(self, model: Callable, args, kwargs, jit_compile: bool):
        import pyro.infer.mcmc.util as mcmc_util

        self.model, self.args, self.kwargs = model, args, kwargs
        params, self.fn, self.transforms, _ = mcmc_util.initialize_model(
            model, model_args=args, model_kwargs=kwargs, jit_compile=jit_compile, skip_jit_warnings=True)
        self.names = sorted(params)
        self.shapes = {k: params[k].shape for k in self.names}
        self.dtypes = {k: params[k].dtype for k in self.names}
        self.sizes = [params[k].numel() for k in self.names]

    def flatten(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flat unconstrained vector from constrained {site: value}."""
        u = [self.transforms[k](values[k]) if k in self.transforms else values[k] for k in self.names]
        return torch.cat([v.detach().reshape(-1) for v in u])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{site: unconstrained value} from a flat vector (what the potential takes)."""
        return {k: p.reshape(self.shapes[k]).to(self.dtypes[k])
                for k, p in zip(self.names, torch.split(flat, self.sizes))}

    def constrained(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{site: constrained value} from a flat vector."""
        return {k: (self.transforms[k].inv(v) if k in self.transforms else v).detach()
                for k, v in self.unflatten(flat).items()}

    def prior_draw(self) -> torch.Tensor:
        """A flat unconstrained point drawn from the prior (a random start)."""
        tr = pyro.poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
        return self.flatten({k: tr.nodes[k]["value"] for k in self.names})


def find_map(model: Callable, *args, steps: int = 200, restarts: int = 4, jit_compile: bool = True,
             **kwargs) -> dict[str, torch.Tensor]:
    """Posterior mode in NUTS's unconstrained coordinates, best of several restarts.

    Minimises the potential energy (minus log joint density, with the Jacobians
    of the transforms to unconstrained space) by L-BFGS with a strong-Wolfe line
    search from random draws of the prior.

    Arguments:
        model: The Pyro program; ``args``/``kwargs`` are passed to it.
        steps: L-BFGS iterations per restart.
        restarts: Random starts drawn from the prior.
        jit_compile: Trace the potential with TorchScript (once, for every restart).

    Returns:
        {site name: constrained value} at the lowest potential found.
    """
    pot = _FlatPotential(model, args, kwargs, jit_compile)
    best, best_u = None, float("inf")
    for _ in range(restarts):
        x = pot.prior_draw().double().requires_grad_()
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-10, history_size=20)

        def closure():
            opt.zero_grad()
            u = pot.fn(pot.unflatten(x))
            if not torch.isfinite(u):
                u = torch.full((), 1e30, dtype=x.dtype, requires_grad=True) + 0 * x.sum()
            u.backward()
            return u

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
        with torch.no_grad():
            u = float(pot.fn(pot.unflatten(x)))
        if u < best_u:
            best_u, best = u, pot.constrained(x.detach())
    if best is None:
        raise RuntimeError("no finite posterior density found from any start; check the observation")
    return best


def run_nuts(model: Callable, *args, num_samples: int = 500, warmup_steps: int = 500,
             num_chains: int = 4, seed: int = 0, init: dict | None = None, map_steps: int = 200,
             map_restarts: int = 4,
             max_tree_depth: int = 8, target_accept_prob: float = 0.8, full_mass: bool = True,
             jit_compile: bool = True, jitter: float = 0.1, laplace: bool = True, progress: bool = True,
             predictive: bool = True, num_prior: int = 200, **kwargs):
    """Sample a model's posterior with NUTS.

    Arguments:
        model: A Pyro program (e.g. a :mod:`sedppl.zoo` model, or your own);
            ``args``/``kwargs`` (e.g. ``obs=...``) are passed to it.
        num_samples, warmup_steps, num_chains: Per chain.
        seed: Seed of everything random here.
        init: Starting values {site: value}; by default the MAP (:func:`find_map`)
            from ``map_restarts`` random starts of ``map_steps`` L-BFGS iterations each.
        max_tree_depth, target_accept_prob: NUTS settings.
        full_mass: Adapt a dense mass matrix (the parameters of an SED fit are strongly
            correlated: mass, age, dust, metallicity); False for a diagonal one.
        jit_compile: Trace the potential with TorchScript (1.0-2.3x faster gradients
            for the zoo models once warm, benchmarks/RESULTS.md; turn off for models with
            data-dependent Python control flow).
        laplace: With ``full_mass``, start the mass matrix at the Laplace approximation at
            ``init`` (:func:`laplace_inverse_mass`) rather than the identity; warmup then
            begins with short trajectories even when the posterior is narrow and correlated.
        jitter: Chains after the first start this far (standard deviations of a unit
            normal in the unconstrained space) from ``init``, so R-hat can see disagreement.
        progress: Show progress bars.
        predictive: Also draw prior and posterior predictive samples.

    Returns:
        ``arviz.InferenceData``.
    """

    pyro.set_rng_seed(seed)
    if init is None:
        init = find_map(model, *args, steps=map_steps, restarts=map_restarts, jit_compile=jit_compile, **kwargs)
    inv_mass = laplace_inverse_mass(model, init, *args, **kwargs) if (laplace and full_mass) else None
    chains = []
    for c in range(num_chains):
        pyro.set_rng_seed(seed + 1000 * (c + 1))
        start = _jitter(model, init, jitter if c else 0.0, args, kwargs)
        kernel = _CountingNUTS(model, init_strategy=init_to_value(values=start), max_tree_depth=max_tree_depth,
                               target_accept_prob=target_accept_prob, full_mass=full_mass,
                               jit_compile=jit_compile, ignore_jit_warnings=True)
        kernel.start_inverse_mass = inv_mass
        stats = {"n_steps": [], "step_size": []}

        def hook(kern, _params, stage, _i, stats=stats):
            if stage == "Sample":
                stats["n_steps"].append(kern.leapfrog_steps)
                stats["step_size"].append(float(kern.step_size))
            kern.leapfrog_steps = 0

        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=1,
                    disable_progbar=not progress, hook_fn=hook)
        mcmc.run(*args, **kwargs)
        chains.append((mcmc, stats))
    idata = _to_arviz(model, chains, args, kwargs, predictive, num_prior)
    check_convergence(idata)
    return idata


def laplace_inverse_mass(model: Callable, values: dict[str, torch.Tensor], *args, step: float = 1e-2,
                         max_sd: float = 10.0, **kwargs) -> torch.Tensor:
    """Inverse Hessian of the potential at ``values``, in NUTS's unconstrained coordinates.

    The Hessian comes from central differences of the gradient (2 d gradient
    evaluations for d unconstrained dimensions, sites in sorted order as Pyro's
    dense mass matrix expects); eigenvalues are made positive and floored at
    ``1 / max_sd**2`` so the result is a valid covariance.

    Returns:
        (d, d) float64 matrix: the Laplace approximation's covariance.
    """
    from pyro.ops.integrator import potential_grad

    pot = _FlatPotential(model, args, kwargs, jit_compile=False)
    flat = pot.flatten(values)

    def grad_at(x):
        g, _ = potential_grad(pot.fn, pot.unflatten(x))
        return torch.cat([g[k].reshape(-1) for k in pot.names]).double()

    d = flat.numel()
    hess = torch.zeros(d, d, dtype=torch.float64)
    for j in range(d):
        e = torch.zeros(d, dtype=flat.dtype)
        e[j] = step
        hess[:, j] = (grad_at(flat + e) - grad_at(flat - e)) / (2 * step)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = torch.linalg.eigh(hess)
    evals = evals.abs().clamp(min=1 / max_sd**2)
    return (evecs / evals) @ evecs.T


def _jitter(model, values: dict, scale: float, args, kwargs) -> dict:
    """Perturb starting values by ``scale`` (standard normal) in each site's unconstrained space."""
    if scale == 0:
        return dict(values)
    tr = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    out = {}
    for k, v in values.items():
        t = torch.distributions.biject_to(tr.nodes[k]["fn"].support)
        out[k] = t(t.inv(v) + scale * torch.randn_like(v)).detach()
    return out


def _to_arviz(model, chains, args, kwargs, predictive, num_prior):
    import arviz as az

    import numpy as np

    shapes = _deterministic_shapes(model, *args, **kwargs)
    derived = set(shapes)
    parts = []
    for mcmc, stats in chains:
        samples = mcmc.get_samples(group_by_chain=False)
        # uncondition: the observed sites are drawn from the model (replicated data), not copied from the data
        draws = Predictive(pyro.poutine.uncondition(model), posterior_samples=samples,
                           return_sites=None if predictive else sorted(derived))(*args, **kwargs)
        post_pred = {k: v for k, v in draws.items() if k not in derived} if predictive else None
        part = az.from_pyro(mcmc, posterior_predictive=post_pred, log_likelihood=True)
        # deterministic (derived) sites belong to the posterior
        extra = {}
        for k in derived & set(draws):
            # Predictive pads sites to the model's plate nesting: back to the site's own shape
            v = draws[k].detach().reshape(-1, *shapes[k]).numpy()[None]
            extra[k] = (("chain", "draw") + tuple(f"{k}_dim_{i}" for i in range(v.ndim - 2)), v)
        part.posterior = part.posterior.assign(extra)
        if hasattr(part, "observed_data"):
            part.observed_data = part.observed_data.drop_vars([k for k in extra if k in part.observed_data])
        n = np.asarray(stats["n_steps"])[None]
        part.sample_stats["n_steps"] = (("chain", "draw"), n)
        part.sample_stats["tree_depth"] = (("chain", "draw"), np.ceil(np.log2(n + 1)).astype(int))
        part.sample_stats["step_size"] = (("chain", "draw"), np.asarray(stats["step_size"])[None])
        parts.append(part)
    idata = az.concat(*parts, dim="chain") if len(parts) > 1 else parts[0]
    if predictive:
        prior = Predictive(model, num_samples=num_prior)(*args, **kwargs)
        obs_names = set(idata.observed_data.data_vars) if hasattr(idata, "observed_data") else set()
        prior_idata = az.from_pyro(prior={k: v for k, v in prior.items() if k not in obs_names},
                                   posterior_predictive=None)
        idata.add_groups(prior=prior_idata.prior)
        pp = {k: v[None] for k, v in prior.items() if k in obs_names}
        if pp:
            idata.add_groups(prior_predictive=az.from_dict(posterior_predictive=pp).posterior_predictive)
    return idata


def check_convergence(idata, rhat_max: float = 1.01, ess_min: float = 100.0) -> dict:
    """Warn when any parameter has R-hat above ``rhat_max``, bulk ESS below ``ess_min``, or divergences.

    Returns:
        {"rhat_max", "ess_bulk_min", "divergences"}.
    """
    import arviz as az

    summ = az.summary(idata, kind="diagnostics")
    rhat = float(summ["r_hat"].max()) if "r_hat" in summ else float("nan")
    ess = float(summ["ess_bulk"].min())
    div = int(idata.sample_stats["diverging"].sum()) if "diverging" in idata.sample_stats else 0
    problems = []
    if rhat > rhat_max:
        problems.append(f"R-hat up to {rhat:.3f} (> {rhat_max})")
    if ess < ess_min:
        problems.append(f"bulk ESS down to {ess:.0f} (< {ess_min:.0f})")
    if div:
        problems.append(f"{div} divergent transitions")
    if problems:
        warnings.warn("the MCMC chains did not converge cleanly: " + "; ".join(problems)
                      + ". Run longer chains, raise target_accept_prob, or check the model.", stacklevel=2)
    return {"rhat_max": rhat, "ess_bulk_min": ess, "divergences": div}
