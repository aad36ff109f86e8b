"""Every tutorial notebook runs top to bottom in smoke mode (tiny settings, every cell executed)."""

import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
sys.path.insert(0, str(TUTORIALS))
from run import NOTEBOOKS, execute  # noqa: E402


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in TUTORIALS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name):
    nb = execute(name, smoke=True, timeout=900)
    # every code cell ran (an error would have raised), and produced its outputs
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
