"""NUTS (Pyro) on any sedppl Pyro program, returning ArviZ InferenceData.

Chains start near the posterior mode: a MAP fit in the unconstrained space
(Adam on an ``AutoDelta`` guide, several random restarts drawn from the prior,
the best kept), then each chain starts from the MAP point with a small jitter.
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
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_sample, init_to_value


class _CountingNUTS(NUTS):
    """NUTS that counts its leapfrog steps (gradient evaluations) per draw."""

    leapfrog_steps = 0

    def _build_basetree(self, *args, **kwargs):
        self.leapfrog_steps += 1
        return super()._build_basetree(*args, **kwargs)


def deterministic_sites(model: Callable, *args, **kwargs) -> set[str]:
    """Names of a model's ``pyro.deterministic`` sites (derived quantities)."""
    tr = pyro.poutine.trace(model).get_trace(*args, **kwargs)
    return {name for name, site in tr.nodes.items()
            if site["type"] == "sample" and site["infer"].get("_deterministic", False)}


def find_map(model: Callable, *args, steps: int = 300, restarts: int = 4, lr: float = 0.05,
             **kwargs) -> dict[str, torch.Tensor]:
    """MAP estimate of the latent sites (constrained values), best of several restarts.

    Arguments:
        model: The Pyro program; ``args``/``kwargs`` are passed to it.
        steps: Adam steps per restart.
        restarts: Random starts drawn from the prior.

    Returns:
        {site name: value} at the highest joint density found.
    """
    best, best_loss = None, float("inf")
    for _ in range(restarts):
        pyro.clear_param_store()
        guide = AutoDelta(model, init_loc_fn=init_to_sample)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.99}), Trace_ELBO())
        loss = float("inf")
        for _ in range(steps):
            loss = svi.step(*args, **kwargs)
        if loss < best_loss:
            best_loss = loss
            best = {k: v.detach().clone() for k, v in guide.median(*args, **kwargs).items()}
    pyro.clear_param_store()
    return best


def run_nuts(model: Callable, *args, num_samples: int = 500, warmup_steps: int = 500,
             num_chains: int = 4, seed: int = 0, init: dict | None = None, map_steps: int = 300,
             max_tree_depth: int = 8, target_accept_prob: float = 0.8, progress: bool = True,
             predictive: bool = True, num_prior: int = 200, **kwargs):
    """Sample a model's posterior with NUTS.

    Arguments:
        model: A Pyro program (e.g. a :mod:`sedppl.zoo` model, or your own);
            ``args``/``kwargs`` (e.g. ``obs=...``) are passed to it.
        num_samples, warmup_steps, num_chains: Per chain.
        seed: Seed of everything random here.
        init: Starting values {site: value}; by default the MAP (:func:`find_map`).
        max_tree_depth, target_accept_prob: NUTS settings.
        progress: Show progress bars.
        predictive: Also draw prior and posterior predictive samples.

    Returns:
        ``arviz.InferenceData``.
    """

    pyro.set_rng_seed(seed)
    if init is None:
        init = find_map(model, *args, steps=map_steps, **kwargs)
    chains = []
    for c in range(num_chains):
        pyro.set_rng_seed(seed + 1000 * (c + 1))
        start = {k: v for k, v in init.items()}
        kernel = _CountingNUTS(model, init_strategy=init_to_value(values=start), max_tree_depth=max_tree_depth,
                               target_accept_prob=target_accept_prob, jit_compile=False)
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


def _to_arviz(model, chains, args, kwargs, predictive, num_prior):
    import arviz as az

    import numpy as np

    derived = deterministic_sites(model, *args, **kwargs)
    parts = []
    for mcmc, stats in chains:
        samples = mcmc.get_samples(group_by_chain=False)
        draws = Predictive(model, posterior_samples=samples,
                           return_sites=None if predictive else sorted(derived))(*args, **kwargs)
        post_pred = {k: v for k, v in draws.items() if k not in derived} if predictive else None
        part = az.from_pyro(mcmc, posterior_predictive=post_pred, log_likelihood=True)
        # deterministic (derived) sites belong to the posterior
        extra = {}
        for k in derived & set(draws):
            v = draws[k].detach().numpy()[None]
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
        warnings.warn("NUTS did not converge cleanly: " + "; ".join(problems)
                      + ". Run longer chains, raise target_accept_prob, or check the model.", stacklevel=2)
    return {"rhat_max": rhat, "ess_bulk_min": ess, "divergences": div}
