"""The on-disk cache of converted grids and tables (safe to delete at any time)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """Where sedppl caches converted grids: ``$SEDPPL_CACHE`` or ``~/.cache/sedppl``."""
    root = os.environ.get("SEDPPL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sedppl")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cached ``.npz``, or None when it is not there."""
    if not path.exists():
        return None
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` atomically: a crash never leaves a half-written cache file."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
