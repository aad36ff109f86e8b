"""InferenceData built directly in xarray against arviz's own builder."""

import arviz as az
import numpy as np
import pytest

from sedppl.infer import inference_data as inference_data_module
from sedppl.infer.inference_data import inference_data


@pytest.mark.parametrize("direct", [True, False], ids=["construct_direct", "public_constructor"])
def test_inference_data_matches_arviz_from_dict(direct, monkeypatch):
    """The InferenceData builder of NeuralPosterior.sample gives what az.from_dict gives: the same
    groups, variables, dimensions, coordinates (given and default integer ranges) and values, both
    through xarray's direct constructor and through the public one (an xarray without the former)."""
    if not direct:
        monkeypatch.setattr(inference_data_module, "_direct_constructor", lambda: None)
    rng = np.random.default_rng(0)
    groups = {"posterior": {"a": rng.normal(size=(1, 7, 3)), "b": rng.normal(size=(1, 7, 3, 4))},
              "sample_stats": {"log_q": rng.normal(size=(1, 7, 3))}}
    dims = {"a": ["galaxy"], "b": ["galaxy", "b_dim_0"], "log_q": ["galaxy"]}
    coords = {"galaxy": ["g1", "g2", "g3"]}
    ours, ref = inference_data(groups, dims, coords), az.from_dict(**groups, dims=dims, coords=coords)
    assert set(ours.groups()) == set(ref.groups())
    for g in ref.groups():
        assert ours[g].identical(ref[g].assign_attrs(ours[g].attrs)), g
        assert set(ours[g].attrs) == set(ref[g].attrs)


def test_misnamed_dimensions_are_an_error():
    """A variable with more dimensions than named says which variable."""
    with pytest.raises(ValueError, match="posterior.a"):
        inference_data({"posterior": {"a": np.zeros((1, 5, 2, 3))}}, {"a": ["galaxy"]}, {})


def test_inconsistent_lengths_are_an_error():
    """What xarray's merge would catch is caught without it: a dimension with two lengths across
    variables, and a coordinate with the wrong number of labels, each named."""
    with pytest.raises(ValueError, match="dimension 'galaxy' has length 2, 3"):
        inference_data({"posterior": {"a": np.zeros((1, 5, 3)), "b": np.zeros((1, 5, 2))}},
                       {"a": ["galaxy"], "b": ["galaxy"]}, {})
    with pytest.raises(ValueError, match="2 labels for dimension 'galaxy' of length 3"):
        inference_data({"posterior": {"a": np.zeros((1, 5, 3))}}, {"a": ["galaxy"]}, {"galaxy": ["x", "y"]})


@pytest.mark.parametrize("direct", [True, False], ids=["construct_direct", "public_constructor"])
def test_results_share_no_mutable_coordinates(direct, monkeypatch):
    """The coordinate values are shared between results (read-only), their variables are not: attributes
    set on one result's coordinates do not appear in the next result with the same coordinates."""
    if not direct:
        monkeypatch.setattr(inference_data_module, "_direct_constructor", lambda: None)
    groups, dims, coords = {"posterior": {"a": np.zeros((1, 5, 2))}}, {"a": ["galaxy"]}, {"galaxy": ["x", "y"]}
    first = inference_data(groups, dims, coords)
    for d in ("chain", "draw", "galaxy"):
        first.posterior[d].attrs["note"] = "changed"
    again = inference_data(groups, dims, coords)
    assert all(again.posterior[d].attrs == {} for d in ("chain", "draw", "galaxy"))
    assert list(again.posterior["galaxy"].values) == ["x", "y"]
    with pytest.raises(ValueError, match="read-only"):
        again.posterior["draw"].values[0] = 7
