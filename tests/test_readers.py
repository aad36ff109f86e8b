"""Readers on real SDSS DR18 spectra shipped with ppxf, and on broken files."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest


from sedppl.readers import SpectrumFileError, read_desi_coadd, read_sdss_spectrum
from sedppl.zoo import DESI_WAVE

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


specutils = importlib.util.find_spec("specutils")
DESI = Path(specutils.origin).parent / "io/default_loaders/tests/desi_test_data" if specutils else None
needs_desi = pytest.mark.skipif(specutils is None, reason="specutils (test extra) ships DESI coadds")


@needs_desi
@pytest.mark.parametrize("fname, n, photsys", [("coadd-sv3-dark-26065.fits", 2, "S"),
                                               ("coadd-5-169-thru20210419.fits", 1, "N")])
def test_desi_coadd(fname, n, photsys):
    with pytest.warns(UserWarning, match="skipped"):  # these test files keep empty fibres
        spec = read_desi_coadd(DESI / fname)
    obs = spec.obs
    # the three arms merged on DESI's 0.8 A lattice: 3600-9824 A, the zoo's default grid
    np.testing.assert_allclose(obs.wave.numpy(), DESI_WAVE, atol=1e-6)
    assert obs.flux.shape == (n, len(DESI_WAVE)) and obs.resolution.shape == (n, 11, len(DESI_WAVE))
    assert obs.redshift is None  # coadd files carry no redshift
    # each resolution kernel (a column of the DIA data) is normalised: median sum within 1%
    # of 1 (individual pixels scatter by a few %); FWHM 1.3-2.2 A (R ~ 2000-5500)
    sums = obs.resolution.sum(1)[obs.ivar > 0]
    assert abs(float(sums.median()) - 1) < 0.01
    assert 1.3 < np.median(spec.fwhm) < 2.2
    assert set(spec.meta["photsys"]) == {photsys}
    assert obs.bands[0] == ("decam_g" if photsys == "S" else "bass_g")
    # a spectrum in the overlap of B and R (5700-5900 A) equals the ivar-weighted mean of the arms
    from astropy.io import fits

    with fits.open(DESI / fname) as h:
        row = list(h["FIBERMAP"].data["TARGETID"]).index(spec.meta["targetid"][0])
        wb, wr = h["B_WAVELENGTH"].data, h["R_WAVELENGTH"].data
        k = np.argmin(np.abs(wb - 5790.0))
        j = np.argmin(np.abs(wr - wb[k]))
        fb, ib = h["B_FLUX"].data[row, k], h["B_IVAR"].data[row, k]
        fr, ir = h["R_FLUX"].data[row, j], h["R_IVAR"].data[row, j]
    i = int(np.argmin(np.abs(obs.wave.numpy() - wb[k])))
    np.testing.assert_allclose(float(obs.flux[0, i]), (fb * ib + fr * ir) / (ib + ir), rtol=1e-5)
    np.testing.assert_allclose(float(obs.ivar[0, i]), ib + ir, rtol=1e-5)


@needs_desi
def test_desi_targets_and_errors(tmp_path):
    spec = read_desi_coadd(DESI / "coadd-sv3-dark-26065.fits", targets=[39627866878514741])
    assert spec.meta["targetid"] == [39627866878514741] and spec.obs.flux.shape[0] == 1
    with pytest.raises(SpectrumFileError, match="not in the file"):
        read_desi_coadd(DESI / "coadd-sv3-dark-26065.fits", targets=[123])
    with pytest.raises(SpectrumFileError, match="no unmasked pixel"):
        read_desi_coadd(DESI / "coadd-sv3-dark-26065.fits", targets=[-2713437])
    with pytest.raises(SpectrumFileError, match="not a DESI coadd"):
        read_desi_coadd(SPECTRA / "NGC3522_SDSS_DR18.fits")
    trunc = tmp_path / "cut.fits"
    trunc.write_bytes((DESI / "coadd-sv3-dark-26065.fits").read_bytes()[:500_000])
    with pytest.raises(SpectrumFileError, match="cut.fits"):
        read_desi_coadd(trunc)


def test_user_ebv_dereddens_a_spectrum_file(tmp_path):
    """``read_input(..., ebv=E)`` multiplies the spectrum by 10^(0.4 R_V E A(lambda)/A_V) and its ivar
    by the inverse square (S/N unchanged); one value per galaxy or one for all; bad values are named."""
    import torch

    from sedppl.extinction import extinction_curve
    from sedppl.inputs import read_input
    from sedppl.zoo import SpecPhotModel

    model = SpecPhotModel()
    path = SPECTRA / "NGC3073_SDSS_DR18.fits"
    raw, _ = read_input(path, model, out=tmp_path)
    obs, _ = read_input([path], model, out=tmp_path, ebv=[0.05])
    boost = 10 ** (0.4 * 3.1 * 0.05 * extinction_curve(raw.wave))
    ok = raw.ivar[0] > 0
    torch.testing.assert_close(obs.flux[0][ok].double(), (raw.flux[0] * boost)[ok].double(), rtol=1e-5, atol=0)
    torch.testing.assert_close((obs.flux**2 * obs.ivar)[0][ok], (raw.flux**2 * raw.ivar)[0][ok], rtol=1e-4, atol=0)
    # at 4000 A the boost is 10^(0.4 x 0.05 x 4.4) ~ 1.22 (A(4000)/E(B-V) ~ 4.4 for R_V = 3.1)
    assert 1.19 < float(boost[torch.argmin((raw.wave - 4000).abs())]) < 1.25
    with pytest.raises(ValueError, match="2 values of E\\(B-V\\) for 1 galaxies"):
        read_input(path, model, out=tmp_path, ebv=[0.05, 0.02])
    with pytest.raises(ValueError, match="finite and >= 0"):
        read_input(path, model, out=tmp_path, ebv=-0.01)
    with pytest.raises(ValueError, match="not both"):
        read_input(path, model, catalog={"ebv_column": "EBV"}, ebv=0.01)
