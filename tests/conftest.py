"""Shared fixtures: the real BC03+MILES grid is loaded once per session."""

import pytest
import torch

from sedppl.sps.grid import load_bc03_miles


@pytest.fixture(scope="session")
def grid():
    return load_bc03_miles()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


#: Relative tolerance of float32 vs float64 agreement in the physics tests.
RTOL = {torch.float32: 2e-4, torch.float64: 1e-10}
