"""A variational autoencoder of galaxy spectra whose decoder is the SED model (amortized VI with Pyro).

The *model* (:class:`ResidualModel`) is a zoo model's prior and forward physics
(SPS, exact or emulated, then dust, redshift, instrument and noise), extended by a
data-driven part: ``n_latent`` extra latent variables per galaxy (site
``residual_latent``, standard normal) and a neural, smooth multiplicative
correction to the *rest-frame* SED (:class:`sedppl.residual.RestFrameResidual`),
held small by a Gaussian penalty of width ``residual_scale`` on its log at every
knot (a ``pyro.factor``, site ``residual_penalty``). The physics is not learned.

The *guide* (:class:`AmortizedGuide`) is an encoder: binned spectrum, ivar,
photometry and redshift -> a conditional normalizing flow (zuko, neural spline
coupling layers) over the unconstrained latent sites, the physical ones and the
residual's. Maximising the ELBO over a set of spectra (:func:`sedppl.infer.vae_training.train_vae`)
is training a VAE: the residual network is the decoder's free part, the flow the encoder.

Uses, all on :class:`SpectrumVAE`:

* :meth:`SpectrumVAE.encode`: a spectrum's posterior over its physical parameters in
  one network pass, as ArviZ ``InferenceData`` with the derived quantities (a third
  amortized engine beside NPE and NUTS);
* :meth:`SpectrumVAE.generate`: mock spectra from the learned model at any redshift and S/N;
* :meth:`SpectrumVAE.residual_curve`: the learned correction against rest-frame wavelength,
  where the SPS model falls short.

References:
    Kingma & Welling 2014, "Auto-Encoding Variational Bayes".
    Melchior et al. 2023, AJ 166, 74 ("spender": autoencoders of galaxy spectra in the rest frame).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import zuko
from pyro import poutine
from torch import Tensor, nn

from ..data import Observation
from ..derived import derived_only, trace_quantities
from ..noise import site_mean, site_scale
from ..residual import RestFrameResidual
from .encoder import DataEncoder
from .inference_data import inference_data
from .parameters import ParameterSpace
from .simulations import bin_spectrum

#: The auxiliary site of the guide's joint unconstrained draw.
AUX_SITE = "_vae_u"


class ResidualModel:
    """A model's physics with a learned rest-frame residual: the VAE's decoder, a Pyro program.

    Arguments:
        base: A model that takes ``residual`` (the zoo models do: :mod:`sedppl.zoo`).
        residual: The correction, or None for the physics alone.
        residual_scale: Width of the Gaussian penalty on ln(factor) at each knot.

    Same calling convention as ``base`` (``model(obs=None, n_galaxies=1, **kwargs)``).
    """

    def __init__(self, base, residual: RestFrameResidual | None = None, residual_scale: float = 0.05):
        if residual is not None and residual_scale <= 0:
            raise ValueError(f"residual_scale must be > 0, got {residual_scale}")
        self.base, self.residual, self.residual_scale = base, residual, float(residual_scale)
        self.forward_model = base.forward_model
        self.bands = base.bands
        self.photometry_floor = getattr(base, "photometry_floor", 0.0)
        self.key = getattr(base, "key", "")

    def __call__(self, obs: Observation | None = None, n_galaxies: int = 1, **kwargs):
        if self.residual is None:
            return self.base(obs, n_galaxies, **kwargs)
        res = self.residual

        def correction():  # run by the base model inside its galaxy plate
            latent = None
            if res.n_latent:
                latent = pyro.sample("residual_latent", dist.Normal(0.0, 1.0).expand([res.n_latent]).to_event(1))
            logc = res.log_correction(latent)
            pyro.factor("residual_penalty", -0.5 * ((logc / self.residual_scale) ** 2).sum(-1))
            return lambda wave: res.factor(logc, wave)

        return self.base(obs, n_galaxies, residual=correction, **kwargs)


def spectrum_rows(obs: Observation) -> tuple[Tensor, Tensor]:
    """Flux and ivar of ``obs``'s spectra as (N, M) rows, masked pixels given ivar 0."""
    m = obs.flux.shape[-1]
    flux, ivar = obs.flux.reshape(-1, m), obs.ivar.reshape(-1, m)
    if obs.mask is not None:
        ivar = torch.where(obs.mask.reshape(ivar.shape), ivar, torch.zeros_like(ivar))
    return flux, ivar


def guide_inputs(obs: Observation, bin_factor: int, bands: list[str]) -> dict[str, Tensor | None]:
    """The encoder's inputs of an observation: binned spectrum and ivar (N, M // bin_factor)
    (1e-17 erg/s/cm^2/A), band fluxes and ivar (N, K) nanomaggies (zeros when ``bands`` is
    given but the observation has none), redshift (N,)."""
    if not obs.has_spectrum:
        raise ValueError("the VAE encodes spectra: the observation has none")
    if obs.redshift is None:
        raise ValueError("the VAE's encoder needs the (spectroscopic) redshift; the observation has none")
    flux, ivar = spectrum_rows(obs)
    n = flux.shape[0]
    x: dict[str, Tensor | None] = {"photometry": None, "photometry_ivar": None}
    x["spectrum"], x["spectrum_ivar"] = bin_spectrum(flux, ivar, bin_factor)
    if bands:
        if obs.has_photometry:
            obs.check_bands(bands)
            x["photometry"] = obs.band_flux.reshape(n, -1)
            x["photometry_ivar"] = obs.band_ivar.reshape(n, -1)
        else:
            x["photometry"] = x["photometry_ivar"] = torch.zeros(n, len(bands))
    x["redshift"] = obs.redshift.reshape(-1).expand(n).float()
    return x


class AmortizedGuide(nn.Module):
    """The encoder q(latents | spectrum, photometry, redshift): a conditional flow over the
    unconstrained latent sites of a model, standardised by their prior spread.

    Arguments:
        space: The model's latent sites (:class:`sedppl.infer.parameters.ParameterSpace`, not whitened).
        spectrum_bins: Bins of the binned spectrum.
        bands: Bands of the photometry the encoder reads ([] for the spectrum alone).
        redshift_range: (low, high) of the redshifts it encodes.
        bin_factor: Pixels per bin of the spectrum.
        context: Size of the data embedding.
        transforms: Coupling layers of the flow.
        hidden: Hidden widths of the flow's networks.
    """

    def __init__(self, space: ParameterSpace, spectrum_bins: int, bands: list[str],
                 redshift_range: tuple[float, float], bin_factor: int, context: int = 64, transforms: int = 3,
                 hidden: tuple[int, ...] = (128, 128)):
        super().__init__()
        if space.whiten:
            raise ValueError("the guide works in the sites' biject_to coordinates: use an unwhitened space")
        self.space, self.bands, self.bin_factor = space, list(bands), int(bin_factor)
        self.encoder = DataEncoder(spectrum_bins, len(self.bands), redshift_range, out=context)
        self.flow = zuko.flows.NSF(space.dim, context, transforms=transforms, hidden_features=list(hidden),
                                   passes=2)
        self.register_buffer("theta_shift", torch.zeros(space.dim))
        self.register_buffer("theta_scale", torch.ones(space.dim))

    def distribution(self, obs: Observation) -> tuple[torch.distributions.Distribution, int]:
        """q(z | x) over the standardised coordinates z = (u - shift) / scale, and the galaxy count."""
        x = guide_inputs(obs, self.bin_factor, self.bands)
        return self.flow(self.encoder(**x)), x["redshift"].shape[0]

    def forward(self, obs: Observation | None = None, n_galaxies: int = 1, **kwargs) -> None:
        """The guide as a Pyro program (the model's calling convention; ``obs`` is required)."""
        if obs is None:
            raise ValueError("the encoder needs an observation")
        q, n = self.distribution(obs)
        z, log_q = q.rsample_and_log_prob()
        u = self.theta_shift + self.theta_scale * z
        log_q = log_q - torch.log(self.theta_scale).sum()
        values, logdet = self.space.to_constrained(u)
        with pyro.plate("galaxies", n):
            pyro.sample(AUX_SITE, dist.Delta(u, log_density=log_q, event_dim=1), infer={"is_auxiliary": True})
            for i, s in enumerate(self.space.sites):
                # density of the constrained values: log q(u) - log|dx/du|, carried by the first site
                ld = -logdet if i == 0 else torch.zeros_like(logdet)
                pyro.sample(s.name, dist.Delta(values[s.name], log_density=ld, event_dim=len(s.event_shape)))

    def log_prob_unconstrained(self, u: Tensor, obs: Observation) -> Tensor:
        """log q(u | x) (S, N) of unconstrained values u (S, N, D) of the galaxies of ``obs``, no gradients."""
        with torch.no_grad():
            q, _ = self.distribution(obs)
            return q.log_prob((u - self.theta_shift) / self.theta_scale) - torch.log(self.theta_scale).sum()

    def sample_unconstrained(self, obs: Observation, num_samples: int) -> Tensor:
        """Draws u (S, N, D) of the latent sites in unconstrained coordinates, no gradients."""
        with torch.no_grad():
            q, _ = self.distribution(obs)
            return self.theta_shift + self.theta_scale * q.sample((num_samples,))


class SpectrumVAE:
    """A trained VAE: the decoder (:class:`ResidualModel`), the encoder (:class:`AmortizedGuide`) and its card.

    Arguments:
        model: The decoder.
        guide: The encoder.
        card: What it was trained on and how (a JSON-serialisable dict).
    """

    def __init__(self, model: ResidualModel, guide: AmortizedGuide, card: dict):
        self.model, self.guide, self.card = model, guide, card

    # ----------------------------------------------------------------- uses
    def encode(self, obs: Observation, num_samples: int = 1000, derived: bool = True, seed: int | None = None):
        """Posterior draws of every latent site (and, with ``derived``, the model's deterministic
        sites: stellar mass, SFRs, ages) for one or a batch of spectra, from one encoder pass.

        Returns:
            InferenceData, ``posterior`` variables (chain=1, draw, galaxy, ...) in the model's site names.
        """
        if seed is not None:
            torch.manual_seed(seed)
        u = self.guide.sample_unconstrained(obs, num_samples)
        values, _ = self.guide.space.to_constrained(u)
        post = dict(values)
        if derived:
            post.update(self._deterministic(values, obs))
        dims = {k: ["galaxy"] + [f"{k}_dim_{i}" for i in range(v.dim() - 2)] for k, v in post.items()}
        return inference_data({"posterior": {k: v[None].numpy() for k, v in post.items()}}, dims=dims,
                              coords={"galaxy": list(range(u.shape[1]))})

    def sample(self, obs: Observation, num_samples: int = 1000, derived: bool = True, seed: int | None = None):
        """:meth:`encode` under the amortized posteriors' name (:meth:`sedppl.infer.npe.NeuralPosterior.sample`),
        so the engines that start from amortized draws take the encoder: e.g. batched HMC whose mode
        search begins at the best encoder draw of each galaxy, ``run_hmc(vae.model, obs=obs,
        posterior=vae, neutra=False)``."""
        return self.encode(obs, num_samples, derived=derived, seed=seed)

    def _deterministic(self, values: dict[str, Tensor], obs: Observation, predictive: bool = False) -> dict:
        """Deterministic sites at draws {site: (S, N, ...)} -> {name: (S, N, ...)}: masses only (no light,
        :mod:`sedppl.derived`), or with ``predictive`` the full model on ``obs`` (its resolution
        matrices included), adding the noise-free ``spectrum`` and ``photometry``."""
        s, n = next(iter(values.values())).shape[:2]
        flat = {k: v.reshape(s * n, *v.shape[2:]) for k, v in values.items()}
        conditioned = poutine.condition(self.model, data=flat)
        with torch.no_grad():
            if predictive:
                tr = poutine.trace(conditioned).get_trace(obs.tile(s))
            else:
                z = obs.redshift.reshape(-1).expand(n)[None].expand(s, n).reshape(-1)
                with derived_only():
                    tr = poutine.trace(conditioned).get_trace(n_galaxies=s * n, redshift=z)
        return {k: v.reshape(s, n, *v.shape[1:]) for k, v in trace_quantities(tr, predictive).items()}

    def reconstruct(self, obs: Observation, num_samples: int = 16, seed: int = 0) -> dict[str, Tensor]:
        """Posterior-predictive spectrum (N, M) (1e-17 erg/s/cm^2/A: the pixel-wise median of the noise-free
        model over ``num_samples`` encoder draws, robust to a stray draw in the flow's tails), and its
        chi^2 per degree of freedom (N,) over the pixels with ivar > 0 (and not masked)."""
        torch.manual_seed(seed)
        u = self.guide.sample_unconstrained(obs, num_samples)
        values, _ = self.guide.space.to_constrained(u)
        pred = self._deterministic(values, obs, predictive=True)["spectrum"].median(0).values
        flux, ivar = spectrum_rows(obs)
        used = ivar > 0
        chi2 = torch.where(used, (torch.nan_to_num(flux) - pred) ** 2 * ivar, torch.zeros_like(ivar)).sum(-1)
        dof = (used.sum(-1) - self.guide.space.dim).clamp(min=1)
        return {"spectrum": pred, "chi2_dof": chi2 / dof}

    def generate(self, n: int, redshift: float | Tensor, snr: float | Tensor = 10.0, seed: int = 0,
                 physics_only: bool = False) -> Observation:
        """Mock spectra (and photometry) from the learned model: physical parameters from the prior,
        residual latents from N(0, 1), the learned correction, then redshift and noise.

        Arguments:
            n: Galaxies.
            redshift: () or (n,).
            snr: Median S/N per pixel of each spectrum (the ivar is flat in flux: 1/sigma^2 with
                sigma = median flux / snr); () or (n,).
            seed: Random seed.
            physics_only: Leave the learned correction out (the same draws otherwise).

        Returns:
            An :class:`Observation` with the noisy spectra on the model's grid, ivar, photometry.
        """
        pyro.set_rng_seed(seed)
        z = torch.as_tensor(redshift, dtype=torch.float32).expand(n)
        model = self.model.base if physics_only else self.model
        with torch.no_grad():
            tr = poutine.trace(model).get_trace(n_galaxies=n, redshift=z)
            mean = site_mean(tr.nodes["spectrum"]).reshape(n, -1)
            sigma = (mean.median(-1).values.abs() / torch.as_tensor(snr, dtype=mean.dtype).expand(n))[:, None]
            ivar = (1 / sigma**2).expand_as(mean).clone()
            flux = mean + sigma * torch.randn_like(mean)
            kw = {}
            if "photometry" in tr.nodes and self.model.bands:
                kw = {"bands": self.model.bands, "band_flux": tr.nodes["photometry"]["value"].reshape(n, -1),
                      "band_ivar": site_scale(tr.nodes["photometry"]).reshape(n, -1) ** -2}
        wave = self.model.forward_model.wave_obs.numpy()
        return Observation(redshift=z, wave=wave, flux=flux, ivar=ivar, **kw)

    def residual_curve(self, wave: Tensor | np.ndarray, num_samples: int = 1000, seed: int = 0) -> dict:
        """The learned correction on rest-frame ``wave`` (vacuum Angstrom): its 16/50/84th percentiles
        over the residual latents' prior, each (L,) (a factor; 1 = the physics unchanged)."""
        res = self.model.residual
        wave = torch.as_tensor(np.asarray(wave), dtype=torch.float32)
        if res is None:
            one = torch.ones_like(wave)
            return {"p16": one, "p50": one, "p84": one}
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            latent = torch.randn(num_samples, res.n_latent, generator=gen) if res.n_latent else None
            f = res.factor(res.log_correction(latent).reshape(-1, res.n_knots), wave)
        q = torch.quantile(f, torch.tensor([0.16, 0.5, 0.84]), dim=0)
        return {"p16": q[0], "p50": q[1], "p84": q[2]}

    # ----------------------------------------------------------------- files
    def state_dict(self) -> dict[str, Tensor]:
        """Weights of the encoder (``guide.*``) and the residual (``residual.*``)."""
        out = {f"guide.{k}": v for k, v in self.guide.state_dict().items()}
        if self.model.residual is not None:
            out.update({f"residual.{k}": v for k, v in self.model.residual.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Set the encoder's and the residual's weights from :meth:`state_dict`'s layout."""
        self.guide.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("guide.")})
        if self.model.residual is not None:
            self.model.residual.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("residual.")})

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors: weights, no code) and its card (.json), atomically."""
        from safetensors.torch import save_file

        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(path)
        card = path.with_suffix(".json")
        tmp = card.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.card, indent=1))
        tmp.replace(card)
        return path

    @classmethod
    def load(cls, path: str | Path, base) -> "SpectrumVAE":
        """Rebuild a saved VAE around ``base`` (the same zoo model it was trained with)."""
        from safetensors.torch import load_file

        path = Path(path).with_suffix(".safetensors")
        card = json.loads(path.with_suffix(".json").read_text())
        vae = build_vae(base, card)
        vae.load_state_dict(load_file(str(path)))
        return vae


def build_vae(base, card: dict) -> SpectrumVAE:
    """An untrained VAE around ``base`` from a card's architecture (keys as written by
    :func:`sedppl.infer.vae_training.train_vae`)."""
    residual = None
    if card["residual"]:
        residual = RestFrameResidual(tuple(card["residual_wave_range"]), card["n_knots"], card["n_latent"],
                                     tuple(card["residual_hidden"]), card.get("remove_trend", True))
    model = ResidualModel(base, residual, card["residual_scale"])
    z0 = float(np.mean(card["redshift_range"]))
    space = ParameterSpace.from_model(model, n=2, redshift=z0)
    if "sites" in card and space.names != card["sites"]:
        raise ValueError(f"the model's latent sites {space.names} are not the card's {card['sites']}")
    guide = AmortizedGuide(space, card["spectrum_bins"], card["bands"], tuple(card["redshift_range"]),
                           card["bin_factor"], card["context"], card["transforms"], tuple(card["hidden"]))
    return SpectrumVAE(model, guide, card)
