"""Shared fixtures: the real BC03+MILES grid is loaded once per session."""

import pytest
import torch

from sedppl.sps.grid import load_bc03_miles


@pytest.fixture(scope="session")
def grid():
    return load_bc03_miles()


@pytest.fixture(scope="session")
def small_model(grid):
    """A user-written delayed-tau photometry model (tests/models.py)."""
    from tests.models import DelayedTau

    return DelayedTau(grid)


@pytest.fixture(scope="session")
def small_posterior(small_model, tmp_path_factory):
    """An amortized posterior of ``small_model``, trained here in about two minutes (12,000 simulations)."""
    from sedppl.infer.conditions import ObservingConditions
    from sedppl.infer.npe_training import train_npe

    out = tmp_path_factory.mktemp("npe") / "delayed_tau"
    cond = ObservingConditions(snr_photometry=(10.0, 100.0), photometry_floor=small_model.photometry_floor)
    return train_npe(small_model, out, n_sims=12_000, n_valid=1_000, model_name="DelayedTau", conditions=cond,
                     seed=3, batch_size=64, lr=1e-3, max_epochs=40, patience=8, context=32, transforms=3,
                     hidden=(64, 64), progress=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


#: Relative tolerance of float32 vs float64 agreement in the physics tests.
RTOL = {torch.float32: 2e-4, torch.float64: 1e-10}
