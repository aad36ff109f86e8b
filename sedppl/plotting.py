"""Figures (matplotlib, written to files): model spectrum, photometric SED, SFH."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_model(wave: np.ndarray, flux: np.ndarray, model: np.ndarray, photometry, band_flux: np.ndarray,
               edges: np.ndarray, sfr: np.ndarray, path: str | Path, title: str = "") -> None:
    """Spectrum with model, photometric SED and star-formation history in one figure.

    Arguments:
        wave: Observed wavelengths, (M,), vacuum Angstrom.
        flux, model: Data and model f_lambda, (M,), 1e-17 erg/s/cm^2/A.
        photometry: A :class:`sedppl.photometry.Photometry` (band names, effective wavelengths).
        band_flux: (K,) nanomaggies.
        edges: SFH bin edges, (N+1,), Gyr lookback; sfr: (N,) Msun/yr.
        path: Output file (PNG, PDF...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    ax.plot(wave, flux, color="0.6", lw=0.4, label="mock data")
    ax.plot(wave, model, color="C3", lw=0.7, label="model")
    ax.set_xlabel("observed wavelength [A, vacuum]")
    ax.set_ylabel(r"$f_\lambda$ [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ A$^{-1}$]")
    ax.legend(loc="upper right")
    ax = axes[1]
    lam = np.array(photometry.effective_wavelength) / 1e4
    f_nu_ujy = band_flux * 3.631  # 1 nmgy = 3.631 uJy
    ax.plot(lam, f_nu_ujy, "o", color="C0")
    for x, y, b in zip(lam, f_nu_ujy, photometry.bands):
        ax.annotate(b, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([0.5, 1, 2, 5])
    ax.set_xlabel("effective wavelength [um]")
    ax.set_ylabel(r"$f_\nu$ [$\mu$Jy]")
    ax = axes[2]
    ax.stairs(sfr, edges, color="C2")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("lookback time [Gyr]")
    ax.set_ylabel(r"SFR [M$_\odot$ yr$^{-1}$]")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
