"""NPE training options: log-uniform redshifts, distance inputs, warm starts, the cosine schedule."""

import numpy as np
import pytest
import torch
from scipy import stats

from sedppl.infer.conditions import ObservingConditions
from sedppl.infer.encoder import DataEncoder
from sedppl.infer.npe import NeuralPosterior
from sedppl.infer.npe_training import noisy_inputs, train_npe
from sedppl.infer.parameters import ParameterSpace
from sedppl.infer.simulations import simulate_bank


def test_log_uniform_redshifts(small_model, tmp_path):
    space = ParameterSpace.from_model(small_model, redshift=0.1)
    lin = simulate_bank(small_model, space, 1500, 0, (0.05, 0.2), chunk=500, folder=tmp_path, progress=False)
    log = simulate_bank(small_model, space, 1500, 0, (0.05, 0.2), chunk=500, folder=tmp_path, progress=False,
                        log_z=True)
    z = log.redshift.numpy()
    assert z.min() >= 0.05 and z.max() <= 0.2
    # log10 z uniform over [log10 0.05, log10 0.2] (KS test at a fixed seed), z itself not
    u = (np.log(z) - np.log(0.05)) / (np.log(0.2) - np.log(0.05))
    assert stats.kstest(u, "uniform").pvalue > 0.01
    assert stats.kstest((z - 0.05) / 0.15, "uniform").pvalue < 1e-6
    # its own chunk files and seeds: not the linear bank's draws
    assert len(list(tmp_path.glob("*_logz.npz"))) == 3 and len(list(tmp_path.glob("*.npz"))) == 6
    assert not np.allclose(lin.theta[:10].numpy(), log.theta[:10].numpy())
    with pytest.raises(ValueError, match="z_range"):
        simulate_bank(small_model, space, 10, 0, (0.0, 0.2), chunk=10, progress=False, log_z=True)


def test_distance_inputs_need_a_positive_redshift_range():
    with pytest.raises(ValueError, match="positive lower end"):
        DataEncoder(0, 5, (0.0, 0.2), distance_inputs=True)
    with pytest.raises(ValueError, match="positive lower end"):
        DataEncoder(0, 5, None, distance_inputs=True)


def test_warm_start_reproduces_the_old_network(small_model, tmp_path):
    """A posterior started from another with extra (distance) inputs computes exactly what the old one
    did before training (new input columns start at zero), and the card records where it came from."""
    cond = ObservingConditions(snr_photometry=(10.0, 100.0), photometry_floor=small_model.photometry_floor)
    kw = dict(n_valid=100, conditions=cond, seed=4, batch_size=64, context=16, transforms=2, hidden=(16, 16),
              progress=False)
    old = train_npe(small_model, tmp_path / "old", n_sims=600, max_epochs=1, **kw)
    new = train_npe(small_model, tmp_path / "new", n_sims=600, max_epochs=0, n_sims_log_z=200,
                    distance_inputs=True, init_from=tmp_path / "old.safetensors", **kw)
    assert new.card.distance_inputs and new.card.n_sims_log_z == 200
    assert new.card.initialised_from.startswith("old.safetensors (sha256 " + old.card.sha256[:12])
    assert new.encoder.mix[0].weight.shape[1] == old.encoder.mix[0].weight.shape[1] + 2  # log z, luminosity
    bank = simulate_bank(small_model, old.space, 300, 9, (0.05, 0.2), chunk=300, progress=False, log_z=True)
    x = noisy_inputs(bank, cond, torch.Generator().manual_seed(0), True)
    with torch.no_grad():
        torch.testing.assert_close(new.context(x), old.context(x), rtol=0, atol=1e-6)
    # the luminosity input is standardised over the training bank
    assert 0.05 < float(new.encoder.luminosity_sd[1]) < 5.0
    # a layout that does not fit is refused
    with pytest.raises(ValueError, match="cannot start from"):
        train_npe(small_model, tmp_path / "wide", n_sims=600, max_epochs=0, init_from=tmp_path / "old.safetensors",
                  **{**kw, "context": 32})


def test_cosine_fine_tuning_runs_every_epoch_and_never_returns_a_worse_network(small_model, tmp_path):
    """A cosine stage after a warm start runs all its epochs (patience does not stop it), ends at
    lr / 1000, records itself and the two stages' total optimisation time on the card, and keeps the starting network unless an epoch beats it on
    the validation set."""
    cond = ObservingConditions(snr_photometry=(10.0, 100.0), photometry_floor=small_model.photometry_floor)
    kw = dict(n_valid=100, conditions=cond, batch_size=64, context=16, transforms=2, hidden=(16, 16),
              progress=False)
    old = train_npe(small_model, tmp_path / "old", n_sims=600, max_epochs=2, seed=4, **kw)
    new = train_npe(small_model, tmp_path / "new", n_sims=900, max_epochs=3, patience=1, seed=5,
                    init_from=tmp_path / "old.safetensors", schedule="cosine", lr=1e-3, **kw)
    assert (new.card.schedule, new.card.lr, new.card.epochs) == ("cosine", 1e-3, 3)
    assert (old.card.schedule, old.card.lr) == ("plateau", 1e-3)
    saved = torch.load(tmp_path / "new.ckpt" / "state.pt", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6, rel=1e-6)
    # the starting network's loss on the new validation set bounds the result
    assert np.isfinite(new.card.start_valid_loss) and new.card.valid_loss <= new.card.start_valid_loss
    assert np.isnan(old.card.start_valid_loss)  # no warm start
    # the optimisation time of both stages adds up on the new card
    assert old.card.total_train_seconds == old.card.train_seconds > 0
    assert new.card.total_train_seconds == pytest.approx(old.card.train_seconds + new.card.train_seconds, abs=0.11)
    same = train_npe(small_model, tmp_path / "same", n_sims=900, max_epochs=0, seed=5,
                     init_from=tmp_path / "old.safetensors", **kw)  # nothing trained: the start comes back
    assert same.card.valid_loss == same.card.start_valid_loss
    for a, b in zip(same.parameters(), old.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="schedule must be"):
        train_npe(small_model, tmp_path / "bad", n_sims=600, max_epochs=1, schedule="linear", seed=4, **kw)


def test_warm_start_from_a_refitted_base_saves_a_loadable_posterior(small_model, tmp_path):
    """The old posterior's refitted base width is not carried over: the new card (base_scale 1) describes
    the saved weights, so the file loads."""
    cond = ObservingConditions(snr_photometry=(10.0, 100.0), photometry_floor=small_model.photometry_floor)
    kw = dict(n_valid=100, conditions=cond, batch_size=64, context=16, transforms=2, hidden=(16, 16),
              progress=False, seed=4)
    old = train_npe(small_model, tmp_path / "old", n_sims=600, max_epochs=1, **kw)
    old.set_base_scale(1.3, 100)
    old.save(tmp_path / "old.safetensors")
    train_npe(small_model, tmp_path / "new", n_sims=600, max_epochs=0, init_from=tmp_path / "old.safetensors", **kw)
    new = NeuralPosterior.load(tmp_path / "new.safetensors", small_model)
    assert new.card.base_scale == 1.0 and float(new.flow.base.scale.max()) == 1.0
