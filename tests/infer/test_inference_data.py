"""InferenceData built directly in xarray against arviz's own builder."""

import arviz as az
import numpy as np
import pytest

from sedppl.infer.inference_data import inference_data


def test_inference_data_matches_arviz_from_dict():
    """The InferenceData builder of NeuralPosterior.sample gives what az.from_dict gives: the same
    groups, variables, dimensions, coordinates (given and default integer ranges) and values."""
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
