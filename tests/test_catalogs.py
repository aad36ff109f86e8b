"""Photometry catalogs: units, missing values, formats, errors."""

import numpy as np
import pytest
from astropy.table import Table

from sedppl.catalogs import CatalogError, read_photometry_catalog

BANDS = ["sdss_g", "sdss_r"]


def write(tmp_path, suffix, **cols):
    path = tmp_path / f"cat{suffix}"
    Table(cols).write(path, overwrite=True)
    return path


@pytest.mark.parametrize("suffix", [".fits", ".ecsv", ".csv"])
def test_magnitudes_to_nanomaggies(tmp_path, suffix):
    path = write(tmp_path, suffix, id=["a", "b", "c"], g=[22.5, 20.0, 99.0], g_err=[0.1, 0.05, 9.0],
                 r=[17.5, np.nan, 18.0], r_err=[0.01, 0.1, 0.02], z=[0.1, 0.05, 0.2])
    obs = read_photometry_catalog(path, BANDS, ["g", "r"], ["g_err", "r_err"], unit="ab_mag",
                                  redshift_column="z", id_column="id")
    f, iv = obs.band_flux.numpy(), obs.band_ivar.numpy()
    # m = 22.5 is 1 nmgy; 20 is 10 nmgy; 17.5 is 100 nmgy
    np.testing.assert_allclose(f[0], [1.0, 100.0], rtol=1e-5)
    np.testing.assert_allclose(f[1, 0], 10.0, rtol=1e-5)
    # sigma_f = f ln(10) / 2.5 sigma_m
    np.testing.assert_allclose(1 / np.sqrt(iv[0]), [np.log(10) / 2.5 * 0.1, 100 * np.log(10) / 2.5 * 0.01], rtol=1e-5)
    # 99 sentinel and NaN are missing: ivar 0
    assert iv[2, 0] == 0 and iv[1, 1] == 0 and iv[2, 1] > 0
    np.testing.assert_allclose(obs.redshift.numpy(), [0.1, 0.05, 0.2], rtol=1e-6)
    assert obs.name == ["a", "b", "c"]


def test_fluxes_in_microjansky(tmp_path):
    path = write(tmp_path, ".fits", g=[3.631, 36.31], ge=[0.3631, -1.0], r=[7.262, 1.0], re=[0.3631, 0.1])
    obs = read_photometry_catalog(path, BANDS, ["g", "r"], ["ge", "re"], unit="microjansky")
    np.testing.assert_allclose(obs.band_flux.numpy()[0], [1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(obs.band_ivar.numpy()[0], [100.0, 100.0], rtol=1e-5)
    assert obs.band_ivar[1, 0] == 0  # a negative error means missing
    assert obs.redshift is None


def test_catalog_errors(tmp_path):
    path = write(tmp_path, ".fits", g=[20.0], ge=[0.1], r=[19.0], re=[0.1], z=[-1.0])
    with pytest.raises(CatalogError, match="no column 'x'"):
        read_photometry_catalog(path, BANDS, ["g", "x"], ["ge", "re"], unit="ab_mag")
    with pytest.raises(CatalogError, match="unknown filter 'sdss_q'"):
        read_photometry_catalog(path, ["sdss_g", "sdss_q"], ["g", "r"], ["ge", "re"])
    with pytest.raises(CatalogError, match="unit"):
        read_photometry_catalog(path, BANDS, ["g", "r"], ["ge", "re"], unit="mag")
    with pytest.raises(CatalogError, match="negative"):
        read_photometry_catalog(path, BANDS, ["g", "r"], ["ge", "re"], unit="ab_mag", redshift_column="z")
    with pytest.raises(CatalogError, match="2 bands, 1 flux"):
        read_photometry_catalog(path, BANDS, ["g"], ["ge", "re"])
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"not a table at all" * 50)
    with pytest.raises(CatalogError, match="not a readable table"):
        read_photometry_catalog(bad, BANDS, ["g", "r"], ["ge", "re"])


def test_ebv_column_corrects_for_milky_way_extinction(tmp_path):
    """A catalog's E(B-V) column dereddens each row: A_band / E(B-V) at the bands' response-weighted
    mean wavelengths against Schlegel, Finkbeiner & Davis (1998, Table 6: u 5.155, g 3.793, r 2.751,
    i 2.086, z 1.479 for R_V = 3.1): within 3% in g, r, i, z and 8% in u (SFD weight by an
    elliptical's spectrum, which moves the u effective wavelength most)."""
    bands = ["sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"]
    cols = {b: [20.0, 20.0, 21.0] for b in "ugriz"} | {b + "e": [0.1, 0.1, 0.2] for b in "ugriz"}
    path = write(tmp_path, ".ecsv", **cols, ebv=[0.0, 0.1, 0.02])
    args = (path, bands, list("ugriz"), [b + "e" for b in "ugriz"])
    raw = read_photometry_catalog(*args, unit="ab_mag")
    obs = read_photometry_catalog(*args, unit="ab_mag", ebv_column="ebv")
    np.testing.assert_array_equal(obs.band_flux[0].numpy(), raw.band_flux[0].numpy())  # E(B-V) = 0
    coeff = 2.5 * np.log10(obs.band_flux[1].numpy() / raw.band_flux[1].numpy()) / 0.1
    sfd = np.array([5.155, 3.793, 2.751, 2.086, 1.479])
    assert abs(coeff[0] / sfd[0] - 1) < 0.08
    np.testing.assert_allclose(coeff[1:], sfd[1:], rtol=0.03)
    # the correction is linear in E(B-V) in magnitudes, and leaves S/N unchanged
    np.testing.assert_allclose(2.5 * np.log10(obs.band_flux[2].numpy() / raw.band_flux[2].numpy()) / 0.02,
                               coeff, rtol=1e-4)
    np.testing.assert_allclose((obs.band_flux**2 * obs.band_ivar).numpy(), (raw.band_flux**2 * raw.band_ivar).numpy(),
                               rtol=1e-4)
    bad = write(tmp_path, ".fits", **cols, ebv=[0.0, -0.1, np.nan])
    with pytest.raises(CatalogError, match=r"E\(B-V\) column 'ebv' has missing or negative values \(rows \[1, 2\]\)"):
        read_photometry_catalog(bad, *args[1:], unit="ab_mag", ebv_column="ebv")
    with pytest.raises(CatalogError, match="no column 'EBV'"):
        read_photometry_catalog(*args, unit="ab_mag", ebv_column="EBV")
