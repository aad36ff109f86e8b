"""Derived quantities without the light (sedppl.derived): equal to the full model's, and a safe fallback."""

import pyro
import torch
from pyro import poutine

from sedppl.derived import derived_only, is_derived_only, trace_quantities
from sedppl.noise import site_mean
from sedppl.zoo import SpecPhotModel


def test_specphot_derived_only_equals_full_model():
    model = SpecPhotModel()
    pyro.set_rng_seed(3)
    z = torch.tensor([0.01, 0.3, 0.7, 1.05])
    full = poutine.trace(model).get_trace(n_galaxies=4, redshift=z)
    latent = {k: v["value"] for k, v in full.nodes.items()
              if v["type"] == "sample" and not v["is_observed"] and not v["infer"].get("_deterministic", False)}
    with derived_only():
        assert is_derived_only()
        light_free = poutine.trace(poutine.condition(model, data=latent)).get_trace(n_galaxies=4, redshift=z)
    assert not is_derived_only()
    # no light was simulated: no data sites
    assert "spectrum" not in light_free.nodes and "photometry" not in light_free.nodes
    want, got = trace_quantities(full), trace_quantities(light_free)
    assert set(got) == set(want)
    for name, value in want.items():
        # same float32 arithmetic on the same inputs: equal to rounding
        assert torch.allclose(got[name], value, rtol=1e-6, atol=1e-30), name
    # with predictive: the same plus the noise-free data, which differ from the noisy simulated data
    pred = trace_quantities(full, predictive=True)
    assert set(pred) == set(want) | {"spectrum", "photometry"}
    for name in ("spectrum", "photometry"):
        assert torch.equal(pred[name], site_mean(full.nodes[name]))
        assert not torch.equal(pred[name], full.nodes[name]["value"])


def test_posterior_derived_fast_path_and_fallback(small_posterior, small_model):
    from sedppl.mocks import make_mocks

    mock = make_mocks(small_model, 3, seed=2, redshift=0.1, snr_photometry=30)
    x = small_posterior.inputs(mock.obs, warn=False)
    idata = small_posterior.sample(mock.obs, num_samples=50, seed=0, derived=False)
    values = {k: torch.as_tensor(idata.posterior[k].values[0]) for k in ("log_mass", "av")}
    post, saved = small_posterior, small_posterior.model
    try:
        # with band ivar given, the user's model never touches its light: the fast path runs
        post.model, post._derived_only_works = (lambda **kw: saved(band_ivar=torch.ones(5), **kw)), True
        fast = post.derived(values, x["redshift"])
        assert post._derived_only_works is True
        full = post._run_model(values, x["redshift"], 20_000, False)
        assert set(fast) == set(full) == {"log_stellar_mass"}
        assert torch.allclose(fast["log_stellar_mass"], full["log_stellar_mass"], rtol=1e-6)
        # as written, the model derives its default ivar from the simulated photometry, which does not
        # exist without the light: the evaluation falls back to the full model, with the same result
        post.model, post._derived_only_works = saved, True
        got = post.derived(values, x["redshift"])
        assert post._derived_only_works is False
        assert torch.allclose(got["log_stellar_mass"], full["log_stellar_mass"], rtol=1e-6)
    finally:
        post.model, post._derived_only_works = saved, True


def test_predictive_for_a_subset_of_draws(small_posterior, small_model):
    from sedppl.mocks import make_mocks

    mock = make_mocks(small_model, 2, seed=4, redshift=0.1, snr_photometry=30)
    idata = small_posterior.sample(mock.obs, num_samples=200, seed=1, predictive=20)
    assert idata.posterior["log_stellar_mass"].shape == (1, 200, 2)
    assert idata.posterior_predictive["photometry"].shape == (1, 20, 2, 5)
    # the predictive draws belong to the first 20 posterior draws: same draws, same model fluxes
    again = small_posterior.sample(mock.obs, num_samples=200, seed=1, predictive=True)
    assert torch.allclose(torch.as_tensor(again.posterior_predictive["photometry"].values[0, :20]),
                          torch.as_tensor(idata.posterior_predictive["photometry"].values[0]), rtol=1e-5)
