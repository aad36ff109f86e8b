"""Calibration diagnostics of posteriors: SBC ranks, coverage, uniformity tests.

These work on plain arrays of truths and posterior draws, so they judge NUTS
and amortized posteriors alike.

References:
    Talts et al. 2018, arXiv:1804.06788 (simulation-based calibration).
    Cook, Gelman & Rubin 2006, JCGS 15, 675.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def sbc_ranks(truth: np.ndarray, draws: np.ndarray, seed: int = 0) -> np.ndarray:
    """Rank of each truth among its posterior draws (ties broken at random).

    Arguments:
        truth: (N,) true values, one per simulation.
        draws: (N, L) posterior draws per simulation (independent, i.e. thinned).
        seed: Seed for tie breaking.

    Returns:
        (N,) integer ranks in 0..L; uniform on 0..L when the posterior is calibrated.
    """
    truth, draws = np.asarray(truth, float), np.asarray(draws, float)
    if draws.ndim != 2 or truth.shape != draws.shape[:1]:
        raise ValueError(f"need truth (N,) and draws (N, L); got {truth.shape} and {draws.shape}")
    below = (draws < truth[:, None]).sum(1)
    ties = (draws == truth[:, None]).sum(1)
    rng = np.random.default_rng(seed)
    return below + np.array([rng.integers(0, t + 1) for t in ties])


def rank_uniformity_pvalue(ranks: np.ndarray, n_draws: int, n_bins: int | None = None) -> float:
    """Chi-square test that SBC ranks (0..n_draws) are uniform.

    Arguments:
        ranks: (N,) ranks from :func:`sbc_ranks`.
        n_draws: L, the number of draws each rank was taken among.
        n_bins: Histogram bins (expected counts account for unequal bins); default
            about N / 5 and at most 20, so every bin expects >= 5 counts.

    Returns:
        p-value of the chi-square statistic with n_bins - 1 degrees of freedom.
    """
    ranks = np.asarray(ranks)
    n = len(ranks)
    if n_bins is None:
        n_bins = int(np.clip(n // 5, 2, 20))
    # rank value r (of L + 1 possible) falls in bin floor(r * n_bins / (L + 1))
    bin_of = lambda r: (np.asarray(r) * n_bins) // (n_draws + 1)  # noqa: E731
    counts = np.bincount(bin_of(ranks), minlength=n_bins)
    expected = n * np.bincount(bin_of(np.arange(n_draws + 1)), minlength=n_bins) / (n_draws + 1)
    return float(stats.chisquare(counts, expected).pvalue)


def central_interval_coverage(truth: np.ndarray, draws: np.ndarray,
                              levels: np.ndarray | list[float] = (0.68, 0.95)) -> np.ndarray:
    """Fraction of simulations whose truth lies inside the central credible interval.

    Arguments:
        truth: (N,) true values.
        draws: (N, L) posterior draws.
        levels: Credibility levels in (0, 1).

    Returns:
        (len(levels),) empirical coverage; equal to ``levels`` (within binomial
        noise, sd = sqrt(p (1 - p) / N)) for a calibrated posterior.
    """
    truth, draws = np.asarray(truth, float), np.asarray(draws, float)
    out = []
    for p in np.atleast_1d(levels):
        lo, hi = np.quantile(draws, [(1 - p) / 2, (1 + p) / 2], axis=1)
        out.append(np.mean((truth >= lo) & (truth <= hi)))
    return np.array(out)


def coverage_tolerance(level: float, n: int, sigmas: float = 3.0) -> float:
    """Binomial tolerance on an empirical coverage: ``sigmas`` * sqrt(p (1 - p) / n)."""
    return sigmas * float(np.sqrt(level * (1 - level) / n))


def thin_to_independent(draws: np.ndarray, ess: float) -> np.ndarray:
    """Thin a (N, L) chain of draws to about ``ess`` roughly independent draws each."""
    step = max(1, int(np.ceil(draws.shape[1] / max(ess, 1.0))))
    return draws[:, ::step]


def sbc_rank_fractions(truth: np.ndarray, draws: np.ndarray, ess: np.ndarray | None = None,
                       seed: int = 0) -> np.ndarray:
    """Randomised rank fraction of each truth among its own thinned MCMC draws (SBC for MCMC).

    Each simulation's chains are thinned by its own effective sample size (every
    ``ceil(C * S / ess)``-th draw of each chain), so a poorly mixing simulation keeps fewer
    but roughly independent draws instead of forcing every simulation down to the worst
    one's count. With r of the m kept draws below the truth, the fraction is
    ``(r + v) / (m + 1)`` with v ~ U(0, 1): exactly uniform on (0, 1) when the truth and the
    kept draws are exchangeable, whatever m is, so simulations with different m pool.

    Arguments:
        truth: (N,) true values, one per simulation.
        draws: (N, C, S) posterior draws: C chains of S draws per simulation.
        ess: (N,) effective sample sizes (e.g. ArviZ's bulk ESS); None keeps every draw.
        seed: Seed of the randomisation v.

    Returns:
        (N,) fractions in (0, 1); test them with :func:`uniformity_pvalue`.

    References:
        Talts et al. 2018, arXiv:1804.06788, sec. 5 (thinning autocorrelated draws).
    """
    truth, draws = np.asarray(truth, float), np.asarray(draws, float)
    if draws.ndim != 3 or truth.shape != draws.shape[:1]:
        raise ValueError(f"need truth (N,) and draws (N, chains, draws); got {truth.shape} and {draws.shape}")
    n, c, s = draws.shape
    ess = np.full(n, float(c * s)) if ess is None else np.asarray(ess, float)
    if ess.shape != (n,) or not np.all(np.isfinite(ess)):
        raise ValueError(f"need one finite ESS per simulation, shape ({n},); got {ess.shape}")
    rng = np.random.default_rng(seed)
    out = np.empty(n)
    for i in range(n):
        step = max(1, int(np.ceil(c * s / max(ess[i], 1.0))))
        kept = draws[i, :, ::step].ravel()
        out[i] = ((kept < truth[i]).sum() + rng.uniform()) / (kept.size + 1)
    return out


def uniformity_pvalue(u: np.ndarray, n_bins: int | None = None) -> float:
    """Chi-square test that values in (0, 1) are uniform, with equal bins.

    Arguments:
        u: (N,) values, e.g. :func:`sbc_rank_fractions`.
        n_bins: Default N / 5, between 2 and 20 (at least 5 expected counts per bin).

    Returns:
        p-value with n_bins - 1 degrees of freedom.
    """
    u = np.asarray(u, float)
    if u.ndim != 1 or np.any((u <= 0) | (u >= 1)):
        raise ValueError("need a 1-d array of values strictly inside (0, 1)")
    n_bins = int(np.clip(len(u) // 5, 2, 20)) if n_bins is None else n_bins
    counts = np.bincount(np.minimum((u * n_bins).astype(int), n_bins - 1), minlength=n_bins)
    return float(stats.chisquare(counts).pvalue)


def expected_coverage(logq_truth: np.ndarray, logq_draws: np.ndarray,
                      levels: np.ndarray | list[float] = np.linspace(0.05, 0.95, 19)) -> np.ndarray:
    """Joint coverage of highest-density regions of a posterior with a density.

    The truth lies in the level-p HPD region when fewer than a fraction p of the
    draws have a higher density than it (Hermans et al. 2022).

    Arguments:
        logq_truth: (N,) posterior log density at each simulation's truth.
        logq_draws: (N, L) log densities of the posterior draws.
        levels: Credibility levels in (0, 1).

    Returns:
        (len(levels),) empirical coverage; equal to ``levels`` for a calibrated
        posterior, below for an over-confident one.

    References:
        Hermans et al. 2022, TMLR (expected coverage of NPE posteriors).
    """
    frac_above = (np.asarray(logq_draws) > np.asarray(logq_truth)[:, None]).mean(1)
    return np.array([np.mean(frac_above < p) for p in np.atleast_1d(levels)])


def tarp_coverage(truth: np.ndarray, draws: np.ndarray, seed: int = 0,
                  levels: np.ndarray | list[float] = np.linspace(0.05, 0.95, 19)) -> np.ndarray:
    """TARP expected coverage with random reference points (Lemos et al. 2023).

    Parameters are first standardised by the truths' mean and sd; each simulation
    gets a reference point drawn uniformly in the truths' bounding box; the truth
    counts as covered at level p when fewer than a fraction p of the draws lie
    closer to the reference than the truth. A necessary and sufficient test of
    calibration over many random references.

    Arguments:
        truth: (N, D) true parameters.
        draws: (N, L, D) posterior draws.
        seed: Seed of the reference points.
        levels: Credibility levels.

    Returns:
        (len(levels),) empirical coverage.
    """
    truth, draws = np.asarray(truth, float), np.asarray(draws, float)
    mu, sd = truth.mean(0), truth.std(0) + 1e-12
    t, d = (truth - mu) / sd, (draws - mu) / sd
    rng = np.random.default_rng(seed)
    ref = rng.uniform(t.min(0), t.max(0), size=t.shape)
    dist_truth = np.linalg.norm(t - ref, axis=-1)
    dist_draws = np.linalg.norm(d - ref[:, None, :], axis=-1)
    frac = (dist_draws < dist_truth[:, None]).mean(1)
    return np.array([np.mean(frac < p) for p in np.atleast_1d(levels)])


def compare_posteriors(a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int = 0,
                       max_draws: int = 4000) -> dict:
    """Compare two posteriors of one galaxy (e.g. amortized vs NUTS) parameter by parameter and jointly.

    Arguments:
        a, b: {parameter: draws (L,)} with the same scalar parameters (flatten vector sites first);
            ``b`` is the reference (e.g. NUTS).
        seed: Seed of the classifier test.
        max_draws: Draws used per posterior by the classifier test.

    Returns:
        {"shift": {p: (mean_a - mean_b) / sd_b}, "width_ratio": {p: sd_a / sd_b},
        "c2st_accuracy": held-out accuracy of a classifier told to separate a from b
        (0.5 when they are the same distribution), "c2st_null_sd": its binomial sd under
        the null hypothesis, "c2st_z": (accuracy - 0.5) / null sd}.

    References:
        Lopez-Paz & Oquab 2017 (classifier two-sample tests).
    """
    import torch

    names = list(b)
    shift = {p: float((np.mean(a[p]) - np.mean(b[p])) / np.std(b[p])) for p in names}
    width = {p: float(np.std(a[p]) / np.std(b[p])) for p in names}
    rng = np.random.default_rng(seed)
    xa = np.stack([np.asarray(a[p], float).ravel() for p in names], -1)
    xb = np.stack([np.asarray(b[p], float).ravel() for p in names], -1)
    n = min(len(xa), len(xb), max_draws)
    xa, xb = xa[rng.choice(len(xa), n, replace=False)], xb[rng.choice(len(xb), n, replace=False)]
    x = np.concatenate([xa, xb])
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    y = np.concatenate([np.zeros(n), np.ones(n)])
    perm = rng.permutation(2 * n)
    x, y = torch.as_tensor(x[perm], dtype=torch.float32), torch.as_tensor(y[perm], dtype=torch.float32)
    half = n
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                              torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(500):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[:half]).squeeze(-1), y[:half])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float(((net(x[half:]).squeeze(-1) > 0).float() == y[half:]).float().mean())
    null_sd = 0.5 / np.sqrt(len(y) - half)
    return {"shift": shift, "width_ratio": width, "c2st_accuracy": acc, "c2st_null_sd": float(null_sd),
            "c2st_z": float((acc - 0.5) / null_sd)}
