"""Ensembles of amortized posteriors: the mixture's draws, densities, files and training."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from sedppl.infer.ensemble import PosteriorEnsemble, load_posterior, train_npe_ensemble
from sedppl.infer.npe import NeuralPosterior
from sedppl.infer.npe_calibration import calibrate
from sedppl.mocks import make_mocks


def _shifted(post: NeuralPosterior, delta: float) -> NeuralPosterior:
    """A copy of ``post`` whose conditional affine layer shifts every coordinate by ``delta``."""
    other = copy.deepcopy(post)
    with torch.no_grad():
        d = other.space.dim
        other.flow.transform.transforms[0].net[-1].bias[:d] += delta
    return other


def test_identical_members_give_the_member(small_posterior, small_model):
    """A mixture of two copies of one posterior is that posterior: the same log density at any point
    (1e-5) and log q of its draws equal to the member's log_prob there (1e-3: the float32 draws are
    mapped back to the unconstrained coordinates, as in test_npe's API test)."""
    ens = PosteriorEnsemble([small_posterior, copy.deepcopy(small_posterior)])
    mock = make_mocks(small_model, 3, seed=21, redshift=0.1, snr_photometry=30)
    idata = ens.sample(mock.obs, num_samples=300, seed=0, derived=False)
    draws = {k: torch.as_tensor(idata.posterior[k].values[0]) for k in ("log_mass", "av")}
    for j in range(3):
        one = {k: v[:, j] for k, v in draws.items()}
        obs = _one(mock.obs, j, 300)
        assert torch.allclose(ens.log_prob(one, obs), small_posterior.log_prob(one, obs), atol=1e-5)
        assert torch.allclose(ens.log_prob(one, obs), torch.as_tensor(idata.sample_stats["log_q"].values[0, :, j]),
                              atol=1e-3)  # float32 draws mapped back to the unconstrained space


def _one(obs, j, n):
    """Galaxy j of a photometric batch, repeated n times."""
    from sedppl.data import Observation

    return Observation(redshift=obs.redshift[j:j + 1].expand(n), bands=obs.bands,
                       band_flux=obs.band_flux[j:j + 1].expand(n, -1), band_ivar=obs.band_ivar[j:j + 1].expand(n, -1))


def test_mixture_of_different_members(small_posterior, small_model):
    """Members that differ (one shifted by 0.5 in the flow's standardised coordinates): the ensemble's
    log density is log((q1 + q2) / 2) of the members' (1e-4); each member gives exactly half the draws'
    expectation, so the mixture's mean log mass equals the mean of the members' means within 4 Monte Carlo
    standard errors (6,000 draws each); the mixture is wider than either member."""
    a, b = small_posterior, _shifted(small_posterior, 0.5)
    ens = PosteriorEnsemble([a, b])
    assert ens.counts(7) == [4, 3]
    mock = make_mocks(small_model, 1, seed=22, redshift=0.1, snr_photometry=30)
    n = 6000
    lm = {name: p.sample(mock.obs, num_samples=n, seed=1, derived=False).posterior["log_mass"].values.ravel()
          for name, p in (("a", a), ("b", b), ("ens", ens))}
    assert abs(lm["a"].mean() - lm["b"].mean()) > 10 * lm["a"].std() / math.sqrt(n)  # the members differ
    expected = (lm["a"].mean() + lm["b"].mean()) / 2
    se = math.sqrt((lm["a"].var() + lm["b"].var()) / 2 / n + lm["ens"].var() / n)
    assert abs(lm["ens"].mean() - expected) < 4 * se
    assert lm["ens"].std() > max(lm["a"].std(), lm["b"].std())
    values = {"log_mass": torch.as_tensor(lm["ens"][:200]), "av": torch.full((200,), 0.3)}
    obs = _one(mock.obs, 0, 200)
    mix = torch.logaddexp(a.log_prob(values, obs), b.log_prob(values, obs)) - math.log(2)
    assert torch.allclose(ens.log_prob(values, obs), mix, atol=1e-4)


def test_files_and_errors(small_posterior, tmp_path):
    """An ensemble saves as an index plus member files and loads back (the same log densities, the
    calibration kept); load_posterior tells the two kinds apart; members of different layouts, a single
    member, NeuTra coordinates from a mixture and a wrong index version are errors that say so."""
    ens = PosteriorEnsemble([small_posterior, _shifted(small_posterior, 0.2)])
    ens.calibration = {"max_coverage_error": 0.04}
    path = ens.save(tmp_path / "ens")
    assert json.loads(path.read_text())["ensemble"] == ["ens_member0", "ens_member1"]
    back = load_posterior(tmp_path / "ens", small_posterior.model)
    assert isinstance(back, PosteriorEnsemble) and back.calibration == {"max_coverage_error": 0.04}
    u = torch.randn(5, 2, small_posterior.space.dim)
    mock = make_mocks(small_posterior.model, 2, seed=23, redshift=0.1, snr_photometry=30)
    x = ens.inputs(mock.obs)
    assert torch.allclose(back.log_prob_unconstrained(u, x), ens.log_prob_unconstrained(u, x), atol=1e-5)
    small_posterior.save(tmp_path / "single")
    assert type(load_posterior(tmp_path / "single", small_posterior.model)) is NeuralPosterior
    with pytest.raises(ValueError, match="at least 2"):
        PosteriorEnsemble([small_posterior])
    other = copy.deepcopy(small_posterior)
    other.card = copy.deepcopy(small_posterior.card)
    other.card.bands = ["sdss_u"]
    with pytest.raises(ValueError, match="member 1 differs from member 0 in bands"):
        PosteriorEnsemble([small_posterior, other])
    from sedppl.infer.neutra import FlowCoordinates

    with pytest.raises(ValueError, match="ensemble is a mixture"):
        FlowCoordinates(ens, mock.obs)
    index = json.loads(path.read_text())
    path.write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_posterior(tmp_path / "ens", small_posterior.model)


def test_calibration_of_an_ensemble(small_posterior):
    """calibrate takes an ensemble; two copies of the CI posterior pass the single posterior's own
    calibration test (coverage within 0.1 of nominal on 400 held-out simulations)."""
    cal = calibrate(PosteriorEnsemble([small_posterior, copy.deepcopy(small_posterior)]), n_sims=400,
                    n_draws=200, seed=11)
    assert cal["max_coverage_error"] < 0.1, cal


def test_train_an_ensemble_and_resume(small_model, tmp_path):
    """train_npe_ensemble trains members with their own seeds (different weights), saves the index, and a
    second call resumes from the finished members without changing them."""
    kw = dict(n_sims=1_200, n_valid=200, seed=5, batch_size=128, max_epochs=2, patience=2, context=8,
              transforms=2, hidden=(16, 16), progress=False)
    ens = train_npe_ensemble(small_model, tmp_path / "e", members=2, **kw)
    w = [dict(m.state_dict()) for m in ens.members]
    assert not torch.equal(w[0]["flow.transform.transforms.1.hyper.0.weight"],
                           w[1]["flow.transform.transforms.1.hyper.0.weight"])
    assert isinstance(load_posterior(tmp_path / "e", small_model), PosteriorEnsemble)
    again = train_npe_ensemble(small_model, tmp_path / "e", members=2, **kw)
    for m, before in zip(again.members, w):
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="at least 2"):
        train_npe_ensemble(small_model, tmp_path / "f", members=1, **kw)
    np.testing.assert_equal(len(ens.members), 2)
