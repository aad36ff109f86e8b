"""Redshifts by template chi2 scans: SDSS pipeline redshifts, a mock of known redshift, errors."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sedppl.data import Observation
from sedppl.readers import read_sdss_spectrum
from sedppl.redshift import measure_redshift

PPXF = importlib.util.find_spec("ppxf")


@pytest.fixture(scope="module")
def small_specphot_mock():
    """One DESI-like mock galaxy at z = 0.37 from the zoo model, S/N 3 per pixel: (spectrum, true z)."""
    from sedppl.mocks import make_mocks
    from sedppl.zoo import SpecPhotModel

    mock = make_mocks(SpecPhotModel(), 1, seed=5, redshift=0.37, snr_spectrum=3.0)
    o = mock.obs
    return Observation(wave=o.wave, flux=o.flux[0], ivar=o.ivar[0]), 0.37


@pytest.mark.skipif(PPXF is None, reason="ppxf (with its SDSS spectra) not installed")
@pytest.mark.parametrize("galaxy", ["NGC3073", "NGC3522"])
def test_sdss_pipeline_redshifts(galaxy):
    """Two SDSS DR18 galaxies (a star-forming dwarf and an elliptical): the scan finds the
    pipeline's redshift within 1e-4 (30 km/s), unambiguously (delta chi2 > 100), with a
    reduced chi2 below 3 (template mismatch at S/N ~ 20-40)."""
    path = Path(PPXF.origin).parent / "spectra" / f"{galaxy}_SDSS_DR18.fits"
    spec = read_sdss_spectrum(path)
    res = measure_redshift(Observation(wave=spec.obs.wave, flux=spec.obs.flux, ivar=spec.obs.ivar))
    assert abs(res.z - float(spec.obs.redshift)) < 1e-4
    assert res.delta_chi2 > 100
    assert 0.5 < res.chi2 / res.dof < 3


def test_mock_redshift_recovered(small_specphot_mock):
    """A noisy DESI-like mock from the zoo model (S/N 3 per pixel): z within 3e-4 of the truth."""
    obs, z_true = small_specphot_mock
    res = measure_redshift(obs, z_range=(0.0, 1.1))
    assert abs(res.z - z_true) < 3e-4
    assert res.delta_chi2 > 25
    assert np.all(np.isfinite(res.chi2_grid)) and len(res.z_grid) == len(res.chi2_grid)


def test_errors():
    wave = np.arange(4000.0, 5000.0, 1.0)
    with pytest.raises(ValueError, match="one galaxy"):
        measure_redshift(Observation(wave=wave, flux=np.ones((2, 1000)), ivar=np.ones((2, 1000))))
    with pytest.raises(ValueError, match="z_range"):
        measure_redshift(Observation(wave=wave, flux=np.ones(1000), ivar=np.ones(1000)), z_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="spectrum"):
        measure_redshift(Observation(bands=["sdss_r"], band_flux=[1.0], band_ivar=[1.0]))
