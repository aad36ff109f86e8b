"""Readers on real SDSS DR18 spectra shipped with ppxf, and on broken files."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sedppl.readers import SpectrumFileError, read_sdss_spectrum

ppxf = importlib.util.find_spec("ppxf")
SPECTRA = Path(ppxf.origin).parent / "spectra" if ppxf else None
pytestmark = pytest.mark.skipif(ppxf is None, reason="ppxf (test extra) ships the SDSS spectra")


def halpha_ew(spec):
    """Rest-frame H-alpha equivalent width (A, emission positive) from the data: line window
    6553-6573 A against the mean of 6500-6540 and 6590-6630 A sidebands."""
    obs = spec.obs
    rest = obs.wave.numpy() / (1 + float(obs.redshift))
    f, ok = obs.flux.numpy(), obs.ivar.numpy() > 0
    side = ok & (((rest > 6500) & (rest < 6540)) | ((rest > 6590) & (rest < 6630)))
    line = ok & (rest > 6553) & (rest < 6573)
    cont = np.median(f[side])
    dw = np.gradient(rest)
    return float(np.sum((f[line] / cont - 1) * dw[line]))


@pytest.mark.parametrize("galaxy, z", [("NGC3073", 0.00376), ("NGC3522", 0.00402)])
def test_sdss_dr18_reads(galaxy, z):
    spec = read_sdss_spectrum(SPECTRA / f"{galaxy}_SDSS_DR18.fits")
    obs = spec.obs
    w = obs.wave.numpy()
    # SDSS-I/II spectrograph: ~3800-9200 A in vacuum, 1e-4 dex pixels
    assert 3780 < w[0] < 3830 and 9150 < w[-1] < 9250
    np.testing.assert_allclose(np.diff(np.log10(w)), 1e-4, rtol=1e-3)
    assert abs(float(obs.redshift) - z) < 2e-5
    # instrumental FWHM of the SDSS spectrographs: R ~ 1800-2200, i.e. 2-4 A at 5000 A
    assert 2.0 < np.interp(5000, w, spec.fwhm) < 4.0
    assert (obs.ivar > 0).float().mean() > 0.9
    assert spec.meta["plate"] > 0 and "class" in spec.meta


def test_star_forming_dwarf_vs_elliptical():
    """NGC 3073 (star-forming dwarf) shows H-alpha emission, NGC 3522 (elliptical) does not,
    and 3522 is redder (g-band to i-band continuum ratio): a check that wavelengths,
    redshift and flux units come through right."""
    sf = read_sdss_spectrum(SPECTRA / "NGC3073_SDSS_DR18.fits")
    el = read_sdss_spectrum(SPECTRA / "NGC3522_SDSS_DR18.fits")
    assert halpha_ew(sf) > 2.0  # A, emission (measured 3.3 A net of the stellar absorption)
    assert halpha_ew(el) < 1.0  # measured -0.08 A

    def blue_red(spec):
        w, f = spec.obs.wave.numpy() / (1 + float(spec.obs.redshift)), spec.obs.flux.numpy()
        return np.median(f[(w > 4500) & (w < 4700)]) / np.median(f[(w > 7400) & (w < 7600)])

    assert blue_red(el) < blue_red(sf)


def test_broken_files(tmp_path):
    src = (SPECTRA / "NGC3522_SDSS_DR18.fits").read_bytes()
    trunc = tmp_path / "truncated.fits"
    trunc.write_bytes(src[: len(src) // 3])
    with pytest.raises(SpectrumFileError, match="truncated.fits"):
        read_sdss_spectrum(trunc)
    text = tmp_path / "notfits.fits"
    text.write_text("SIMPLE = nonsense\n" * 100)
    with pytest.raises(SpectrumFileError, match="not a readable FITS"):
        read_sdss_spectrum(text)
    from astropy.io import fits

    other = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4)))]).writeto(other)
    with pytest.raises(SpectrumFileError, match="no COADD"):
        read_sdss_spectrum(other)
    with pytest.raises(FileNotFoundError):
        read_sdss_spectrum(tmp_path / "missing.fits")
