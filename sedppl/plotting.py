"""Figures (matplotlib, written to files): spectrum fits with residuals, photometric SED, SFH and ZH, corners."""

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


def _draws(idata, name: str, galaxy: int, group: str = "posterior") -> np.ndarray:
    """Draws of one galaxy, chains stacked: (S,) or (S, ...)."""
    v = getattr(idata, group)[name].values
    v = v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])
    return v[:, galaxy]


def _history_band(ax, idata, galaxy: int, site: str, color: str, truth: dict | None) -> None:
    """16-50-84% band of a per-bin history ``site`` against lookback time (Gyr, the ``sfh_edges`` bins)."""
    values = _draws(idata, site, galaxy)
    edges = np.median(_draws(idata, "sfh_edges", galaxy), axis=0)
    lo, mid, hi = np.percentile(values, [16, 50, 84], axis=0)
    ax.stairs(hi, edges, baseline=lo, fill=True, color=color, alpha=0.3, label="posterior 16-84%")
    ax.stairs(mid, edges, color=color, label="median")
    if truth is not None and site in truth:
        ax.stairs(np.asarray(truth[site])[galaxy], np.asarray(truth["sfh_edges"])[galaxy], color="k",
                  ls="--", label="truth")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("lookback time [Gyr]")
    ax.legend(fontsize=7)


def plot_sfh(ax, idata, galaxy: int, truth: dict | None = None) -> None:
    """Star-formation history band (16-50-84%, Msun/yr) against lookback time (Gyr) on ``ax``."""
    _history_band(ax, idata, galaxy, "sfh_sfr", "C2", truth)
    ax.set_yscale("log")
    ax.set_ylabel(r"SFR [M$_\odot$ yr$^{-1}$]")


def plot_zh(ax, idata, galaxy: int, truth: dict | None = None) -> None:
    """Stellar metallicity history band (16-50-84%, log10 Z/Zsun) against lookback time (Gyr) on ``ax``."""
    _history_band(ax, idata, galaxy, "zh_log_z", "C4", truth)
    ax.set_ylabel(r"log$_{10}$ Z/Z$_\odot$")


def _bin(x: np.ndarray, factor: int) -> np.ndarray:
    m = (len(x) // factor) * factor
    return x[..., :m].reshape(*x.shape[:-1], -1, factor)


def plot_spectrum_fit(ax, ax_resid, idata, obs, galaxy: int, factor: int = 4) -> None:
    """Observed spectrum and the posterior-predictive model (median and 16-84%) with residuals.

    The data are shown in ivar-weighted bins of ``factor`` pixels (for legibility); the
    residual panel shows (data - median model) / sigma per bin. Masked stretches
    (ivar 0 or mask False) are shaded.

    Arguments:
        ax, ax_resid: Axes for the spectrum (1e-17 erg/s/cm^2/A against observed vacuum
            Angstrom) and for the residuals (in sigma).
        idata: InferenceData with ``posterior_predictive['spectrum']``.
        obs: The fitted :class:`~sedppl.data.Observation`.
        galaxy: Index in the batch.
    """
    wave = obs.wave.numpy()
    f = obs.flux.reshape(-1, len(wave))[galaxy].numpy()
    iv = obs.ivar.reshape(-1, len(wave))[galaxy].numpy()
    if obs.mask is not None:
        iv = np.where(obs.mask.reshape(-1, len(wave))[galaxy].numpy(), iv, 0.0)
    w = _bin(iv, factor)
    wsum = w.sum(-1)
    fb = np.where(wsum > 0, (_bin(np.nan_to_num(f), factor) * w).sum(-1) / np.maximum(wsum, 1e-30), np.nan)
    xb = _bin(wave, factor).mean(-1)
    ax.plot(xb, fb, color="0.45", lw=0.5, label=f"data ({factor}-pixel bins)")
    pred = None
    if hasattr(idata, "posterior_predictive") and "spectrum" in idata.posterior_predictive:
        pred = _draws(idata, "spectrum", galaxy, "posterior_predictive")
        lo, mid, hi = np.percentile(pred, [16, 50, 84], axis=0)
        ax.fill_between(wave, lo, hi, color="C3", alpha=0.35, lw=0)
        ax.plot(wave, mid, color="C3", lw=0.6, label="model (median, 16-84%)")
        resid = np.where(wsum > 0, (fb - _bin(mid, factor).mean(-1)) * np.sqrt(wsum), np.nan)
        ax_resid.plot(xb, resid, color="0.3", lw=0.5)
    ax_resid.axhline(0, color="C3", lw=0.8)
    bad = iv <= 0
    if bad.any():  # shade masked stretches
        edges = np.flatnonzero(np.diff(np.concatenate([[0], bad.astype(int), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            for axis in (ax, ax_resid):
                axis.axvspan(wave[a], wave[min(b, len(wave) - 1)], color="0.9", zorder=0)
    good = np.isfinite(fb)
    if good.any():
        top = np.percentile(fb[good], 99.5) * 1.3
        ax.set_ylim(min(0, np.percentile(fb[good], 0.5)), top)
    ax_resid.set_ylim(-5, 5)
    ax.set_ylabel(r"$f_\lambda$ [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ A$^{-1}$]")
    ax_resid.set_ylabel(r"$\Delta/\sigma$")
    ax_resid.set_xlabel("observed wavelength [A, vacuum]")
    ax.tick_params(labelbottom=False)
    ax.legend(fontsize=7, loc="upper right")


def plot_photometric_fit(ax, idata, obs, photometry, galaxy: int) -> None:
    """Observed band fluxes (uJy, with 1-sigma errors; missing bands left out) and the
    posterior-predictive model (16-84% range) against effective wavelength (um) on ``ax``."""
    lam = np.array(photometry.effective_wavelength) / 1e4
    f = obs.band_flux.reshape(-1, len(lam))[galaxy].numpy() * 3.631  # 1 nmgy = 3.631 uJy
    iv = obs.band_ivar.reshape(-1, len(lam))[galaxy].numpy()
    ok = iv > 0
    ax.errorbar(lam[ok], f[ok], yerr=3.631 / np.sqrt(iv[ok]), fmt="o", color="k", ms=4, label="data")
    if hasattr(idata, "posterior_predictive") and "photometry" in idata.posterior_predictive:
        pred = _draws(idata, "photometry", galaxy, "posterior_predictive") * 3.631
        lo, hi = np.percentile(pred, [16, 84], axis=0)
        ax.fill_between(lam, lo, hi, color="C3", alpha=0.4, step=None, label="model 16-84%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("effective wavelength [um]")
    ax.set_ylabel(r"$f_\nu$ [$\mu$Jy]")
    ax.legend(fontsize=7)


def plot_corner(fig, idata, names: list[str], galaxy: int, prior: dict | None = None,
                truth: dict | None = None) -> None:
    """Corner plot of ``names`` for one galaxy on ``fig`` (a figure or subfigure): posterior (blue) over
    prior (grey) marginals, pairwise posterior draws, truths as dashed lines.
    ``prior``: {name: prior draws} or None; ``truth``: {name: (N,) values} or None."""
    n = len(names)
    post = {k: _draws(idata, k, galaxy) for k in names}
    pri = None if prior is None else {k: np.asarray(prior[k]).ravel() for k in names}
    axes = fig.subplots(n, n, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    for i, yi in enumerate(names):
        for j, xj in enumerate(names):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                bins = np.linspace(*np.percentile(np.concatenate([post[xj]] + ([pri[xj]] if pri else [])), [0.5, 99.5]), 40)
                if pri:
                    ax.hist(pri[xj], bins=bins, density=True, color="0.75", label="prior")
                ax.hist(post[xj], bins=bins, density=True, histtype="step", color="C0", label="posterior")
                ax.set_yticks([])
            else:
                ax.plot(post[xj], post[yi], ",", color="C0", alpha=0.3)
                if truth is not None and yi in truth:
                    ax.axhline(float(np.asarray(truth[yi])[galaxy]), color="k", ls="--", lw=0.8)
            if truth is not None and xj in truth:
                ax.axvline(float(np.asarray(truth[xj])[galaxy]), color="k", ls="--", lw=0.8)
            if i == n - 1:
                ax.set_xlabel(xj, fontsize=8)
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(yi, fontsize=8)
            elif j > 0:
                ax.set_yticklabels([])
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6)


def plot_fit(idata, obs, photometry, galaxy: int, path: str | Path, prior: dict | None = None,
             truth: dict | None = None, corner: tuple[str, ...] = ("log_stellar_mass", "log_ssfr_100myr",
                                                                   "mass_weighted_age", "tau_ism"),
             title: str = "") -> None:
    """One galaxy's fit, written to ``path``: the spectrum with the posterior-predictive model and
    residuals (when the observation has a spectrum), the photometric SED (when it has
    photometry), the SFH and metallicity-history bands, and a corner plot of ``corner``
    (posterior over prior, truths when given).

    Arguments:
        idata: InferenceData with ``posterior`` (incl. ``sfh_sfr``, ``sfh_edges``, ``zh_log_z``) and
            ``posterior_predictive``.
        obs: The fitted :class:`~sedppl.data.Observation` (one galaxy or a batch).
        photometry: The model's :class:`~sedppl.photometry.Photometry`, or None.
        galaxy: Index in the batch.
        prior: {name: prior draws} for the corner plot, or None.
        truth: {name: (N,) values} (mocks), or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spectrum = obs.has_spectrum and hasattr(idata, "posterior_predictive") \
        and "spectrum" in idata.posterior_predictive
    fig = plt.figure(figsize=(14, 11 if spectrum else 6.5))
    if spectrum:
        top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.5])
        a_s, a_r = top.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
        plot_spectrum_fit(a_s, a_r, idata, obs, galaxy)
    else:
        bottom = fig
    left, right = bottom.subfigures(1, 2, width_ratios=[1, 1.1])
    panels = []
    if obs.has_photometry and photometry is not None:
        panels.append(lambda ax: plot_photometric_fit(ax, idata, obs, photometry, galaxy))
    panels.append(lambda ax: plot_sfh(ax, idata, galaxy, truth))
    if "zh_log_z" in idata.posterior:
        panels.append(lambda ax: plot_zh(ax, idata, galaxy, truth))
    for draw, ax in zip(panels, np.atleast_1d(left.subplots(len(panels), 1))):
        draw(ax)
    names = [c for c in corner if c in idata.posterior]
    plot_corner(right, idata, names, galaxy, prior=prior, truth=truth)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], path: str | Path,
                 labels: tuple[str, str] = ("NPE", "NUTS"), stats: dict | None = None, title: str = "") -> None:
    """Overlaid marginal posteriors of two fits of one galaxy (e.g. amortized vs NUTS), one panel a parameter.

    Arguments:
        a, b: {parameter: draws (L,)}; ``b`` is the reference.
        path: Output file.
        labels: Legend names of ``a`` and ``b``.
        stats: :func:`sedppl.diagnostics.compare_posteriors` output, to print the shift (in sd of
            ``b``) and width ratio on each panel, and the classifier accuracy in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(b)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, p in zip(axes.flat, names):
        both = np.concatenate([np.ravel(a[p]), np.ravel(b[p])])
        bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 40)
        ax.hist(np.ravel(b[p]), bins=bins, density=True, color="0.7", label=labels[1])
        ax.hist(np.ravel(a[p]), bins=bins, density=True, histtype="step", color="C0", lw=1.4, label=labels[0])
        ax.set_xlabel(p, fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        if stats is not None:
            ax.set_title(f"shift {stats['shift'][p]:+.2f} sd, width x{stats['width_ratio'][p]:.2f}", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7)
    if stats is not None:
        title = f"{title}  (classifier accuracy {stats['c2st_accuracy']:.3f}; 0.5 = indistinguishable)".strip()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
