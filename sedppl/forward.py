"""The forward model: binned SFH and ZH to an observed spectrum and photometry.

    SFH, ZH --synthesis--> young + old L_lambda (rest frame, vacuum)
            --dust (Charlot & Fall: birth clouds + diffuse)-->
            --nebular lines and continuum (young stars' light, birth-cloud dust)-->
            --redshift (d_L, 1+z), flux-conserving resampling onto the observed pixels-->
            (velocity dispersion: FFT convolution on the rest-frame ln(lambda) grid, before resampling)
            --instrumental resolution (band matrices)-->
            --calibration (aperture factor, Legendre polynomial)--> f_lambda [1e-17 erg/s/cm^2/A]
    the same rest-frame SED on a coarse grid --filters--> band fluxes [nanomaggies]

The air-wavelength SSP and Cloudy grids are moved to vacuum and rebinned once,
at construction, onto rest-frame grids uniform in ln(lambda) (one fine grid for
the spectrum, one coarse grid for photometry), so that redshifting is a shift.
Every step is a batched torch function; this module only wires them. Nothing
here knows about Pyro: the probabilistic models call :meth:`ForwardModel.forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import dust as dustlaw
from .cosmology import MPC_CM, Cosmology
from .derived import is_derived_only
from .instrument import (
    FWHM_PER_SIGMA, apply_band, broaden_velocity, desi_band, legendre_calibration, lsf_band,
    sigma_from_resolution)
from .photometry import LogGridPhotometry, Photometry
from .resample import check_wavelengths, edges_from_centers, interp1d, resample_log
from .sps.grid import LSUN_ERG_S, SSPGrid, load_bc03_miles, log_wave_grid, rebin_grid_cached
from .sps.nebular import NebularEmission
from .sps.synthesis import StellarSynthesis

#: Spectra are returned in this unit of erg/s/cm^2/A.
FLUX_UNIT = 1e-17
#: Lyman limit, Angstrom.
LYMAN_LIMIT_AA = 911.75


@dataclass
class ModelOutput:
    """What :class:`ForwardModel` returns (batch shape ``...``).

    Attributes:
        spectrum: Observed f_lambda on the observed pixels, (..., M), 1e-17 erg/s/cm^2/A; None without a grid
            (and inside :func:`sedppl.derived.derived_only`).
        photometry: Band fluxes, (..., K), nanomaggies; None without bands (and inside ``derived_only``).
        mass_formed: (...,) Msun.
        surviving_mass: Living stars and remnants, (...,) Msun.
        line_luminosity: Dust-attenuated nebular line luminosities, (..., J) Lsun; None without nebular emission.
    """

    spectrum: Tensor | None
    photometry: Tensor | None
    mass_formed: Tensor
    surviving_mass: Tensor
    line_luminosity: Tensor | None = None


def widen_log_grid(lo: float, hi: float, dlnlam: float, want_lo: float, want_hi: float) -> tuple[float, float]:
    """The (first, last) pixel centres of a grid uniform in ln(lambda) (see
    :func:`sedppl.sps.grid.log_wave_grid`) that starts at ``lo`` and reaches ``hi``, widened by
    whole pixels of ``dlnlam`` until it covers ``want_lo``-``want_hi`` (same units, e.g.
    Angstrom): the pixels of the narrower grid are pixels of the wider one."""
    if not 0 < want_lo < want_hi:
        raise ValueError(f"a rest-frame range must satisfy 0 < min < max, got ({want_lo}, {want_hi})")
    n_below = max(0, int(np.ceil(np.log(lo / want_lo) / dlnlam - 1e-9)))
    return lo * float(np.exp(-n_below * dlnlam)), max(hi, want_hi)


class _Branch(torch.nn.Module):
    """Synthesis + nebular emission + dust on one rest-frame grid, uniform in ln(lambda) in vacuum.

    The SSPs are rebinned (flux-conserving) once onto pixels whose vacuum edges are
    exp(log_start + i dlnlam); redshifting is then a shift on this grid.
    """

    def __init__(self, grid: SSPGrid, wmin: float, wmax: float, dlnlam: float,
                 t_bc: float, nebular: bool, fesc: float, rank: int | None = None):
        super().__init__()
        centers_vac = log_wave_grid(wmin, wmax, dlnlam)
        self.dlnlam = float(dlnlam)
        self.log_start = float(np.log(centers_vac[0]) - 0.5 * dlnlam)
        edges_vac = torch.exp(self.log_start + self.dlnlam * torch.arange(len(centers_vac) + 1, dtype=torch.float64))
        vac = grid.to_vacuum()
        if edges_vac[0] < vac.wave[0] or edges_vac[-1] > vac.wave[-1]:
            raise ValueError(f"the model needs rest-frame {float(edges_vac[0]):.0f}-{float(edges_vac[-1]):.0f} A "
                             f"(vacuum); the SSP grid has {vac.wave[0]:.0f}-{vac.wave[-1]:.0f} A")
        local = rebin_grid_cached(vac.restrict(float(edges_vac[0]) * 0.99, float(edges_vac[-1]) * 1.01), centers_vac)
        self.stars = StellarSynthesis(local, t_bc=t_bc, rank=rank)
        self.nebular = NebularEmission(local.wave, t_bc=t_bc, vacuum=True) if nebular else None
        wave = torch.from_numpy(local.wave)
        self.register_buffer("wave", wave.float())
        self.register_buffer("edges_vac", edges_vac)
        self.register_buffer("template_fwhm", torch.from_numpy(local.fwhm).float())
        esc = torch.where(wave < LYMAN_LIMIT_AA, torch.tensor(float(fesc), dtype=torch.float64),
                          torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("young_escape", esc.float())
        if nebular:
            lw = self.nebular.line_wave.double()
            inside = (lw > local.wave[0]) & (lw < local.wave[-1])
            # deposit each line on its two nearest pixels (flux and centroid kept)
            w = wave.double()
            j = (torch.searchsorted(w, lw, right=True) - 1).clamp(0, len(w) - 2)
            u = ((lw - w[j]) / (w[j + 1] - w[j])).clamp(0, 1)
            width = torch.diff(edges_vac)  # the pixel widths the resampling integrates over
            self.register_buffer("line_index", torch.cat([j, j + 1]))
            dep = torch.cat([(1 - u) / width[j], u / width[j + 1]]) * torch.cat([inside, inside])
            self.register_buffer("line_deposit", dep.float())

    def forward(self, mass, edges, logz, max_age, a_diffuse, a_bc, a_diffuse_lines, a_bc_lines,
                logz_gas, log_u):
        pop = self.stars(mass, edges, logz, max_age)
        t_old = dustlaw.transmission(a_diffuse)
        t_young = t_old * dustlaw.transmission(a_bc)
        young = pop.young
        lines = None
        if self.nebular is not None:
            lines, cont = self.nebular(mass, edges, logz_gas, log_u)
            young = young * self.young_escape + cont
            lines = lines * dustlaw.transmission(a_diffuse_lines + a_bc_lines)
            young_lines = torch.zeros_like(young).index_add(
                -1, self.line_index, torch.cat([lines, lines], -1) * self.line_deposit)
            sed = young * t_young + young_lines + pop.old * t_old
        else:
            sed = young * t_young + pop.old * t_old
        return sed, pop, lines


class ForwardModel(torch.nn.Module):
    """Observed spectra and photometry of galaxies from binned SFH and ZH.

    Arguments:
        grid: SSP grid; the BC03+MILES grid by default.
        wave_obs: Observed pixel centres, (M,), vacuum Angstrom (e.g. DESI's
            3600-9824 A at 0.8 A), or a list of such arrays, one per spectrograph
            arm (e.g. DESI's overlapping B, R, Z arms), each increasing; the model
            spectrum is then the arms' spectra concatenated (``arm_slices``
            locates each). None for photometry only.
        bands: Filter names (see :class:`sedppl.photometry.Photometry`); empty for no photometry.
        z_range: Redshifts the model must cover; outside it raises an error.
        resolving_power, fwhm: Instrumental resolution as R or FWHM (Angstrom,
            scalar or (M,)); both None for none (or a per-galaxy resolution matrix).
        nebular: Include nebular lines and continuum.
        t_bc: Birth-cloud age, Gyr (young stars: dust and ionising light).
        fesc: Escape fraction of ionising photons when ``nebular`` (0: all absorbed).
        cosmology: A :class:`sedppl.cosmology.Cosmology`; Planck18 by default.
        spec_dlnlam: ln(lambda) step of the rest-frame grid for spectra (1.5e-4: 45 km/s,
            at least 2 pixels per FWHM of the MILES templates).
        phot_dlnlam: ln(lambda) step of the coarse rest-frame grid for photometry.
        ssp_rank: Low-rank SSP factorisation for speed (see
            :class:`sedppl.sps.synthesis.StellarSynthesis`); None for the exact sum.
        phot_rest_range: (min, max) rest-frame wavelengths, vacuum Angstrom, that the
            photometry grid must cover beyond what the bands need over ``z_range``
            (e.g. (2000, 60000) to train an emulator that serves other bands too);
            the grid grows by whole pixels at either end, so the pixels the bands
            need, and so the band fluxes, are unchanged. None: what the bands need.
    """

    def __init__(self, grid: SSPGrid | None = None, wave_obs: np.ndarray | None = None,
                 bands: list[str] | tuple[str, ...] = (), z_range: tuple[float, float] = (0.0, 1.0),
                 resolving_power: float | np.ndarray | None = None, fwhm: float | np.ndarray | None = None,
                 nebular: bool = True, t_bc: float = 0.01, fesc: float = 0.0,
                 cosmology: Cosmology | None = None, spec_dlnlam: float = 1.5e-4,
                 phot_dlnlam: float = 1e-3, ssp_rank: int | None = None,
                 phot_rest_range: tuple[float, float] | None = None):
        super().__init__()
        grid = load_bc03_miles() if grid is None else grid
        if not 0 <= z_range[0] < z_range[1]:
            raise ValueError(f"z_range must satisfy 0 <= zmin < zmax, got {z_range}")
        if wave_obs is None and not bands:
            raise ValueError("give observed wavelengths, bands, or both")
        self.z_range = (float(z_range[0]), float(z_range[1]))
        self.cosmology = cosmology if cosmology is not None else Cosmology(z_max=max(20.0, z_range[1]))
        self.grid = grid
        self.spec = None
        if wave_obs is not None:
            arms = list(wave_obs) if isinstance(wave_obs, (list, tuple)) else [wave_obs]
            arms = [torch.as_tensor(np.asarray(a, float)) for a in arms]
            self.arm_slices, start = [], 0
            for i, a in enumerate(arms):
                check_wavelengths(a, "observed wavelengths" + (f" (arm {i})" if len(arms) > 1 else ""))
                self.arm_slices.append(slice(start, start + len(a)))
                start += len(a)
            w = torch.cat(arms)
            self.register_buffer("wave_obs", w.float())
            arm_edges = [edges_from_centers(a).double() for a in arms]
            #: pixel edges: (M+1,) for one arm; for several, each arm's edges concatenated
            self.register_buffer("edges_obs", torch.cat(arm_edges))
            for i, e in enumerate(arm_edges):
                self.register_buffer(f"log_edges_arm{i}", torch.log(e))
            lo = min(float(e[0]) for e in arm_edges) / (1 + z_range[1]) / 1.002
            hi = max(float(e[-1]) for e in arm_edges) / (1 + z_range[0]) * 1.002
            self.spec = _Branch(grid, lo, hi, spec_dlnlam, t_bc, nebular, fesc, ssp_rank)
            if resolving_power is not None or fwhm is not None:
                sig = sigma_from_resolution(w, resolving_power, None if fwhm is None else torch.as_tensor(fwhm, dtype=w.dtype))
                self.register_buffer("instrument_sigma", sig.float())
            else:
                self.instrument_sigma = None
        self.phot = None
        if bands:
            self.photometry = Photometry(bands)
            lo = self.photometry.wave_min / (1 + z_range[1]) / 1.01
            hi = self.photometry.wave_max / (1 + z_range[0]) * 1.01
            if phot_rest_range is not None:
                lo, hi = widen_log_grid(lo, hi, phot_dlnlam, *phot_rest_range)
            self.phot = _Branch(grid, lo, hi, phot_dlnlam, t_bc, nebular, fesc, ssp_rank)
            self.log_photometry = LogGridPhotometry(self.photometry, self.phot.edges_vac, self.z_range)
        self.nebular = nebular

    def use_emulators(self, spec=None, phot=None) -> "ForwardModel":
        """Emulate the older stars' light of the spectrum and/or photometry branch.

        Arguments:
            spec, phot: A :class:`sedppl.emulator.SpectrumEmulator` (or the path of one) trained
                for that branch's rest-frame grid (see :mod:`sedppl.sps.emulated`), or None to keep
                the branch as it is.

        Returns:
            This model (modified in place); ``emulated`` then lists the emulated branches.
        """
        from .emulator import SpectrumEmulator
        from .sps.emulated import EmulatedSynthesis

        for name, emu in (("spec", spec), ("phot", phot)):
            if emu is None:
                continue
            branch = getattr(self, name)
            if branch is None:
                raise ValueError(f"an emulator was given for the {name!r} branch, which this model does not have")
            if not isinstance(emu, SpectrumEmulator):
                emu = SpectrumEmulator.load(emu)
            exact = branch.stars.exact if isinstance(branch.stars, EmulatedSynthesis) else branch.stars
            if exact.rank is not None:
                raise ValueError("emulate the exact synthesis (ssp_rank=None), not a low-rank one")
            branch.stars = EmulatedSynthesis(exact, emu.to(exact.dtype))
        return self

    @property
    def emulated(self) -> list[str]:
        """Names of the branches (``"spec"``, ``"phot"``) whose older stars' light is emulated."""
        from .sps.emulated import EmulatedSynthesis

        return [n for n in ("spec", "phot") if isinstance(getattr(self, n), _Branch)
                and isinstance(getattr(self, n).stars, EmulatedSynthesis)]

    def check_redshift(self, z: Tensor) -> None:
        """Raise ``ValueError`` if a redshift lies outside the model's ``z_range``."""
        if torch.any(~torch.isfinite(z)):
            raise ValueError("redshift: non-finite value")
        lo, hi = self.z_range
        if torch.any(z < lo) or torch.any(z > hi):
            raise ValueError(f"redshift outside the model's range [{lo}, {hi}]: "
                             f"{z[(z < lo) | (z > hi)].flatten()[0].item():.4g}")
        if torch.any(z <= 0):
            raise ValueError("redshift must be > 0 (d_L = 0 at z = 0)")

    def _attenuation(self, wave, av, dust_index, av_bc, bc_index):
        a_diff = dustlaw.calzetti(wave, av) if dust_index is None else dustlaw.kriek_conroy(wave, av, dust_index)
        a_bc = dustlaw.birth_cloud(wave, av_bc, bc_index)
        return a_diff, a_bc

    def forward(self, mass: Tensor, edges: Tensor, logz: Tensor, z: Tensor, av: Tensor | float = 0.0,
                dust_index: Tensor | None = None, av_bc: Tensor | float = 0.0, bc_index: float = -1.0,
                log_u: Tensor | float = -2.5, logz_gas: Tensor | None = None,
                sigma_v: Tensor | None = None, resolution_matrix: Tensor | None = None,
                calibration_scale: Tensor | float | None = None, calibration_poly: Tensor | None = None,
                rest_factor: Callable[[Tensor], Tensor] | None = None, check: bool = True) -> ModelOutput:
        """Model spectra and photometry.

        Arguments:
            mass: Stellar mass formed per SFH bin, (..., N), Msun.
            edges: Bin edges in lookback time, (..., N+1), Gyr, youngest first,
                the oldest at most t_univ(z).
            logz: Stellar log10(Z/Zsun) per bin, (..., N).
            z: Redshift, (...,).
            av: Diffuse-dust attenuation at 5500 A, (...,), mag.
            dust_index: Kriek & Conroy index n, (...,); None for Calzetti.
            av_bc: Extra birth-cloud attenuation at 5500 A on stars younger than t_bc, (...,), mag.
            bc_index: Power-law index of the birth-cloud curve.
            log_u: Ionisation parameter, (...,).
            logz_gas: Gas log10(Z/Zsun), (...,); by default that of the youngest bin.
            sigma_v: Line-of-sight velocity dispersion of stars and gas, (...,), km/s, or None;
                it broadens the templates as they are (so the templates' own resolution,
                ~2.5 A FWHM for MILES, stays a floor below the instrument's).
            resolution_matrix: Per-galaxy DESI-layout resolution data, (..., 2H+1, M),
                applied instead of the constructor's R/FWHM; a list of them, one per arm,
                for several arms.
            calibration_scale: Aperture factor multiplying the spectrum, (...,).
            calibration_poly: Legendre coefficients of a multiplicative polynomial, (..., K).
            rest_factor: A multiplicative correction to the rest-frame SED (stars, nebular
                continuum and the lines deposited in it) before redshifting: a function of the
                rest-frame wavelengths (L,) (vacuum Angstrom) returning (..., L)
                factors; applied to the spectrum's and the photometry's branches alike
                (:mod:`sedppl.residual`). ``ModelOutput.lines`` is not corrected.

        Returns:
            A :class:`ModelOutput`.
        """
        dtype = self.spec.stars.dtype if self.spec is not None else self.phot.stars.dtype
        z = torch.as_tensor(z, dtype=dtype)
        if check:
            self.check_redshift(z)
            dustlaw.check_dust(av=torch.as_tensor(av), av_bc=torch.as_tensor(av_bc))
        max_age = self.cosmology.age(z)
        if is_derived_only():  # masses only (sedppl.derived)
            stars = (self.spec if self.spec is not None else self.phot).stars
            pop = stars(mass, edges, torch.as_tensor(logz, dtype=dtype), max_age, light=False)
            return ModelOutput(None, None, pop.mass_formed, pop.surviving_mass, None)
        d_l = self.cosmology.luminosity_distance(z)  # Mpc
        logz = torch.as_tensor(logz, dtype=dtype)
        gas = logz[..., 0] if logz_gas is None else torch.as_tensor(logz_gas, dtype=dtype)
        log_u = torch.as_tensor(log_u, dtype=dtype)
        av = torch.as_tensor(av, dtype=dtype)
        av_bc = torch.as_tensor(av_bc, dtype=dtype)
        dust_index = None if dust_index is None else torch.as_tensor(dust_index, dtype=dtype)
        out_spec = out_phot = lines_out = None
        pop = None
        for branch in (self.spec, self.phot):
            if branch is None:
                continue
            a_diff, a_bc = self._attenuation(branch.wave, av, dust_index, av_bc, bc_index)
            if branch.nebular is not None:
                lw = branch.nebular.line_wave.to(dtype)
                a_dl, a_bl = self._attenuation(lw, av, dust_index, av_bc, bc_index)
            else:
                a_dl = a_bl = None
            sed, pop, lines = branch(mass, edges, logz, max_age, a_diff, a_bc, a_dl, a_bl, gas, log_u)
            if rest_factor is not None:
                sed = sed * rest_factor(branch.wave.to(dtype))
            # f_lambda = L / (4 pi d_L^2 (1+z)) at lambda_obs = (1+z) lambda_rest
            scale = (LSUN_ERG_S / (4 * np.pi * MPC_CM**2)) / d_l**2  # erg/s/cm^2 per Lsun, (...,)
            if branch is self.spec:
                lines_out = lines
                if sigma_v is not None:
                    # a velocity dispersion is a shift-invariant convolution on the rest-frame ln(lambda) grid
                    sed = broaden_velocity(sed, branch.dlnlam, torch.as_tensor(sigma_v, dtype=sed.dtype))
                # integral of L over each observed pixel, per observed Angstrom
                flux = torch.cat([resample_log(sed, branch.log_start, branch.dlnlam,
                                               getattr(self, f"log_edges_arm{i}"), torch.log1p(z))
                                  for i in range(len(self.arm_slices))], dim=-1)
                flux = flux * (scale / FLUX_UNIT)[..., None]
                flux = self._instrument(flux, z, resolution_matrix)
                if calibration_scale is not None or calibration_poly is not None:
                    coeffs = calibration_poly if calibration_poly is not None else torch.zeros(1, dtype=dtype)
                    s = 1.0 if calibration_scale is None else calibration_scale
                    flux = flux * legendre_calibration(self.wave_obs.to(dtype), coeffs, s)
                out_spec = flux
            else:
                flam = sed * (scale / (1 + z))[..., None]
                # the lines are already deposited in ``sed``
                out_phot = self.log_photometry(flam, z)
        return ModelOutput(out_spec, out_phot, pop.mass_formed, pop.surviving_mass, lines_out)

    def _instrument(self, flux: Tensor, z: Tensor, resolution_matrix: Tensor | None) -> Tensor:
        """The instrument's resolution: a per-galaxy resolution matrix as given, or the
        constructor's R/FWHM less the templates' own resolution (in quadrature; none where
        the templates are already coarser)."""
        wave = self.wave_obs.to(flux.dtype)
        if resolution_matrix is None and self.instrument_sigma is None:
            return flux
        # the templates' own resolution, moved to the observed frame
        if resolution_matrix is None:
            matrices = [None] * len(self.arm_slices)
            # the instrument's sigma less the templates' own (moved to the observed frame)
            rest = wave / (1 + z[..., None])
            tmpl_fwhm = interp1d(rest, self.spec.wave.to(flux.dtype), self.spec.template_fwhm.to(flux.dtype),
                                 log_step=self.spec.dlnlam) * (1 + z[..., None])
            excess = (self.instrument_sigma.to(flux.dtype) ** 2 - (tmpl_fwhm / FWHM_PER_SIGMA) ** 2).clamp(min=0.0)
        else:
            matrices = resolution_matrix if isinstance(resolution_matrix, (list, tuple)) else [resolution_matrix]
            excess = None
        if len(matrices) != len(self.arm_slices):
            raise ValueError(f"{len(matrices)} resolution matrices for {len(self.arm_slices)} arms")
        out = []
        for sl, mat in zip(self.arm_slices, matrices):
            f = flux[..., sl]
            if excess is not None:
                f = _broaden_where_needed(f, wave[sl], excess[..., sl])
            if mat is not None:
                f = apply_band(f, desi_band(torch.as_tensor(mat, dtype=flux.dtype)))
            out.append(f)
        return torch.cat(out, dim=-1)


def _broaden_where_needed(flux: Tensor, wave: Tensor, var: Tensor) -> Tensor:
    """Gaussian broadening by sigma^2 = ``var`` (Angstrom^2, (..., M)), computed only over the
    pixels where some galaxy needs it (plus the kernel's reach); elsewhere the identity."""
    need = (var > 0).reshape(-1, var.shape[-1]).any(0)
    if not torch.any(need):
        return flux
    idx = torch.nonzero(need).flatten()
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    sig = torch.sqrt(var[..., lo:hi] + 1e-30)
    pix = torch.diff(wave).min().item()
    h = max(1, int(np.ceil(5.0 * sig.max().item() / pix)))
    a, b = max(0, lo - h), min(flux.shape[-1], hi + h)
    sub_var = torch.zeros(var.shape[:-1] + (b - a,), dtype=var.dtype)
    sub_var[..., lo - a: hi - a] = var[..., lo:hi]
    part = apply_band(flux[..., a:b], lsf_band(wave[a:b], torch.sqrt(sub_var + 1e-30)))
    return torch.cat([flux[..., :lo], part[..., lo - a: hi - a], flux[..., hi:]], dim=-1)
