"""Shared fixtures: the real BC03+MILES grid is loaded once per session.

Under pytest-xdist (``-n 2``, as README's test command and .ci/run run the
suite) each worker is its own session. The workers split the machine's cores
between them (torch threads, and OMP_NUM_THREADS for the notebooks' kernels), and
the trained ``small_posterior`` is shared between them through a file lock, so it
is trained once per run.
"""

import os

import pytest
import torch
from filelock import FileLock

from sedppl.sps.grid import load_bc03_miles


#: The slowest test files, slowest first (pytest --durations, two workers, 2026-11-29): with
#: ``--no-loadscope-reorder`` the workers take files in this order, so the long ones start first
#: and the two workers finish together; the rest follow in collection order.
SLOWEST_FILES = ["infer/test_hmc.py", "infer/test_vae.py", "test_cli.py", "infer/test_smc.py",
                 "infer/test_npe.py", "test_fitting.py", "test_tutorials.py"]


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)

    def rank(item):
        path = os.path.relpath(str(item.path), here).replace(os.sep, "/")
        return SLOWEST_FILES.index(path) if path in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: each file keeps its tests' order


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


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
    """An amortized posterior of ``small_model``, trained here in about two minutes (12,000 simulations;
    the cosine learning-rate schedule of the shipped posteriors, which ends at a lower loss than the
    plateau schedule in the same 40 epochs and does not leave a half-converged flow)."""
    from sedppl.infer.npe import NeuralPosterior

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's directory, shared by its workers
    out = root / "small_posterior" / "delayed_tau"
    with FileLock(str(root / "small_posterior.lock")):
        if out.with_suffix(".safetensors").exists():
            return NeuralPosterior.load(out, small_model)
        return _train_small_posterior(small_model, out)


def _train_small_posterior(small_model, out):
    from sedppl.infer.conditions import ObservingConditions
    from sedppl.infer.npe_training import train_npe

    cond = ObservingConditions(snr_photometry=(10.0, 100.0), photometry_floor=small_model.photometry_floor)
    return train_npe(small_model, out, n_sims=12_000, n_valid=1_000, model_name="DelayedTau", conditions=cond,
                     seed=3, batch_size=64, lr=1e-3, max_epochs=40, patience=8, context=32, transforms=3,
                     hidden=(64, 64), progress=False, schedule="cosine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


#: Relative tolerance of float32 vs float64 agreement in the physics tests.
RTOL = {torch.float32: 2e-4, torch.float64: 1e-10}
