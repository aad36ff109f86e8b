"""Ensembles of amortized posteriors: an equal-weight mixture of independently trained flows.

A single neural posterior estimate can be over-confident where its training did
not converge; averaging several independently trained ones (different
simulations, initialisations and batch orders) gives a mixture that is at least
as wide wherever the members disagree, the cheapest guard against that failure
(Hermans et al. 2022 found ensembles of NPE posteriors more conservative than
single ones across benchmarks; Lakshminarayanan et al. 2017 for deep ensembles).

q(theta | x) = (1 / K) sum_k q_k(theta | x). Drawing S times gives each member
S / K draws (stratified: the first S mod K members one more), shuffled together;
the log density of a draw is the log of the mean of every member's density at
it (one forward pass of each member's flow per draw).

File layout: ``name.json`` lists the members and holds the mixture's calibration
(``{"ensemble": ["name_member0", ...], "version": 1, "calibration": {...}}``); each member is an ordinary posterior (``name_member0.safetensors``
and its card).

References:
    Lakshminarayanan, Pritzel & Blundell 2017, "Simple and Scalable Predictive
    Uncertainty Estimation using Deep Ensembles" (arXiv:1612.01474).
    Hermans et al. 2022, "A Trust Crisis In Simulation-Based Inference? Your
    Posterior Approximations Can Be Unfaithful" (arXiv:2110.06581).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Observation
from .npe import NeuralPosterior

ENSEMBLE_VERSION = 1
LAYOUT = ("model", "sites", "bands", "wave", "bin_factor", "redshift_range", "redshift_given", "conditions",
          "distance_inputs")


class PosteriorEnsemble(nn.Module):
    """An equal-weight mixture of neural posteriors of one model and one data layout.

    It has the drawing interface of :class:`sedppl.infer.npe.NeuralPosterior` (``sample``,
    ``log_prob``, ``inputs``, ``ood_flags``, ``draw``, ``log_prob_unconstrained``), so
    ``sedppl fit``, the catalog fits and :func:`sedppl.infer.npe_calibration.calibrate`
    take either.

    Arguments:
        members: Two or more posteriors with the same card layout (model, latent sites,
            bands, wavelengths, binning, redshift handling, training conditions).
    """

    def __init__(self, members: list[NeuralPosterior]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0].card
        for k, m in enumerate(members[1:], 1):
            differ = [f for f in LAYOUT if getattr(m.card, f, None) != getattr(first, f, None)]
            if differ:
                raise ValueError(f"ensemble member {k} differs from member 0 in {', '.join(differ)}")
        self.members = nn.ModuleList(members)
        self.calibration: dict | None = None  # calibrate(ensemble), saved in the index

    # the first member stands for the layout every member shares
    @property
    def card(self):
        """The first member's card (the layout is the same for all)."""
        return self.members[0].card

    @property
    def model(self):
        """The Pyro program."""
        return self.members[0].model

    @property
    def space(self):
        """The unconstrained coordinates of the model's latent sites."""
        return self.members[0].space

    @property
    def conditions(self):
        """The observing conditions the members were trained for."""
        return self.members[0].conditions

    def inputs(self, obs: Observation, warn: bool = True) -> dict[str, Tensor | None]:
        """Network inputs of ``obs`` (the same for every member); warns when any member finds it out of
        its training distribution."""
        x = self.members[0].inputs(obs, warn=False)
        if warn:
            for m in self.members:
                if m.check_distribution(x):
                    break
        return x

    def ood_flags(self, x: dict[str, Tensor | None]) -> np.ndarray:
        """(N,) True where any member finds a galaxy outside its training distribution."""
        return np.logical_or.reduce([m.ood_flags(x) for m in self.members])

    def counts(self, num_samples: int) -> list[int]:
        """Draws per member for ``num_samples`` draws in all (stratified, the first members one more)."""
        k = len(self.members)
        return [num_samples // k + (i < num_samples % k) for i in range(k)]

    def compile(self, enable: bool = True) -> "PosteriorEnsemble":
        """Draw through each member's ``torch.compile``-d encoder and flow (:meth:`sedppl.infer.npe.NeuralPosterior.compile`);
        the mixture's densities stay eager. Returns the ensemble itself."""
        for m in self.members:
            m.compile(enable)
        return self

    def draw(self, x: dict[str, Tensor | None], num_samples: int, log_q: bool = True,
             step: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Unconstrained draws u (S, N, D) of the mixture and log q(u | x) (S, N) (None without ``log_q``);
        arguments as :meth:`sedppl.infer.npe.NeuralPosterior.draw`."""
        parts = [m.draw(x, n, log_q=False, step=step)[0] for m, n in zip(self.members, self.counts(num_samples))
                 if n > 0]
        u = torch.cat(parts, 0)
        u = u[torch.randperm(u.shape[0])]  # members interleaved: any prefix of the draws is a mixture draw
        return u, (self.log_prob_unconstrained(u, x) if log_q else None)

    def log_prob_unconstrained(self, u: Tensor, x: dict[str, Tensor | None]) -> Tensor:
        """log q(u | x) = log mean_k q_k(u | x) for unconstrained u (*, N, D) -> (*, N)."""
        def mixture(u, x):
            lq = torch.stack([m.log_prob_unconstrained(u, x) for m in self.members])
            return torch.logsumexp(lq, 0) - math.log(len(self.members))

        if u.dim() < 3:
            return mixture(u, x)
        step = max(1, 10_000 // math.prod(u.shape[:-2]))  # ~10^4 draws per flow call, as when drawing
        return torch.cat([mixture(u[..., i:i + step, :], {k: None if v is None else v[i:i + step]
                                                          for k, v in x.items()})
                          for i in range(0, u.shape[-2], step)], -1)

    def package(self, *args, **kwargs):
        """InferenceData of mixture draws (as :meth:`sedppl.infer.npe.NeuralPosterior.package`)."""
        return self.members[0].package(*args, **kwargs)

    # the same code as a single posterior's, on the mixture's draw / log_prob_unconstrained / package
    log_prob = NeuralPosterior.log_prob
    sample = NeuralPosterior.sample

    # ----------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write the members (``<stem>_member<k>``) and the index ``<stem>.json``, atomically."""
        path = Path(path).with_suffix(".json")
        names = []
        for k, m in enumerate(self.members):
            m.save(path.with_name(f"{path.stem}_member{k}"))
            names.append(f"{path.stem}_member{k}")
        tmp = path.with_suffix(".tmpjson")
        index = {"ensemble": names, "version": ENSEMBLE_VERSION, "calibration": self.calibration}
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model) -> "PosteriorEnsemble":
        """Load an ensemble saved by :meth:`save` (each member checked as by ``NeuralPosterior.load``)."""
        path = Path(path).with_suffix(".json")
        index = json.loads(path.read_text())
        if "ensemble" not in index:
            raise ValueError(f"{path} is not an ensemble index (no 'ensemble' list of members)")
        if index.get("version") != ENSEMBLE_VERSION:
            raise ValueError(f"ensemble index version {index.get('version')}; this sedppl reads "
                             f"version {ENSEMBLE_VERSION}")
        ensemble = cls([NeuralPosterior.load(path.with_name(name), model) for name in index["ensemble"]])
        ensemble.calibration = index.get("calibration")
        return ensemble


def load_posterior(path: str | Path, model) -> NeuralPosterior | PosteriorEnsemble:
    """A posterior file of either kind: an ensemble index or a single posterior's card."""
    card = Path(path).with_suffix(".json")
    if card.exists() and "ensemble" in json.loads(card.read_text()):
        return PosteriorEnsemble.load(path, model)
    return NeuralPosterior.load(path, model)


def train_npe_ensemble(model, out: str | Path, members: int = 5, seed: int = 0, **kwargs) -> PosteriorEnsemble:
    """Train ``members`` posteriors of ``model`` independently and save them as an ensemble at ``out``.

    Member k is :func:`sedppl.infer.npe_training.train_npe` with seed ``seed + 1000 k``
    (its own simulations, initialisation and batch order) at ``<stem>_member<k>``, so an
    interrupted ensemble resumes member by member (each member resumes from its checkpoint).

    Arguments:
        model: The Pyro program, as for ``train_npe``.
        out: Path of the ensemble index (``.json``).
        members: K >= 2.
        seed: Seed of member 0.
        kwargs: Passed to ``train_npe`` (budget, sizes, conditions).

    Returns:
        The ensemble (also saved at ``out``).
    """
    from .npe_training import train_npe

    if members < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {members}")
    out = Path(out).with_suffix(".json")
    trained = [train_npe(model, out.with_name(f"{out.stem}_member{k}"), seed=seed + 1000 * k, **kwargs)
               for k in range(members)]
    ensemble = PosteriorEnsemble(trained)
    ensemble.save(out)
    return ensemble
