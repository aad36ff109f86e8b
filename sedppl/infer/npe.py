"""Neural posterior estimation: an amortized posterior q(theta | data) from a zuko flow.

A :class:`NeuralPosterior` is a neural spline flow (zuko) over the model's latent
sites in prior-whitened coordinates (each univariate prior mapped to N(0, 1) by
its CDF; other sites in the unconstrained space NUTS uses), conditioned on a
context vector from :class:`sedppl.infer.encoder.DataEncoder`. Draws map back
through the same maps, so no draw leaves the prior's support, and
derived quantities (stellar mass, SFRs, ages) come from running the model's own
code on the draws. Train one with :func:`sedppl.infer.npe_training.train_npe`.

Weights are stored as safetensors beside a JSON card (sites, data layout,
training budget and time, validation loss, calibration figures and a checksum);
loading never runs code, and a card that does not match the model or the code
raises an error.

References:
    Papamakarios & Murray 2016; Greenberg et al. 2019 (neural posterior estimation).
    Durkan et al. 2019 (neural spline flows); Rozet et al., zuko.
    Hahn & Melchior 2022, ApJ 938, 11 (SEDflow).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zuko
from pyro import poutine
from torch import Tensor, nn

from ..data import Observation
from ..derived import DATA_SITES, derived_only, trace_quantities
from . import autoregressive
from .conditions import ObservingConditions
from .encoder import DataEncoder, amplitude, scale_free
from .inference_data import inference_data
from .parameters import ParameterSpace
from .posterior_card import CARD_VERSION, PosteriorCard
from .simulations import bin_spectrum
from .splines import use_fast_splines

class ConditionalAffine(zuko.lazy.LazyTransform):
    """x -> exp(a(c)) x + b(c), elementwise, with a and b predicted from the context c.

    Placed first (on the data side) in the flow, it lets the context set each
    parameter's location and width directly, so narrow posteriors (high S/N) do
    not have to be carved by the splines alone. Starts as the identity.

    Arguments:
        features: D, parameters.
        context: C, size of the context vector.
    """

    def __init__(self, features: int, context: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(context, hidden), nn.GELU(), nn.Linear(hidden, 2 * features))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, c: Tensor | None = None):
        shift, scale = self.net(c).chunk(2, dim=-1)
        return torch.distributions.transforms.IndependentTransform(
            zuko.transforms.MonotonicAffineTransform(shift, scale), 1)


def _rows(data: Tensor | dict[str, Tensor | None], index: slice | Tensor) -> Tensor | dict[str, Tensor | None]:
    """The galaxies ``index`` (first dimension) of contexts (N, C) or of network inputs {name: (N, ...) or None}."""
    if isinstance(data, Tensor):
        return data[index]
    return {k: None if v is None else v[index] for k, v in data.items()}


def interleaved_order(features: int, odd_first: bool = False) -> Tensor:
    """A feature order whose two coupling groups (``passes=2``) are the even and the odd features.

    zuko's NSF alternates the orders 0..D-1 and D-1..0, whose coupling groups are the first and
    the second half of the features in both: two neighbouring sites such as ``tau_ism`` and
    ``dust_index`` then always fall in the same group, and no transform conditions one on the
    other. Interleaved groups split every pair of neighbours.

    Arguments:
        features: D, parameters.
        odd_first: Whether the odd features form the first group (the one the other is
            conditioned on) instead of the even ones.

    Returns:
        The order, (D,) integers: the first group's features take 0..ceil(D/2)-1, the second's the rest.
    """
    idx = torch.arange(features)
    second = idx % 2 == (0 if odd_first else 1)
    # zuko's group of a feature is order // ceil(D / 2): the second group starts at ceil(D / 2)
    return second * -(-features // 2) + idx // 2


def interleaved_coupling(features: int, context: int, hidden: tuple[int, ...],
                         odd_first: bool = False) -> zuko.flows.MaskedAutoregressiveTransform:
    """A rational-quadratic spline coupling transform (zuko's, 8 bins) over interleaved groups,
    starting as the identity (zero output layer: equal bins, unit slopes).

    Arguments:
        features: D, parameters.
        context: C, size of the context vector.
        hidden: Widths of the hidden layers of its masked network.
        odd_first: See :func:`interleaved_order`.

    Returns:
        The lazy transform (its context-free part is the identity until trained).
    """
    bins = 8
    t = zuko.flows.MaskedAutoregressiveTransform(
        features=features, context=context, passes=2, order=interleaved_order(features, odd_first),
        univariate=functools.partial(zuko.transforms.MonotonicRQSTransform, slope=1e-3),
        shapes=[(bins,), (bins,), (bins - 1,)], hidden_features=hidden)
    last = [m for m in t.hyper if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return t


class NeuralPosterior(nn.Module):
    """q(theta | data) for one model.

    Arguments:
        card: The layout (sites, bands, wavelengths, sizes).
        model: The Pyro program (for derived quantities and the site supports).
    """

    def __init__(self, card: PosteriorCard, model):
        super().__init__()
        self.card = card
        self.model = model
        kw = {} if not card.redshift_given else {"redshift": float(np.mean(card.redshift_range))}
        self.space = ParameterSpace.from_model(model, whiten=card.whiten, **kw)
        found = [[s.name, list(s.event_shape)] for s in self.space.sites]
        if [[n, list(e)] for n, e in card.sites] != found:
            raise ValueError(f"the card's latent sites {card.sites} do not match the model's {found}")
        self.conditions = ObservingConditions(**card.conditions)
        self._compiled = None  # the torch.compile-d flow draws, once compile() was called
        self._wave_array = None  # (card.wave, the same as an array): see _trained_wave
        self._derived_only_works = True  # False once the model failed inside sedppl.derived.derived_only
        self.encoder = DataEncoder(card.spectrum_bins, len(card.bands),
                                   tuple(card.redshift_range) if card.redshift_given else None, card.context,
                                   distance_inputs=card.distance_inputs)
        # coupling transforms (passes=2): sampling costs two network passes per transform,
        # not one per dimension as in a fully autoregressive flow
        nsf = zuko.flows.NSF(self.space.dim, card.context, transforms=card.transforms,
                             hidden_features=tuple(card.hidden), passes=2)
        if card.conditional_affine:
            nsf = zuko.lazy.Flow([ConditionalAffine(self.space.dim, card.context), *nsf.transform.transforms],
                                 nsf.base)
        if card.interleaved_transforms:
            # appended on the base side, so a warm start from a posterior without them keeps its
            # state-dict keys; they start as the identity (see interleaved_coupling)
            extra = [interleaved_coupling(self.space.dim, card.context, tuple(card.hidden), odd_first=i % 2 == 1)
                     for i in range(card.interleaved_transforms)]
            nsf = zuko.lazy.Flow([*nsf.transform.transforms, *extra], nsf.base)
        self.flow = nsf
        d = self.space.dim
        self.register_buffer("theta_shift", torch.zeros(d))
        self.register_buffer("theta_scale", torch.ones(d))
        # 0.1 / 99.9 percentiles of the scale-free inputs over training draws (out-of-distribution checks)
        self.register_buffer("log_scale_range", torch.tensor([[-np.inf, -np.inf], [np.inf, np.inf]]))
        self.register_buffer("band_ratio_range", torch.tensor([[-np.inf] * max(1, len(card.bands)),
                                                               [np.inf] * max(1, len(card.bands))]))

    # ----------------------------------------------------------------- inputs
    def inputs(self, obs: Observation, warn: bool = True) -> dict[str, Tensor]:
        """The network inputs of an observation (binned spectrum, photometry, redshift), checked."""
        c = self.card
        x: dict[str, Tensor | None] = {"spectrum": None, "spectrum_ivar": None, "photometry": None,
                                       "photometry_ivar": None, "redshift": None}
        n = None
        if c.wave:
            if not obs.has_spectrum:
                raise ValueError(f"the {c.model} posterior needs a spectrum")
            if obs.wave.shape[0] != len(c.wave) or not np.allclose(obs.wave.numpy(), self._trained_wave(),
                                                                   atol=1e-3):
                raise ValueError(f"the spectrum's wavelength grid ({obs.wave.shape[0]} pixels, "
                                 f"{obs.wave[0]:.1f}-{obs.wave[-1]:.1f} A) is not the one this posterior was "
                                 f"trained on ({len(c.wave)} pixels, {c.wave[0]:.1f}-{c.wave[-1]:.1f} A); "
                                 "resample it or train a posterior for this grid")
            flux, ivar = obs.flux.reshape(-1, obs.flux.shape[-1]), obs.ivar.reshape(-1, obs.flux.shape[-1])
            if obs.mask is not None:
                ivar = torch.where(obs.mask.reshape(ivar.shape), ivar, torch.zeros_like(ivar))
            x["spectrum"], x["spectrum_ivar"] = bin_spectrum(flux, ivar, c.bin_factor)
            n = flux.shape[0]
        if c.bands and not obs.has_photometry and c.wave and self.conditions.no_photometry_probability > 0:
            # a spectrum alone: trained for (all bands missing)
            x["photometry"] = torch.zeros(n, len(c.bands))
            x["photometry_ivar"] = torch.zeros(n, len(c.bands))
        elif c.bands:
            if not obs.has_photometry:
                raise ValueError(f"the {c.model} posterior needs photometry in {c.bands}"
                                 + (" (it was not trained for spectra alone)" if c.wave else ""))
            obs.check_bands(c.bands)
            x["photometry"] = obs.band_flux.reshape(-1, len(c.bands))
            x["photometry_ivar"] = obs.band_ivar.reshape(-1, len(c.bands))
            n = x["photometry"].shape[0]
        if c.redshift_given:
            if obs.redshift is None:
                raise ValueError("this posterior is conditioned on a known redshift; the observation has none")
            z = obs.redshift.reshape(-1).expand(n)
            lo, hi = c.redshift_range
            if not torch.all((z >= lo) & (z <= hi)):  # NaN fails too
                raise ValueError(f"redshift {z.tolist()} outside the posterior's range [{lo}, {hi}]")
            x["redshift"] = z.float()
        # checked here, not in the encoder: the compiled draws (compile()) skip the encoder's checks
        if c.wave and bool((x["spectrum_ivar"] <= 0).all(-1).any()):
            raise ValueError("a galaxy has no valid pixels (all ivar = 0)")
        if not c.wave and bool((x["photometry_ivar"] <= 0).all(-1).any()):  # photometry alone
            raise ValueError("a galaxy has no valid bands (all band ivar = 0)")
        if warn:
            self.check_distribution(x)
        return x

    def _trained_wave(self) -> np.ndarray:
        """The card's wavelength grid (Angstrom, observed frame) as an array, made once per grid (from the
        card's list: ~0.4 ms for 7,781 pixels, a tenth of the compiled draws of one galaxy)."""
        if self._wave_array is None or self._wave_array[0] is not self.card.wave:
            self._wave_array = (self.card.wave, np.asarray(self.card.wave, dtype=np.float64))
        return self._wave_array[1]

    def ood_reasons(self, x: dict[str, Tensor | None]) -> tuple[np.ndarray, list[str]]:
        """Per-galaxy flags (N,) of inputs outside the training distribution, and the reasons.

        Checked: the median S/N per pixel (outside half the lowest to twice the highest
        trained), the amplitudes of spectrum and photometry, and each band's flux
        relative to the mean of the bands (colours) against the 0.1-99.9 percentiles
        of the training draws.
        """
        c, cond, why = self.card, self.conditions, []
        n = next(v for v in x.values() if v is not None).shape[0]
        flags = torch.zeros(n, dtype=torch.bool)
        if x["spectrum"] is not None:
            snr = (x["spectrum"].abs() * torch.sqrt(x["spectrum_ivar"]) / np.sqrt(c.bin_factor))
            # over the valid bins (lower median of an even count, as Tensor.median)
            med = torch.nanmedian(torch.where(x["spectrum_ivar"] > 0, snr, torch.nan), -1).values
            lo, hi = cond.snr_spectrum
            bad = (med < 0.5 * lo) | (med > 2 * hi)
            if bad.any():
                why.append(f"median S/N per pixel {[round(v, 2) for v in med[bad].tolist()]} outside the "
                           f"training range {lo}-{hi}")
            ls = torch.log10(amplitude(x["spectrum"], x["spectrum_ivar"]))
            amp = (ls < self.log_scale_range[0, 0]) | (ls > self.log_scale_range[1, 0])
            if amp.any():
                why.append("spectrum amplitude outside the range of the training simulations")
            flags |= bad | amp
        if x["photometry"] is not None:
            ch, ls = scale_free(x["photometry"], x["photometry_ivar"], allow_empty=True)
            none = (x["photometry_ivar"] <= 0).all(-1)  # no photometry: nothing to check
            amp = ~none & ((ls < self.log_scale_range[0, 1]) | (ls > self.log_scale_range[1, 1]))
            if amp.any():
                why.append("photometric amplitude outside the range of the training simulations")
            valid = x["photometry_ivar"] > 0
            r = ch[:, 0]
            out = valid & ((r < self.band_ratio_range[0]) | (r > self.band_ratio_range[1]))
            if out.any():
                names = sorted({c.bands[j] for j in torch.nonzero(out)[:, 1].tolist()})
                why.append(f"band fluxes relative to the mean (colours) outside the training range in {names}")
            flags |= amp | out.any(-1)
        return flags.numpy(), why

    def ood_flags(self, x: dict[str, Tensor | None]) -> np.ndarray:
        """(N,) True for galaxies outside the training distribution (see :meth:`ood_reasons`)."""
        return self.ood_reasons(x)[0]

    def check_distribution(self, x: dict[str, Tensor | None]) -> list[str]:
        """Warn (and return why) when some galaxies lie outside the training distribution."""
        _, why = self.ood_reasons(x)
        if why:
            warnings.warn("observation outside the training distribution of this posterior: " + "; ".join(why)
                          + ". Its posterior may be wrong; check it with NUTS (sedppl.infer.nuts.run_nuts).",
                          stacklevel=3)
        return why

    # ----------------------------------------------------------------- densities
    def context(self, x: dict[str, Tensor | None]) -> Tensor:
        """The flow's context vector (N, context) of network inputs from :meth:`inputs`."""
        return self.encoder(**x)

    def log_prob_standard(self, z: Tensor, context: Tensor) -> Tensor:
        """log q of standardised unconstrained theta (N, D) given context (N, C)."""
        return self.flow(context).log_prob(z)

    def log_prob(self, values: dict[str, Tensor], obs: Observation) -> Tensor:
        """log q(theta | obs) in the model's constrained parameters, (N,) for values {site: (N, *event)}."""
        x = self.inputs(obs, warn=False)
        u = self.space.to_unconstrained(values)
        _, logdet = self.space.to_constrained(u)
        return self.log_prob_unconstrained(u, x) - logdet

    # ----------------------------------------------------------------- draws
    def sample(self, obs: Observation, num_samples: int = 1000, derived: bool = True, seed: int | None = None,
               chunk: int = 20_000, predictive: bool | int = False, check: bool = True, log_q: bool = True):
        """Posterior draws for one or a batch of galaxies, as ArviZ ``InferenceData``.

        Arguments:
            obs: One galaxy or a batch (same layout as the training data).
            num_samples: Draws per galaxy.
            derived: Also compute the model's deterministic sites (stellar mass,
                SFRs, ages) by running the model on the draws (masses only, no light,
                for models that allow it: see :mod:`sedppl.derived`).
            seed: Random seed (of torch's CPU generator, which makes the draws).
            chunk: Draws per forward simulation call for the derived quantities.
            predictive: Also return the noise-free model data (group ``posterior_predictive``:
                ``spectrum``, ``photometry``) of every draw (True) or of the first ``predictive``
                draws (an int: one full forward simulation each); implies ``derived``.
            check: Warn when the observation lies outside the training distribution.
            log_q: Also compute the flow's log density of every draw (nearly free: the inverse passes
                give it; False leaves ``log_q`` out).

        Returns:
            InferenceData with ``posterior`` variables of shape (chain=1, draw, galaxy, ...),
            in the model's own site names, and, with ``log_q``, the flow's log density of each draw
            (constrained space) as ``log_q`` in ``sample_stats``.
        """
        if seed is not None:
            # the draws are made on the CPU: its generator only (torch.manual_seed also queues the
            # seeding of every GPU backend, ~0.2 ms a call)
            torch.default_generator.manual_seed(seed)
        x = self.inputs(obs, warn=check)
        u, lq = self.draw(x, num_samples, log_q)
        return self.package(obs, x, u, lq, derived=derived, predictive=predictive, chunk=chunk)

    def draw(self, x: dict[str, Tensor | None], num_samples: int, log_q: bool = True,
             step: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Draws in the unconstrained coordinates of the model's latent sites, for network inputs x.

        Arguments:
            x: Network inputs of N galaxies (:meth:`inputs`).
            num_samples: S, draws per galaxy.
            log_q: Also return log q(u | x).
            step: Galaxies per flow call (default: ~10,000 draws a call, the fastest on a CPU).

        Returns:
            u (S, N, D) (:attr:`space` coordinates) and log q(u | x) (S, N), or None without ``log_q``.
        """
        n_gal = next(v for v in x.values() if v is not None).shape[0]
        step = min(n_gal, step or max(1, 10_000 // num_samples))  # larger calls run slower per draw
        zs, lqs = [], []
        with torch.no_grad():
            # eager: the contexts of all galaxies at once; compiled: encoder and flow in one graph per call
            data = self.context(x) if self._compiled is None else x
            for i in range(0, n_gal, step):
                # all the inputs when one call takes them: a compiled call on a slice (a view) of them
                # took 0.2-0.4 ms longer (2026-12-06)
                d = data if step >= n_gal else _rows(data, slice(i, i + step))
                if self._compiled is not None and i + step > n_gal:
                    # the last, partial chunk padded to the full one: one compiled shape, no recompile
                    d = _rows(d, torch.arange(step).clamp(max=n_gal - i - 1))
                z_i, lq_i = (self._compiled or self._flow_draws)(d, num_samples, log_q)
                n_i = min(step, n_gal - i)  # the padding's draws dropped
                zs.append(z_i[:, :n_i])
                if log_q:
                    lqs.append(lq_i[:, :n_i])
        u = self.theta_shift + self.theta_scale * torch.cat(zs, 1)
        return u, (torch.cat(lqs, 1) - torch.log(self.theta_scale).sum() if log_q else None)

    def _flow_draws(self, ctx: Tensor, num_samples: int, log_q: bool) -> tuple[Tensor, Tensor | None]:
        """S draws of the flow's standardised coordinates (S, N, D) for contexts (N, C), with log q or None.

        zuko's ``rsample_and_log_prob`` written out transform by transform (the last transform's
        inverse first): the same draws, without a ``ComposedTransform``, whose construction
        ``torch.compile`` cannot trace (it would split the compiled flow into several graphs).
        Inside ``torch.compile`` the draws start features first (:meth:`_draws_features_first`).
        """
        start = self._draws_features_first(ctx, num_samples, log_q) if autoregressive._parameter_major() else None
        if start is None:
            base = self.flow.base(ctx).expand(ctx.shape[:-1])
            x = base.sample((num_samples,))
            log_base, rest = (base.log_prob(x) if log_q else None), reversed(self.flow.transform.transforms)
        else:
            x, log_base, rest = start
        ladj = None
        for t in rest:
            if log_q:
                x, ladj_t = t(ctx).inv.call_and_ladj(x)
                ladj = ladj_t if ladj is None else ladj + ladj_t
            else:
                x = t(ctx).inv(x)
        return x, (None if not log_q else log_base if ladj is None else log_base - ladj)

    def _context_draws(self, x: dict[str, Tensor | None], num_samples: int,
                       log_q: bool) -> tuple[Tensor, Tensor | None]:
        """:meth:`_flow_draws` from network inputs x (checked by :meth:`inputs`) rather than contexts: what
        :meth:`compile` compiles, so that the encoder's many small operations run fused in the same graph."""
        return self._flow_draws(self.context(x), num_samples, log_q)

    def _draws_features_first(self, ctx: Tensor, num_samples: int, log_q: bool):
        """The start of :meth:`_flow_draws` with the base draws made features first, (D, N, S), and kept
        so through the group-wise autoregressive inverses (:meth:`sedppl.infer.autoregressive.
        GroupwiseAutoregressiveTransform.solve_features_first`): inside ``torch.compile`` no kernel then
        reads the draws across their layout (such reads compile to scalar loops).

        Returns:
            The draws after those inverses (S, N, D) (a view), log q of the base minus their
            log-determinants (S, N) (None without ``log_q``), and the transforms left to apply (the
            context's affine), in order; None for a base that is not a diagonal normal.
        """
        normal = getattr(self.flow.base(ctx), "base_dist", None)
        if type(normal) is not torch.distributions.Normal:  # exactly zuko's DiagNormal's
            return None
        n, d = ctx.shape[0], normal.loc.shape[-1]
        loc, scale = (v.expand(n, d).T.unsqueeze(-1) for v in (normal.loc, normal.scale))
        eps = torch.randn(d, n, num_samples, dtype=loc.dtype, device=loc.device)
        xt = loc + scale * eps
        lq = (-0.5 * eps**2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(0) if log_q else None
        rest = list(reversed(self.flow.transform.transforms))
        while rest:
            step = getattr(rest[0](ctx).inv, "call_and_ladj_features_first", None)
            solved = None if step is None else step(xt)
            if solved is None:
                break
            xt = solved[0]
            lq = lq - solved[1] if log_q else None
            rest.pop(0)
        return xt.permute(2, 1, 0), (lq.T if log_q else None), rest

    def compile(self, enable: bool = True) -> "NeuralPosterior":
        """Draw through a ``torch.compile``-d encoder and flow, one graph (TorchInductor's fused C++ kernels),
        from now on.

        Each new shape (draws per galaxy, galaxies per flow call, ``log_q`` or not) is compiled at its
        first call, which took 74-153 s on a 2-core CPU (2026-12-06; TorchInductor caches the compiled
        graphs on disk: 7-15 s in a later process); after that, ``sample`` was 2.1-7.6x faster than eager
        in runs of ``benchmarks/npe.py --compile`` that day, which measures the ratio. Worth it for catalogs and for many
        galaxies in one session, not for a single call. Needs a C++ compiler; for fixed weights only
        (compile after training or loading).

        Arguments:
            enable: False goes back to eager drawing.

        Returns:
            The posterior itself.
        """
        if not enable:
            self._compiled = None
            return self
        with torch.no_grad():  # an eager call first: builds and caches the inverse passes' weight plans
            self._flow_draws(torch.zeros(1, self.card.context), 2, True)
        # fallback_random: the base draws by torch's own generator (TorchInductor's per-element generator
        # took ~0.6 ms for 13,000 draws, a tenth of the compiled flow for one galaxy); cpp_wrapper: the
        # compiled graph called from C++, not from Python (its ~230 buffers a call: ~0.5 ms less a call)
        self._compiled = torch.compile(self._context_draws, dynamic=False,
                                       options={"fallback_random": True, "cpp_wrapper": True})
        return self

    def __getstate__(self) -> dict:
        """The state for pickle and ``copy.deepcopy``, without the compiled draws (a copy draws eagerly)."""
        return {**super().__getstate__(), "_compiled": None}

    def set_base_scale(self, scale: float, n_sims: int = 0) -> None:
        """Make the flow's base distribution N(0, scale^2 I) and record it (with the simulations it was
        fitted on) in the card; see :func:`sedppl.infer.npe_calibration.fit_base_scale`."""
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"base scale must be finite and > 0, not {scale}")
        base = self.flow.base
        base.scale.fill_(float(scale))
        self.card.base_scale, self.card.base_scale_sims = float(scale), int(n_sims)

    def log_prob_unconstrained(self, u: Tensor, x: dict[str, Tensor | None]) -> Tensor:
        """log q(u | x) of unconstrained values u (*, N, D) for network inputs x of N galaxies -> (*, N)."""
        with torch.no_grad():
            return self.flow(self.context(x)).log_prob((u - self.theta_shift) / self.theta_scale) \
                - torch.log(self.theta_scale).sum()

    def package(self, obs: Observation, x: dict[str, Tensor | None], u: Tensor, log_q: Tensor | None,
                derived: bool = True, predictive: bool | int = False, chunk: int = 20_000):
        """InferenceData of unconstrained draws u (S, N, D) with their log q(u | x) (S, N) or None;
        the other arguments as in :meth:`sample`."""
        num_samples = u.shape[0]
        values, logdet = self.space.to_constrained(u)
        post = {k: v for k, v in values.items()}
        pred: dict[str, Tensor] = {}
        if derived or predictive:
            n_pred = num_samples if predictive is True else min(int(predictive), num_samples)
            extra = self.derived(values, x["redshift"], chunk, predictive=n_pred == num_samples)
            pred = {k: extra.pop(k) for k in DATA_SITES if k in extra}
            post.update(extra)
            if 0 < n_pred < num_samples:
                first = self._run_model({k: v[:n_pred] for k, v in values.items()}, x["redshift"], chunk, True)
                pred = {k: first[k] for k in DATA_SITES if k in first}
        dims = {k: ["galaxy"] + [f"{k}_dim_{i}" for i in range(v.dim() - 2)] for k, v in {**post, **pred}.items()}
        names = obs.name if isinstance(obs.name, list) else [obs.name] * u.shape[1]
        groups = {"posterior": {k: v[None].numpy() for k, v in post.items()}}
        if log_q is not None:  # (S, N): the density moved to the constrained space
            groups["sample_stats"] = {"log_q": (log_q - logdet)[None].numpy()}
        if pred:
            groups["posterior_predictive"] = {k: v[None].numpy() for k, v in pred.items()}
        return inference_data(groups, dims={**dims, "log_q": ["galaxy"]} if log_q is not None else dims,
                              coords={"galaxy": list(names)[:u.shape[1]] if len(set(names)) == u.shape[1]
                                      else list(range(u.shape[1]))})

    def derived(self, values: dict[str, Tensor], redshift: Tensor | None, chunk: int = 20_000,
                predictive: bool = False) -> dict[str, Tensor]:
        """Deterministic sites of the model evaluated at draws {site: (S, N, ...)} -> {name: (S, N, ...)};
        with ``predictive``, also the noise-free means of the data sites (``spectrum``, ``photometry``).

        Without ``predictive``, the model runs inside :func:`sedppl.derived.derived_only`
        (masses only, no light); a model that cannot (its code needs the light) runs in full.
        """
        if not predictive and self._derived_only_works:
            try:
                with derived_only():
                    return self._run_model(values, redshift, chunk, False)
            except Exception:  # noqa: BLE001 - a user's model that needs its light: evaluate in full
                self._derived_only_works = False
        return self._run_model(values, redshift, chunk, predictive)

    def _run_model(self, values: dict[str, Tensor], redshift: Tensor | None, chunk: int,
                   predictive: bool) -> dict[str, Tensor]:
        s, n = next(iter(values.values())).shape[:2]
        flat = {k: v.reshape(s * n, *v.shape[2:]) for k, v in values.items()}
        z = None if redshift is None else redshift[None].expand(s, n).reshape(-1)
        out: dict[str, list[Tensor]] = {}
        for i in range(0, s * n, chunk):
            part = {k: v[i:i + chunk] for k, v in flat.items()}
            m = next(iter(part.values())).shape[0]
            kw = {} if z is None else {"redshift": z[i:i + chunk]}
            with torch.no_grad():
                tr = poutine.trace(poutine.condition(self.model, data=part)).get_trace(n_galaxies=m, **kw)
            for name, v in trace_quantities(tr, predictive).items():
                out.setdefault(name, []).append(v)
        return {k: torch.cat(v).reshape(s, n, *v[0].shape[1:]) for k, v in out.items()}

    # ----------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and its card (.json), atomically."""
        from safetensors.torch import save_file

        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        self.card.sha256 = hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.replace(path)
        card = path.with_suffix(".json")
        card.with_suffix(".tmpjson").write_text(json.dumps(asdict(self.card), indent=1))
        card.with_suffix(".tmpjson").replace(card)
        return path

    @classmethod
    def load(cls, path: str | Path, model) -> "NeuralPosterior":
        """Load a posterior for ``model``; errors if the card, checksum or sites do not match."""
        from safetensors.torch import load_file

        path = Path(path).with_suffix(".safetensors")
        card = PosteriorCard(**json.loads(path.with_suffix(".json").read_text()))
        if card.version != CARD_VERSION:
            raise ValueError(f"posterior card version {card.version}; this sedppl reads version {CARD_VERSION}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if card.sha256 and digest != card.sha256:
            raise ValueError(f"{path}: checksum {digest[:12]} does not match the card's {card.sha256[:12]}")
        post = cls(card, model)
        post.load_state_dict(load_file(str(path)))
        stored = post.flow.base.scale
        if not torch.allclose(stored, torch.full_like(stored, card.base_scale), rtol=1e-6):
            raise ValueError(f"{path}: the flow's base scale {stored.tolist()} does not match the card's "
                             f"base_scale {card.base_scale}")
        post.eval()
        use_fast_splines(post.flow)
        return post
