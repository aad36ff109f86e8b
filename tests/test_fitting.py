"""Catalog fits with an amortized posterior: outputs, chi2, and a crashed run that resumes to the same table."""

import numpy as np
import pytest
from astropy.table import Table

from sedppl.fitting import fit_catalog
from sedppl.mocks import make_mocks


@pytest.fixture(scope="module")
def mocks(small_model):
    return make_mocks(small_model, 30, seed=21, redshift=0.12, snr_photometry=30)


def test_fit_catalog_outputs(small_posterior, mocks, tmp_path):
    table = fit_catalog(mocks.obs, small_posterior, tmp_path, chunk=10, num_samples=300, progress=False)
    assert len(table) == 30 and (tmp_path / "summary.fits").exists() and (tmp_path / "chunks/posterior_00002.nc").exists()
    for col in ("log_mass_p16", "log_mass_p50", "log_mass_p84", "av_p50", "log_stellar_mass_p50", "chi2_dof", "ood"):
        assert col in table.colnames, col
    # the truth lies inside the 16-84% interval for about 68% of the galaxies (30 galaxies: 3 sd = 0.26)
    inside = (table["log_mass_p16"] <= mocks.truth["log_mass"].numpy()) & (mocks.truth["log_mass"].numpy() <= table["log_mass_p84"])
    assert abs(inside.mean() - 0.68) < 0.26
    # data drawn from the model itself: chi2/dof near 1 (5 bands, median over 30 galaxies within 0.4-2)
    assert 0.4 < np.median(table["chi2_dof"]) < 2.0
    assert not table["ood"].any() and not table["poor_fit"].any()


def test_killed_run_resumes_to_the_same_table(small_posterior, mocks, tmp_path, monkeypatch):
    full = fit_catalog(mocks.obs, small_posterior, tmp_path / "full", chunk=10, num_samples=200, progress=False)
    calls = {"n": 0}
    original = type(small_posterior).sample

    def crash_on_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    monkeypatch.setattr(type(small_posterior), "sample", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        fit_catalog(mocks.obs, small_posterior, tmp_path / "killed", chunk=10, num_samples=200, progress=False)
    assert sorted(p.name for p in (tmp_path / "killed/chunks").glob("summary_*.ecsv")) == \
        ["summary_00000.ecsv", "summary_00001.ecsv"]  # only complete chunks, no temporary files left
    assert not list((tmp_path / "killed/chunks").glob("*.tmp"))
    monkeypatch.setattr(type(small_posterior), "sample", original)
    resumed = fit_catalog(mocks.obs, small_posterior, tmp_path / "killed", chunk=10, num_samples=200, progress=False)
    again = Table.read(tmp_path / "killed/summary.ecsv")
    for col in full.colnames:
        assert np.array_equal(np.asarray(full[col]), np.asarray(resumed[col])), col
        assert np.array_equal(np.asarray(full[col]), np.asarray(again[col])), col


def test_fit_nuts_outputs_and_resume(small_model, mocks, tmp_path):
    """NUTS over a catalog, one galaxy at a time: summary columns with convergence flags, the
    truth inside the 99.7% range, and a rerun that finds every galaxy done returns the same table."""
    from sedppl.fitting import fit_nuts, subset

    obs = subset(mocks.obs, slice(0, 2))
    kw = dict(num_samples=60, warmup_steps=60, num_chains=2, progress=False, map_restarts=2, map_steps=50)
    table = fit_nuts(obs, small_model, tmp_path, **kw)
    assert len(table) == 2 and (tmp_path / "chunks/nuts_00001.nc").exists()
    for col in ("log_mass_p50", "log_stellar_mass_p50", "chi2_dof", "rhat_max", "ess_bulk_min", "divergences"):
        assert col in table.colnames, col
    width = table["log_mass_p84"] - table["log_mass_p16"]
    assert np.all(np.abs(table["log_mass_p50"] - mocks.truth["log_mass"].numpy()[:2]) < 3 * width)
    assert np.all((table["chi2_dof"] > 0.01) & (table["chi2_dof"] < 5))  # 0 would mean the data compared with itself
    again = fit_nuts(obs, small_model, tmp_path, **kw)
    for col in table.colnames:
        assert np.array_equal(np.asarray(table[col]), np.asarray(again[col])), col


def test_fit_hmc_chunks_resume_and_match_one_batch(small_model, mocks, tmp_path):
    """Batched HMC over 6 galaxies in chunks of 4 (two batched runs), then again with one chunk
    killed: the resumed run returns the finished chunk's rows unchanged. Each galaxy's truth lies
    inside its 99.7% range, chi2/dof of the posterior-predictive model is 0.01-5 (0 would mean the
    data compared with itself), and the convergence flags are per galaxy (6 rows, finite R-hat)."""
    from sedppl.fitting import fit_hmc, subset

    obs = subset(mocks.obs, slice(0, 6))
    kw = dict(num_samples=80, warmup_steps=80, num_chains=2, chunk=4, progress=False, map_restarts=2,
              map_steps=50, predictive=20, max_steps=10)
    table = fit_hmc(obs, small_model, tmp_path, **kw)
    assert len(table) == 6
    assert sorted(p.name for p in (tmp_path / "chunks").glob("*.nc")) == ["hmc_00000.nc", "hmc_00004.nc"]
    assert not list((tmp_path / "chunks").glob("*.ckpt"))  # sampler states removed once written out
    for col in ("log_mass_p50", "log_stellar_mass_p50", "chi2_dof", "rhat_max", "ess_bulk_min", "divergences"):
        assert col in table.colnames, col
    assert np.all(np.isfinite(table["rhat_max"]))
    width = table["log_mass_p84"] - table["log_mass_p16"]
    assert np.all(np.abs(table["log_mass_p50"] - mocks.truth["log_mass"].numpy()[:6]) < 3 * width)
    assert np.all((table["chi2_dof"] > 0.01) & (table["chi2_dof"] < 5))
    (tmp_path / "chunks/summary_00004.ecsv").unlink()  # as if killed during the second chunk
    again = fit_hmc(obs, small_model, tmp_path, **kw)
    for col in table.colnames:
        assert np.array_equal(np.asarray(table[col]), np.asarray(again[col])), col


def test_dask_cluster_gives_the_serial_table(tmp_path):
    """Chunks sent to a Dask LocalCluster of two worker processes (one torch thread each) come back
    to the table of the serial run: same rows in the same order, the same percentiles for each
    chunk's seed (to float32 round-off across thread counts). Shipped photometry posterior, 30 mocks."""
    pytest.importorskip("distributed")
    from sedppl.posteriors import load_shipped

    post = load_shipped("phot")
    mock = make_mocks(post.model, 30, seed=8, redshift=0.1, snr_photometry=30)
    serial = fit_catalog(mock.obs, post, tmp_path / "serial", chunk=10, num_samples=200, progress=False)
    dask = fit_catalog(mock.obs, post, tmp_path / "dask", chunk=10, num_samples=200, progress=False, workers=2)
    assert list(dask["name"]) == list(serial["name"])
    for col in ("log_mass_p16", "log_mass_p50", "log_mass_p84", "log_stellar_mass_p50", "chi2_dof"):
        np.testing.assert_allclose(np.asarray(dask[col]), np.asarray(serial[col]), rtol=1e-3, atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "dask/chunks").glob("*.nc")) == \
        [f"posterior_{i:05d}.nc" for i in range(3)]
