"""Small user-written models shared by the tests (built from sedppl blocks, zoo calling convention)."""

import pyro
import pyro.distributions as dist
import torch

from sedppl.forward import ForwardModel
from sedppl.noise import observe_photometry

BANDS = ["sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"]


class DelayedTau:
    """A delayed-tau galaxy (tau = 2 Gyr, 9 Gyr old), constant solar metallicity, Calzetti dust,
    ugriz photometry, redshift given in 0.05-0.2; free: log mass formed U(``log_mass_range``), default
    U(8, 12) log10 Msun, and A_V U(0, 2) mag. Small enough to simulate 12,000 draws and train a posterior
    in about two minutes."""

    bands = BANDS
    photometry_floor = 0.01

    def __init__(self, grid, log_mass_range=(8.0, 12.0)):
        self.log_mass_range = log_mass_range
        self.forward_model = ForwardModel(grid, bands=BANDS, z_range=(0.05, 0.2), nebular=False)

    def __call__(self, obs=None, n_galaxies=1, redshift=None, band_ivar=None):
        n = n_galaxies if obs is None else obs.band_flux.reshape(-1, 5).shape[0]
        z = torch.as_tensor(obs.redshift if obs is not None else redshift, dtype=torch.float32).expand(n)
        edges = torch.linspace(0.0, 9.0, 31)
        t = 9.0 - 0.5 * (edges[1:] + edges[:-1])
        w = t * torch.exp(-t / 2.0) * torch.diff(edges)
        with pyro.plate("galaxies", n):
            log_mass = pyro.sample("log_mass", dist.Uniform(*self.log_mass_range))
            av = pyro.sample("av", dist.Uniform(0.0, 2.0))
            mass = 10 ** log_mass[..., None] * w / w.sum()
            out = self.forward_model(mass, edges.expand(n, 31), torch.zeros(n, 30), z, av=av, check=False)
            pyro.deterministic("log_stellar_mass", torch.log10(out.surviving_mass))
            ivar = obs.band_ivar if obs is not None else (band_ivar if band_ivar is not None
                                                          else 1 / (0.05 * out.photometry.detach()) ** 2)
            observe_photometry("photometry", out.photometry, None if obs is None else obs.band_flux, ivar,
                               floor=self.photometry_floor)


def sbc_simulations(model: DelayedTau, n: int, seed: int, snr_reference: float = 30.0):
    """``n`` galaxies from ``model``'s prior at redshifts uniform in 0.05-0.2, observed with noise
    that does not depend on their truth (as simulation-based calibration needs): per band,
    sigma = the flux of a log M = 10.5, A_V = 0 galaxy at the same redshift / ``snr_reference``,
    plus the model's own fractional floor. Returns the Observation and the truth {site: (n,)}."""
    from pyro import poutine

    from sedppl.data import Observation

    gen = torch.Generator().manual_seed(seed)
    z = 0.05 + 0.15 * torch.rand(n, generator=gen)
    fiducial = {"log_mass": torch.full((n,), 10.5), "av": torch.zeros(n)}
    ref = poutine.trace(poutine.condition(model, fiducial)).get_trace(n_galaxies=n, redshift=z)
    ivar = (snr_reference / ref.nodes["photometry"]["fn"].mean.detach()) ** 2
    pyro.set_rng_seed(seed + 1)
    tr = poutine.trace(model).get_trace(n_galaxies=n, redshift=z, band_ivar=ivar)
    truth = {k: tr.nodes[k]["value"].detach() for k in ("log_mass", "av", "log_stellar_mass")}
    obs = Observation(redshift=z, bands=model.bands, band_flux=tr.nodes["photometry"]["value"].detach(),
                      band_ivar=ivar)
    return obs, truth


def ratio_model(obs=None, n_galaxies=1):
    """Three log SFR ratios with the continuity prior StudentT(2, 0, 0.3) per galaxy; the data (one 'band',
    sd 0.1) constrain the first only, so the other two keep their prior: heavy tails, as the ratios of the
    SFH bins a spectrum leaves empty."""
    n = n_galaxies if obs is None else obs.band_flux.shape[0]
    with pyro.plate("galaxies", n):
        r = pyro.sample("log_sfr_ratio", dist.StudentT(2.0, 0.0, 0.3).expand([3]).to_event(1))
        pyro.sample("photometry", dist.Normal(r[:, :1], 0.1).to_event(1),
                    obs=None if obs is None else obs.band_flux)
