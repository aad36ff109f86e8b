"""Calibration of a neural posterior on held-out simulations: coverage, TARP and SBC.

Held-out draws come from the model's prior predictive with a seed the training
never used, and noise, masks and missing bands drawn from the posterior's own
training conditions; each gets ``n_draws`` posterior draws. Ranks and intervals
are computed in the unconstrained space (monotone per site, so ranks and
central intervals equal those of the constrained parameters).

:func:`fit_base_scale` is the one post-hoc step: it refits the width of the
flow's base distribution by maximum likelihood on fresh simulations (a flow
slightly too narrow in its joint tails gets them back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..diagnostics import (central_interval_coverage, expected_coverage, rank_uniformity_pvalue, sbc_ranks,
                           tarp_coverage)
from .npe import NeuralPosterior

if TYPE_CHECKING:
    from .ensemble import PosteriorEnsemble
from .npe_training import _rows, noisy_inputs
from .simulations import simulate_bank

LEVELS = np.round(np.linspace(0.05, 0.95, 19), 2)

def _fresh_simulations(post, n_sims: int, seed: int, progress: bool):
    """(bank, network inputs) of ``n_sims`` prior-predictive simulations with seed ``seed`` and noise,
    masks and missing bands from the posterior's training conditions (seed ``seed + 3``)."""
    c = post.card
    z_range = tuple(c.redshift_range) if c.redshift_given else None
    bank = simulate_bank(post.model, post.space, n_sims, seed, z_range, c.bin_factor, progress=progress)
    return bank, noisy_inputs(bank, post.conditions, torch.Generator().manual_seed(seed + 3), c.redshift_given)


#: Seed of the simulations :func:`fit_base_scale` uses by default (training used small seeds,
#: :func:`calibrate` uses 987,654).
BASE_FIT_SEED = 555_001


def fit_base_scale(post: NeuralPosterior, n_sims: int = 2000, seed: int = BASE_FIT_SEED, batch: int = 250,
                   progress: bool = False) -> float:
    """Refit the width of the flow's base distribution on fresh simulations, and set it.

    The flow maps standardised parameters to base draws z = T(theta; x) in D dimensions.
    With T fixed, the NPE loss -log q over a base N(0, s^2 I) is minimised by

        s^2 = mean over simulations of |z|^2 / D,

    the maximum-likelihood estimate of one scale. A calibrated flow has s = 1 (its z are
    N(0, I) draws); a flow whose truths fall too far out in its joint tails (too-small
    highest-density regions) has s > 1, and widening its base by s widens every galaxy's
    posterior in the same proportion in base space, like temperature scaling of a classifier.
    Simulations, noise, masks and redshifts are drawn as in training, with a seed that
    neither training nor :func:`calibrate` uses.

    Arguments:
        post: A trained posterior (its base scale and card are updated in place).
        n_sims: Fresh simulations to fit on.
        seed: Their seed (noise: ``seed + 3``).
        batch: Simulations per flow call.
        progress: Show a progress bar while simulating.

    Returns:
        The fitted scale s (dimensionless, in the flow's base space).

    References:
        Guo et al. 2017, ICML (temperature scaling); Hermans et al. 2022, TMLR (conservative
        amortized posteriors).
    """
    bank, x = _fresh_simulations(post, n_sims, seed, progress)
    sq = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(bank), batch):
            rows = _rows(x, slice(i, i + batch))
            std = (bank.theta[i:i + batch] - post.theta_shift) / post.theta_scale
            z = post.flow(post.context(rows)).transform(std)
            sq += (z.double() ** 2).sum()
    scale = float(torch.sqrt(sq / (len(bank) * post.space.dim)))
    post.set_base_scale(scale, len(bank))
    return scale


def calibrate(post: NeuralPosterior | PosteriorEnsemble, n_sims: int = 1000, n_draws: int = 200, seed: int = 987_654,
              batch: int = 250, progress: bool = False) -> dict:
    """Calibration figures of ``post`` on ``n_sims`` fresh simulations.

    Returns:
        {"n_sims", "n_draws", "levels", "expected_coverage" (HPD, joint), "tarp",
        "max_coverage_error" (largest |coverage - level| of either), "sbc_pvalue" {label: p}
        (chi-square uniformity of the ranks per dimension), "min_sbc_pvalue",
        "central_68", "central_95" {label: coverage}}.
    """
    bank, x = _fresh_simulations(post, n_sims, seed, progress)
    truth = bank.theta
    draws, lq_draws, lq_truth = [], [], []
    torch.manual_seed(seed)
    with torch.no_grad():
        for i in range(0, len(bank), batch):
            rows = _rows(x, slice(i, i + batch))
            u, lq = post.draw(rows, n_draws, step=batch)
            draws.append(u.transpose(0, 1))
            lq_draws.append(lq.T)
            lq_truth.append(post.log_prob_unconstrained(truth[i:i + batch], rows))
    draws, lq_draws, lq_truth = torch.cat(draws).numpy(), torch.cat(lq_draws).numpy(), torch.cat(lq_truth).numpy()
    truth = truth.numpy()
    hpd = expected_coverage(lq_truth, lq_draws, LEVELS)
    tarp = tarp_coverage(truth, draws, seed=seed, levels=LEVELS)
    labels = post.space.labels()
    pvals, c68, c95 = {}, {}, {}
    for j, lab in enumerate(labels):
        ranks = sbc_ranks(truth[:, j], draws[:, :, j], seed=j)
        pvals[lab] = rank_uniformity_pvalue(ranks, n_draws)
        c68[lab], c95[lab] = (float(v) for v in central_interval_coverage(truth[:, j], draws[:, :, j], (0.68, 0.95)))
    return {"n_sims": len(bank), "n_draws": n_draws, "levels": LEVELS.tolist(),
            "expected_coverage": hpd.tolist(), "tarp": tarp.tolist(),
            "max_coverage_error": float(max(np.abs(hpd - LEVELS).max(), np.abs(tarp - LEVELS).max())),
            "sbc_pvalue": pvals, "min_sbc_pvalue": float(min(pvals.values())),
            "central_68": c68, "central_95": c95}
