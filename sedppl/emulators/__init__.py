"""Trained emulators of the older stars' light shipped with sedppl (safetensors + JSON cards).

Each serves one rest-frame grid of a zoo model with its default arguments
(see :mod:`sedppl.sps.emulated`); a zoo model built with ``sps="emulated"``
loads them. The card records the training set, the validation accuracy per
wavelength chunk and a checksum of the weights; ``tests/test_emulated.py``
checks that a shipped emulator reproduces its card's figures on held-out draws.

=============  ========  ============================================================
zoo key        branch    rest-frame grid (vacuum)
=============  ========  ============================================================
``phot``       ``phot``  ``PhotometryModel``'s photometry grid (ugriz at 0.01 <= z <= 0.2:
                         rest 2425-11143 A) widened by whole pixels to 2000 A - 6 um
                         (``phot_rest_range=PHOT_REST_RANGE``): rest 1999 A - 6.00 um,
                         3,403 pixels at dlnlam = 1e-3
``specphot``   ``spec``  ``SpecPhotModel``'s spectrum grid (DESI 3600-9824 A at 0.002 <= z
                         <= 1.1): rest 1711-9826 A, 11,655 pixels at dlnlam = 1.5e-4,
                         two blended wavelength chunks
``specphot``   ``phot``  ``SpecPhotModel``'s photometry grid (g, r, z, W1, W2 at 0.002 <= z
                         <= 1.1: rest 1792 A - 5.60 um) widened by whole pixels to 6 um:
                         rest 1792 A - 6.00 um, 3,513 pixels at dlnlam = 1e-3
=============  ========  ============================================================

Both photometry-grid emulators cover the rest frame from 2000 A (the DESI one from
1792 A) to 6 um: the model's own grid is a run of their pixels, and that run is all
the model emulates (:class:`~sedppl.sps.emulated.EmulatedSynthesis`). The same file
also serves a model whose grid starts on the same pixel and ends before 6 um, e.g.
``PhotometryModel`` with WISE W1 added to ugriz (its bluest band and redshifts,
and so its first pixel, are the same). Their networks' last (ugriz) or only (DESI)
training stage ran on a GPU (:func:`sedppl.emulator_training.fit_network`; the
cards' notes say how).
"""

from __future__ import annotations

from pathlib import Path

#: rest-frame range (vacuum Angstrom) that the shipped photometry-grid emulators cover at least
PHOT_REST_RANGE = (2000.0, 60000.0)

#: zoo key -> {branch: file stem}
SHIPPED = {"phot": {"phot": "phot_sdss_ugriz_stars"},
           "specphot": {"spec": "specphot_desi_spec_stars", "phot": "specphot_desi_phot_stars"}}


def shipped_emulators(key: str) -> dict[str, Path]:
    """Paths (``.safetensors``, each with its ``.json`` card) of the shipped emulators of zoo model ``key``,
    by branch name."""
    if key not in SHIPPED:
        raise ValueError(f"no shipped emulator for the zoo model {key!r}; shipped: {sorted(SHIPPED)} "
                         "(train one with `sedppl train emulator --model ...`)")
    return {b: Path(__file__).with_name(stem + ".safetensors") for b, stem in SHIPPED[key].items()}
