"""Ready-made generative models (the model zoo's Pyro programs).

Each model is a callable Pyro program ``model(obs=None, n_galaxies=1)``: with no
observation it simulates ``n_galaxies`` galaxies from the prior in one
vectorized call (a plate over galaxies); with an :class:`sedppl.data.Observation`
it conditions on it (one galaxy or a batch). Derived quantities are recorded
as ``pyro.deterministic`` sites, so every engine returns them by name. The optional
``residual`` argument is called inside the galaxy plate (it may sample sites) and returns
a multiplicative correction of the rest-frame SED, a function of rest-frame wavelength
(``ForwardModel(..., rest_factor=...)``; :mod:`sedppl.infer.vae` learns one).

* :class:`SpecPhotModel` -- a DESI-like spectrum with g, r, z, W1, W2 photometry,
  in the spirit of PROVABGS (Hahn et al. 2023) but with the continuity SFH
  prior, a smooth metallicity history and Charlot & Fall + Kriek & Conroy dust.
* :class:`PhotometryModel` -- SDSS ugriz photometry only, in the spirit of
  SEDflow (Hahn & Melchior 2022), with the redshift fixed or sampled.

Latent sites and priors (both models): ``log_mass`` U(7, 12.5) log10 Msun formed;
``log_sfr_ratio`` (6) StudentT(2, 0, 0.3); ``zh_logit_now``, ``zh_logit_step``
(smooth ZH); ``tau_bc``, ``tau_ism`` U(0, 3) (optical depths at 5500 A; PROVABGS);
``dust_index`` U(-2, 1) (PROVABGS's range; Kriek & Conroy n); spectra also
``log_u`` U(-4, -1) and ``sigma_v`` U(30, 400) km/s.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from .data import Observation
from .derived import is_derived_only
from .dust import MAG_PER_TAU
from .forward import ForwardModel
from .noise import observe_photometry, observe_spectrum
from .sfh import continuity_sfh, mass_weighted_age, sfr_averaged
from .zh import smooth_zh

from .surveys import DESI_BANDS, DESI_WAVE, SDSS_BANDS  # noqa: F401 (re-exported)


def record_derived(out, mass: Tensor, edges: Tensor, logz: Tensor) -> None:
    """Deterministic sites users expect: surviving mass (``log_stellar_mass``, log10 Msun), SFRs over 10 and
    100 Myr (Msun/yr), sSFR (log10 /yr), mass-weighted age (Gyr) and log Z, and the histories (``sfh_sfr``
    Msun/yr per bin, ``sfh_edges`` Gyr lookback, ``zh_log_z`` log10 Z/Zsun per bin)."""
    log_mstar = torch.log10(out.surviving_mass)
    pyro.deterministic("log_stellar_mass", log_mstar)
    sfr10 = sfr_averaged(mass, edges, 0.01)
    sfr100 = sfr_averaged(mass, edges, 0.1)
    pyro.deterministic("sfr_10myr", sfr10)
    pyro.deterministic("sfr_100myr", sfr100)
    pyro.deterministic("log_ssfr_100myr", torch.log10(sfr100.clamp(min=1e-30)) - log_mstar)
    pyro.deterministic("mass_weighted_age", mass_weighted_age(mass, edges))
    pyro.deterministic("mass_weighted_log_z", torch.log10((mass * 10**logz).sum(-1) / mass.sum(-1)))
    # the histories themselves, for SFH / ZH plots: SFR per bin (Msun/yr), bin edges (Gyr lookback), log10 Z/Zsun
    pyro.deterministic("sfh_sfr", mass / (torch.diff(edges, dim=-1) * 1e9), event_dim=1)
    pyro.deterministic("sfh_edges", edges, event_dim=1)
    pyro.deterministic("zh_log_z", logz, event_dim=1)


def dust_priors() -> tuple[Tensor, Tensor, Tensor]:
    """PROVABGS dust: tau_bc, tau_ism ~ U(0, 3), index n ~ U(-2, 1); returns (av_ism, av_bc, n) in mag."""
    tau_bc = pyro.sample("tau_bc", dist.Uniform(0.0, 3.0))
    tau_ism = pyro.sample("tau_ism", dist.Uniform(0.0, 3.0))
    index = pyro.sample("dust_index", dist.Uniform(-2.0, 1.0))
    return MAG_PER_TAU * tau_ism, MAG_PER_TAU * tau_bc, index


class _ZooModel:
    forward_model: ForwardModel
    bands: list[str]
    photometry_floor: float
    key: str = ""

    def _set_sps(self, sps) -> None:
        """``sps``: "exact", "emulated" (the shipped emulators of this zoo model, :mod:`sedppl.emulators`),
        or {branch: emulator or path} for the forward model's ``"spec"`` / ``"phot"`` branches."""
        if sps == "exact":
            return
        if sps == "emulated":
            from .emulators import shipped_emulators

            sps = shipped_emulators(self.key)
        if not isinstance(sps, dict) or not set(sps) <= {"spec", "phot"}:
            raise ValueError(f"sps must be 'exact', 'emulated' or a dict of emulators by branch ('spec', 'phot'), "
                             f"got {sps!r}")
        self.forward_model.use_emulators(**sps)

    def _plate_size(self, obs: Observation | None, n_galaxies: int) -> int:
        """Galaxies in the plate: ``n_galaxies`` to simulate, else those of ``obs`` (its bands checked)."""
        if obs is None:
            return n_galaxies
        obs.check_bands(self.bands)
        return obs.n_galaxies

    def _stellar_latents(self, obs, redshift, n):
        """Redshift, continuity SFH, smooth ZH and dust: the sites both zoo models share."""
        z = self._redshift(obs, redshift, n)
        mass, edges = continuity_sfh(self.forward_model.cosmology.age(z))
        logz = smooth_zh(edges)
        av, av_bc, index = dust_priors()
        return z, mass, edges, logz, av, av_bc, index

    def _observe_photometry(self, out, obs, band_ivar):
        """Photometry likelihood; simulations without an ivar get 5% errors; an observation
        without photometry (a spectrum alone) has none."""
        if obs is not None and not obs.has_photometry:
            return
        bivar = obs.band_ivar if obs is not None else band_ivar
        if bivar is None:
            bivar = 1 / (0.05 * out.photometry.detach()) ** 2
        observe_photometry("photometry", out.photometry, None if obs is None else obs.band_flux, bivar,
                           floor=self.photometry_floor)

    def _redshift(self, obs: Observation | None, redshift: Tensor | float | None, n: int) -> Tensor:
        z = obs.redshift if obs is not None and obs.redshift is not None else redshift
        lo, hi = self.forward_model.z_range
        if z is None:
            return pyro.sample("redshift", dist.Uniform(max(lo, 1e-3), hi))
        z = torch.as_tensor(z, dtype=torch.float32)
        self.forward_model.check_redshift(z)
        return z.expand(n) if z.dim() == 0 else z


class SpecPhotModel(_ZooModel):
    """DESI-like spectrum + g, r, z, W1, W2 photometry.

    Arguments:
        wave: Observed wavelengths (vacuum A); DESI's 3600-9824 A at 0.8 A by default.
        bands: Filters of the photometry.
        z_range: Redshifts covered.
        resolving_power: Instrumental R when no per-galaxy resolution matrix is given.
        ssp_rank: Low-rank SSPs (faster); None for exact.
        photometry_floor: Fractional systematic error added to the photometry.
        fiber_fraction: (mean, sd) of the fraction of the total light in the
            spectrum's aperture (PROVABGS's f_fiber, from the measured fiber/total
            flux ratio): site ``f_fiber`` ~ LogNormal with that mean and sd
            multiplies the spectrum (not the photometry). None: no aperture factor.
        n_calibration: Number of Legendre coefficients (sites ``calibration_poly``
            ~ Normal(0, 0.1)) of a multiplicative spectral calibration; 0 for none.
        sps: ``"exact"`` synthesis, ``"emulated"`` (the shipped emulators of the older stars'
            light on the default rest-frame grids of the spectrum and of the photometry:
            :mod:`sedppl.emulators`), or {branch: emulator or path} for the ``"spec"`` and
            ``"phot"`` branches (:mod:`sedppl.sps.emulated`).
        phot_rest_range: (min, max) rest-frame vacuum Angstrom the photometry grid must cover
            beyond what the bands need (see :class:`~sedppl.forward.ForwardModel`); used to
            train the shipped emulator over 2000 A - 6 um. None: what the bands need.
    """

    key = "specphot"

    def __init__(self, wave: np.ndarray = DESI_WAVE, bands: list[str] = DESI_BANDS,
                 z_range: tuple[float, float] = (0.002, 1.1), resolving_power: float | None = 3000.0,
                 ssp_rank: int | None = None, photometry_floor: float = 0.02,
                 fiber_fraction: tuple[float, float] | None = None, n_calibration: int = 0, sps="exact",
                 phot_rest_range: tuple[float, float] | None = None):
        self.fiber_fraction = fiber_fraction
        self.n_calibration = int(n_calibration)
        self.bands = list(bands)
        self.forward_model = ForwardModel(wave_obs=wave, bands=self.bands, z_range=z_range,
                                          resolving_power=resolving_power, ssp_rank=ssp_rank,
                                          phot_rest_range=phot_rest_range)
        self.photometry_floor = photometry_floor
        self._set_sps(sps)

    def __call__(self, obs: Observation | None = None, n_galaxies: int = 1,
                 redshift: Tensor | float | None = None, spectrum_ivar: Tensor | None = None,
                 band_ivar: Tensor | None = None, residual=None):
        fm = self.forward_model
        n = self._plate_size(obs, n_galaxies)
        with pyro.plate("galaxies", n):
            z, mass, edges, logz, av, av_bc, index = self._stellar_latents(obs, redshift, n)
            log_u = pyro.sample("log_u", dist.Uniform(-4.0, -1.0))
            sigma_v = pyro.sample("sigma_v", dist.Uniform(30.0, 400.0))
            scale = poly = None
            if self.fiber_fraction is not None:
                mean, sd = self.fiber_fraction
                s2 = np.log1p((sd / mean) ** 2)
                scale = pyro.sample("f_fiber", dist.LogNormal(np.log(mean) - 0.5 * s2, np.sqrt(s2)))
            if self.n_calibration:
                poly = pyro.sample("calibration_poly", dist.Normal(0.0, 0.1).expand([self.n_calibration]).to_event(1))
            out = fm(mass, edges, logz, z, av=av, dust_index=index, av_bc=av_bc, log_u=log_u,
                     sigma_v=sigma_v, resolution_matrix=None if obs is None else obs.resolution,
                     calibration_scale=scale, calibration_poly=poly,
                     rest_factor=None if residual is None else residual(), check=False)
            record_derived(out, mass, edges, logz)
            if is_derived_only():  # no light was simulated (sedppl.derived)
                return out
            ivar = obs.ivar if obs is not None else spectrum_ivar
            if ivar is None:
                ivar = torch.full_like(out.spectrum, 1.0)
            observe_spectrum("spectrum", out.spectrum, None if obs is None else obs.flux, ivar,
                             None if obs is None else obs.mask)
            self._observe_photometry(out, obs, band_ivar)
        return out


class PhotometryModel(_ZooModel):
    """SDSS ugriz photometry only (SEDflow-like); the redshift is sampled when not given.

    Arguments:
        bands: Filters.
        z_range: Redshifts covered (SEDflow: 0-0.2).
        photometry_floor: Fractional systematic error.
        nebular: Include nebular emission.
        sps: ``"exact"`` synthesis, ``"emulated"`` (the shipped emulator of the older stars'
            light on this model's default grid, :mod:`sedppl.emulators`), or {"phot": emulator or path}.
        phot_rest_range: As for :class:`SpecPhotModel`.
    """

    key = "phot"

    def __init__(self, bands: list[str] = SDSS_BANDS, z_range: tuple[float, float] = (0.01, 0.2),
                 photometry_floor: float = 0.02, nebular: bool = True, sps="exact",
                 phot_rest_range: tuple[float, float] | None = None):
        self.bands = list(bands)
        self.forward_model = ForwardModel(bands=self.bands, z_range=z_range, nebular=nebular,
                                          phot_rest_range=phot_rest_range)
        self.photometry_floor = photometry_floor
        self._set_sps(sps)

    def __call__(self, obs: Observation | None = None, n_galaxies: int = 1,
                 redshift: Tensor | float | None = None, band_ivar: Tensor | None = None, residual=None):
        fm = self.forward_model
        n = self._plate_size(obs, n_galaxies)
        with pyro.plate("galaxies", n):
            z, mass, edges, logz, av, av_bc, index = self._stellar_latents(obs, redshift, n)
            out = fm(mass, edges, logz, z, av=av, dust_index=index, av_bc=av_bc,
                     rest_factor=None if residual is None else residual(), check=False)
            record_derived(out, mass, edges, logz)
            if not is_derived_only():
                self._observe_photometry(out, obs, band_ivar)
        return out
