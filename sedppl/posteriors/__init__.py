"""Trained amortized posteriors shipped with sedppl (weights as safetensors + JSON cards).

============  ====================  ==========================================================
key           model                 data
============  ====================  ==========================================================
``phot``      ``PhotometryModel``   SDSS ugriz (nanomaggies), redshift given, 0.01 <= z <= 0.2
``specphot``  ``SpecPhotModel``     DESI spectrum (3600-9824 A, 0.8 A, binned by 8) with or
                                    without DECam g, r, z + WISE W1, W2 (nanomaggies),
                                    redshift given, 0.002 <= z <= 1.1
============  ====================  ==========================================================

Each card records the training budget and time and the calibration figures on
1,000 held-out simulations; ``tests/infer/test_shipped.py`` checks that they
are reproduced.
"""

from __future__ import annotations

from pathlib import Path

#: key -> (zoo model class name, file stem)
SHIPPED = {"phot": ("PhotometryModel", "phot_sdss_ugriz"), "specphot": ("SpecPhotModel", "specphot_desi")}


def shipped_path(key: str) -> Path:
    """Path of the shipped posterior ``key`` (``.safetensors``; its card beside it as ``.json``)."""
    if key not in SHIPPED:
        raise ValueError(f"no shipped posterior {key!r}; shipped: {sorted(SHIPPED)} (train others with "
                         "`sedppl train posterior --model ...`)")
    return Path(__file__).with_name(SHIPPED[key][1] + ".safetensors")


def load_shipped(key: str, model=None):
    """Load a shipped posterior with its zoo model (built with default arguments unless given)."""
    from .. import zoo
    from ..infer.npe import NeuralPosterior

    path = shipped_path(key)
    if model is None:
        model = getattr(zoo, SHIPPED[key][0])()
    return NeuralPosterior.load(path, model)
