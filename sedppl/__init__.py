"""sedppl: probabilistic programming for galaxy SED fitting.

Modules (one concept each): ``sps`` (SSP grids, synthesis, nebular emission,
remnants), ``dust``, ``cosmology``, ``instrument``, ``resample``,
``photometry``, ``forward`` (the assembled forward model), ``sfh`` and ``zh``
(history priors as Pyro blocks), ``noise``, ``data`` (``Observation``),
``zoo`` (ready-made Pyro models), ``infer`` (NUTS to ArviZ), ``cli``.
Units and conventions: docs/conventions.md.
"""

__version__ = "0.1.0"
