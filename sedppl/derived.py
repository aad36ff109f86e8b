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

_state = threading.local()


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
