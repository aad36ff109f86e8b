"""Figures: the spectrum-fit panel (binning, residuals in sigma, masked stretches) and the full fit figure."""

import arviz as az
import numpy as np
import pytest

from sedppl.data import Observation

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sedppl.plotting import plot_fit, plot_spectrum_fit  # noqa: E402


def _fake_fit(n_draws=200, m=400, seed=0):
    """A spectrum, its model draws (model = truth + 1% scatter) and SFH/ZH draws in ArviZ layout."""
    rng = np.random.default_rng(seed)
    wave = np.linspace(4000.0, 8000.0, m)
    model = 10 + np.sin(wave / 200.0)
    sigma = 0.5
    flux = model + sigma * rng.standard_normal(m)
    ivar = np.full(m, 1 / sigma**2)
    ivar[100:140] = 0.0  # a masked stretch
    draws = model[None] * (1 + 0.01 * rng.standard_normal((n_draws, 1)))
    edges = np.array([0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
    post = {"sfh_sfr": rng.lognormal(0, 0.3, (1, n_draws, 1, 6)), "sfh_edges": np.broadcast_to(edges, (1, n_draws, 1, 7)),
            "zh_log_z": rng.normal(0, 0.1, (1, n_draws, 1, 6)), "log_stellar_mass": rng.normal(10, 0.1, (1, n_draws, 1)),
            "tau_ism": rng.uniform(0, 1, (1, n_draws, 1))}
    idata = az.from_dict(posterior=post, posterior_predictive={"spectrum": draws[None, :, None, :]})
    obs = Observation(wave=wave, flux=flux[None], ivar=ivar[None], redshift=[0.1])
    return idata, obs, model, flux, ivar


def test_spectrum_panel_residuals_and_mask():
    """Residuals are (binned data - binned median model) x sqrt(summed ivar): for data drawn
    around the model they have mean ~0 and sd ~1 (100 bins: within 0.3 and 0.7-1.3); the masked
    stretch is a gap in the data and is shaded."""
    idata, obs, model, flux, ivar = _fake_fit()
    fig, (ax, axr) = plt.subplots(2, 1)
    plot_spectrum_fit(ax, axr, idata, obs, 0, factor=4)
    resid = axr.lines[0].get_ydata()
    ok = np.isfinite(resid)
    assert ok.sum() == 100 - 10  # 10 bins of the 40 masked pixels are empty
    assert abs(np.mean(resid[ok])) < 0.3 and 0.7 < np.std(resid[ok]) < 1.3
    expect = (obs.flux[0].double().numpy().reshape(-1, 4).mean(-1) - np.median(idata.posterior_predictive["spectrum"].values[0, :, 0], 0)
              .reshape(-1, 4).mean(-1)) * np.sqrt(ivar.reshape(-1, 4).sum(-1))
    np.testing.assert_allclose(resid[ok], expect[ok], rtol=1e-4, atol=1e-5)  # float32 data
    shaded = [p for p in ax.patches if p.get_facecolor()[:3] == matplotlib.colors.to_rgb("0.9")]
    assert len(shaded) == 1
    plt.close(fig)


def test_fit_figure_written(tmp_path):
    """The whole figure (spectrum + residuals, SFH, ZH, corner) writes a PNG for a spectrum fit."""
    idata, obs, *_ = _fake_fit()
    path = tmp_path / "fit.png"
    plot_fit(idata, obs, None, 0, path, corner=("log_stellar_mass", "tau_ism"), title="test")
    assert path.exists() and path.stat().st_size > 20_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
