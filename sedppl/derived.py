"""Derived quantities of a model without simulating its light.

A model's derived quantities (surviving stellar mass, SFRs, ages, metallicities:
its ``pyro.deterministic`` sites) depend on the star-formation and metallicity
histories, not on the spectrum. Inside :func:`derived_only`, the
:class:`~sedppl.forward.ForwardModel` computes the masses only (no synthesis of
the light, no dust, redshift, instrument or photometry: ``spectrum`` and
``photometry`` of its output are None), and the observe helpers of
:mod:`sedppl.noise` emit no sample site. Evaluating derived quantities at 10^6
posterior draws then costs milliseconds instead of minutes.

A model whose own code needs the light (e.g. a deterministic site computed from
the spectrum) fails inside the context; callers fall back to a full evaluation
(:meth:`sedppl.infer.npe.NeuralPosterior.derived` does).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from torch import Tensor

_state = threading.local()

#: Names of the observe sites of sedppl models (the data, never latent parameters): the spectrum
#: (1e-17 erg/s/cm^2/A, observed frame) and the band fluxes (nanomaggies).
DATA_SITES = ("spectrum", "photometry")


@contextmanager
def derived_only() -> Iterator[None]:
    """Within this context, forward models compute masses only and observe sites are skipped."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def is_derived_only() -> bool:
    """True inside :func:`derived_only` (in this thread)."""
    return getattr(_state, "on", False)


def trace_quantities(trace, predictive: bool = False) -> dict[str, Tensor]:
    """What a posterior reports from one trace of a model conditioned on its draws.

    Arguments:
        trace: A ``pyro.poutine`` trace of a sedppl model (e.g. conditioned on posterior draws).
        predictive: Also the noise-free means of the data sites ``spectrum`` (1e-17 erg/s/cm^2/A)
            and ``photometry`` (nanomaggies).

    Returns:
        {name: value} of its ``pyro.deterministic`` sites (the derived quantities, in the units
        their docstrings state) and, with ``predictive``, of the data sites' means; shapes as in
        the trace (leading batch first).
    """
    from .noise import site_mean

    out = {}
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site["infer"].get("_deterministic", False):
            out[name] = site["value"]
        elif predictive and name in DATA_SITES and site["type"] == "sample":
            out[name] = site_mean(site)
    return out
