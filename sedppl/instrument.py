"""The instrument: air/vacuum, line-of-sight broadening, resolution, calibration.

A velocity dispersion is a convolution on a grid uniform in ln(lambda), done
by FFT (:func:`broaden_velocity`). Instrumental broadening acts on the
observed pixel grid as a band matrix (the convention of DESI's resolution
matrices): row i of the matrix holds the weights of pixels i-H..i+H in output
pixel i. A Gaussian line-spread function, from a resolving power R (constant
in velocity) or a FWHM in Angstrom, becomes such a matrix, with pixel-integrated Gaussian weights whose rows sum to 1 (so the
integrated flux is conserved away from the ends).

References:
    Morton 2000, ApJS 130, 403; Ciddor 1996, Appl. Opt. 35, 1566
    (air/vacuum, the IAU convention used by SDSS and DESI).
    Guy et al. 2023, AJ 165, 144 (DESI spectro-perfectionism resolution matrices).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Speed of light, km/s.
C_KMS = 299792.458
#: FWHM / sigma of a Gaussian.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Below this wavelength (Angstrom) the IAU convention quotes vacuum wavelengths.
AIR_VACUUM_LIMIT_AA = 2000.0


def air_to_vacuum(wave_air: Tensor) -> Tensor:
    """Vacuum wavelengths from air wavelengths (Angstrom).

    Uses the inversion of Morton (2000)/Ciddor (1996) by N. Piskunov (VALD).
    Wavelengths below 2000 A are taken to be vacuum already (IAU convention)
    and returned unchanged.
    """
    wave_air = torch.as_tensor(wave_air)
    s2 = (1e4 / wave_air) ** 2
    n = 1 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2) \
        + 1.599740894897e-4 / (38.92568793293 - s2)
    return torch.where(wave_air >= AIR_VACUUM_LIMIT_AA, wave_air * n, wave_air)


def vacuum_to_air(wave_vac: Tensor) -> Tensor:
    """Air wavelengths from vacuum wavelengths (Angstrom), Morton (2000); <2000 A unchanged."""
    wave_vac = torch.as_tensor(wave_vac)
    s2 = (1e4 / wave_vac) ** 2
    n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2)
    return torch.where(wave_vac >= AIR_VACUUM_LIMIT_AA, wave_vac / n, wave_vac)


def sigma_from_resolution(wave: Tensor, resolving_power: float | Tensor | None = None,
                          fwhm: float | Tensor | None = None) -> Tensor:
    """Gaussian sigma (Angstrom) of a line-spread function given R or a FWHM.

    Arguments:
        wave: Observed wavelengths, (..., M), Angstrom.
        resolving_power: R = lambda / FWHM, scalar or broadcastable to wave.
        fwhm: FWHM in Angstrom, scalar or broadcastable to wave.

    Returns:
        sigma, Angstrom, shape of ``wave``.
    """
    if (resolving_power is None) == (fwhm is None):
        raise ValueError("give exactly one of resolving_power (R) or fwhm (Angstrom)")
    if resolving_power is not None:
        r = torch.as_tensor(resolving_power, dtype=wave.dtype)
        if torch.any(r <= 0):
            raise ValueError("resolving power R must be positive")
        return wave / (r * FWHM_PER_SIGMA)
    f = torch.as_tensor(fwhm, dtype=wave.dtype)
    if torch.any(f < 0):
        raise ValueError("FWHM must be >= 0 Angstrom")
    return (f / FWHM_PER_SIGMA).expand_as(wave) if f.dim() == 0 else f / FWHM_PER_SIGMA


def gaussian_band(wave: Tensor, sigma: Tensor, half_width: int, n_sigma: float = 5.0) -> Tensor:
    """Band matrix of a Gaussian LSF with pixel-dependent width.

    Arguments:
        wave: Pixel centres, (M,) Angstrom, increasing.
        sigma: Gaussian sigma at each pixel, (..., M), Angstrom (>= 0).
        half_width: H; the band has 2H + 1 diagonals.
        n_sigma: The Gaussian is cut at +-``n_sigma`` sigma (each pixel gets the integral of
            the cut Gaussian over its extent), so a galaxy's kernel does not depend on H
            (nor on the other galaxies of a batch) once H covers the cut.

    Returns:
        (..., 2H+1, M): row weights, d = -H..H, each row summing to 1. A zero
        sigma gives the identity.
    """
    m = wave.shape[-1]
    edges = torch.cat([wave[:1] - 0.5 * (wave[1] - wave[0]), 0.5 * (wave[1:] + wave[:-1]),
                       wave[-1:] + 0.5 * (wave[-1] - wave[-2])])
    # the Gaussian's cumulative at each of pixel i's 2H + 2 neighbouring edges (i - H .. i + H + 1),
    # the argument clamped at +-n_sigma sigma; row d's weight is the difference of consecutive
    # rows: one erf per edge, and exactly zero beyond the cut and beyond the ends (whose clamped
    # edges coincide); the 1/2 of 0.5 (erf - erf) cancels in the normalisation
    pos = (torch.arange(m)[None, :] + torch.arange(-half_width, half_width + 2)[:, None]).clamp(0, m)
    inv_s = 1.0 / (sigma[..., None, :].clamp(min=1e-12) * math.sqrt(2.0))
    cut = n_sigma / math.sqrt(2.0)
    cdf = torch.erf(((edges[pos] - wave[None, :]) * inv_s).clamp_(-cut, cut))
    w = cdf[..., 1:, :] - cdf[..., :-1, :]
    return w * (1.0 / w.sum(-2, keepdim=True))


def apply_band(flux: Tensor, band: Tensor) -> Tensor:
    """Apply a band matrix: out_i = sum_d band[d, i] flux[i + d].

    Arguments:
        flux: (..., M).
        band: (..., 2H+1, M), e.g. from :func:`gaussian_band` or :func:`desi_band`.

    Returns:
        (..., M). Pixels beyond the ends count as zero (the rows of
        :func:`gaussian_band` are renormalised to the pixels that exist).
    """
    h = (band.shape[-2] - 1) // 2
    m = flux.shape[-1]
    padded = torch.nn.functional.pad(flux, (h, h))
    out = torch.zeros(torch.broadcast_shapes(flux.shape, band.shape[:-2] + (m,)),
                      dtype=flux.dtype, device=flux.device)
    for k in range(2 * h + 1):
        out = out + band[..., k, :] * padded[..., k: k + m]
    return out


def desi_band(resolution_data: Tensor) -> Tensor:
    """Convert DESI ``*_RESOLUTION`` data to the band layout of :func:`apply_band`.

    DESI stores the matrix in scipy DIA form with offsets +H..-H: entry
    ``data[k, j]`` is A[j - off_k, j] with off_k = H - k.

    Arguments:
        resolution_data: (..., 2H+1, M) as read from a DESI coadd.

    Returns:
        (..., 2H+1, M) with band[d + H, i] = A[i, i + d].
    """
    ndiag, m = resolution_data.shape[-2:]
    h = (ndiag - 1) // 2
    out = torch.zeros_like(resolution_data)
    for d in range(-h, h + 1):
        k = h - d  # row of offset d in DIA storage (offsets run +H..-H)
        # A[i, i+d] = data[k, i+d]
        if d >= 0:
            out[..., d + h, : m - d] = resolution_data[..., k, d:]
        else:
            out[..., d + h, -d:] = resolution_data[..., k, : m + d]
    return out


def velocity_sigma(wave: Tensor, sigma_kms: Tensor) -> Tensor:
    """Gaussian sigma in Angstrom of a velocity dispersion; wave (M,) A, sigma_kms (...,) -> (..., M)."""
    return torch.as_tensor(sigma_kms, dtype=wave.dtype)[..., None] * wave / C_KMS


def broaden_velocity(flux: Tensor, dlnlam: float, sigma_kms: Tensor | float,
                     n_sigma: float = 6.0) -> Tensor:
    """Convolve spectra on a grid uniform in ln(lambda) with a Gaussian line-of-sight velocity distribution.

    A velocity dispersion is a Gaussian of constant width in ln(lambda), so on
    such a grid it is a convolution, done here with FFTs. The kernel is the
    Gaussian integrated over each pixel (the same weights as
    :func:`gaussian_band`: non-negative, summing to 1, the identity at zero
    dispersion, and well behaved for dispersions below a pixel, where the
    analytic Fourier transform of a Gaussian would give negative side lobes).
    Each galaxy gets its own width at the cost of FFTs over the batch (a band
    matrix would cost (2H+1) x M per galaxy, with H ~ 80 pixels at 400 km/s).
    The ends are padded with the edge values over ``n_sigma`` of the widest
    kernel, then a ramp between them closes the period, so the result does not
    depend on the other galaxies of a batch.

    Arguments:
        flux: (..., N) flux density on pixels uniformly spaced in ln(lambda), any unit.
        dlnlam: The pixel step in ln(lambda).
        sigma_kms: Dispersion, scalar or (...,), km/s (>= 0; 0 leaves the spectrum unchanged).
        n_sigma: Padding in units of the largest dispersion.

    Returns:
        (..., N) broadened flux; the total flux is conserved away from the ends.

    """
    sigma = torch.as_tensor(sigma_kms, dtype=flux.dtype, device=flux.device)
    if torch.any(sigma < 0) or not torch.all(torch.isfinite(sigma)):
        raise ValueError("velocity dispersion must be finite and >= 0 km/s")
    sigma_pix = sigma / C_KMS / dlnlam
    n = flux.shape[-1]
    batch = torch.broadcast_shapes(flux.shape[:-1], sigma_pix.shape)
    flux = flux.expand(batch + (n,))
    pad = int(math.ceil(n_sigma * float(sigma_pix.detach().max()))) + 8 if sigma_pix.numel() else 8
    nfft = 1 << int(math.ceil(math.log2(n + 2 * pad)))
    # periodic extension: the edge values, then a linear ramp between them, far from the data
    extra = nfft - n
    left, right = flux[..., :1], flux[..., -1:]
    t = torch.linspace(0.0, 1.0, extra - 2 * pad + 2, dtype=flux.dtype, device=flux.device)[1:-1]
    ramp = right + (left - right) * t
    padded = torch.cat([flux, right.expand(batch + (pad,)), ramp, left.expand(batch + (pad,))], dim=-1)
    # pixel-integrated Gaussian at offsets -pad..pad, wrapped onto the period
    offs = torch.arange(-pad, pad + 1, dtype=flux.dtype, device=flux.device)
    s2 = sigma_pix[..., None].clamp(min=1e-12) * math.sqrt(2.0)
    w = 0.5 * (torch.erf((offs + 0.5) / s2) - torch.erf((offs - 0.5) / s2))
    w = w / w.sum(-1, keepdim=True)
    kernel = torch.zeros(sigma_pix.shape + (nfft,), dtype=flux.dtype, device=flux.device)
    kernel = kernel.index_add(-1, torch.remainder(offs.long(), nfft), w)
    out = torch.fft.irfft(torch.fft.rfft(padded) * torch.fft.rfft(kernel), n=nfft)
    return out[..., :n]


def lsf_band(wave: Tensor, sigma_aa: Tensor, template_sigma_aa: Tensor | None = None,
             n_sigma: float = 5.0) -> Tensor:
    """Band matrix of a Gaussian LSF minus the template's own resolution (in quadrature).

    Arguments:
        wave: Observed pixel centres, (M,), Angstrom.
        sigma_aa: Target total sigma (instrument and/or velocity), (..., M), Angstrom.
        template_sigma_aa: The model's intrinsic sigma on the observed grid, (..., M),
            Angstrom, or None. Where it exceeds the target, no broadening is applied.
        n_sigma: Half-width of the band in units of the largest sigma.

    Returns:
        (..., 2H+1, M) band matrix.
    """
    var = sigma_aa**2
    if template_sigma_aa is not None:
        var = (var - template_sigma_aa**2).clamp(min=0.0)
    sig = torch.sqrt(var + 1e-30)
    pix = torch.diff(wave).min().item()
    h = max(1, int(math.ceil(n_sigma * sig.max().item() / pix)))
    return gaussian_band(wave, sig, h, n_sigma)


def legendre_calibration(wave: Tensor, coeffs: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """Multiplicative calibration: scale * (1 + sum_k c_k P_k(x)), x in [-1, 1] across ``wave``.

    Arguments:
        wave: (M,) observed Angstrom.
        coeffs: (..., K) coefficients of the Legendre polynomials P_1..P_K.
        scale: Aperture/normalisation factor, (...,) dimensionless.

    Returns:
        (..., M) dimensionless factor to multiply the model by.
    """
    x = 2 * (wave - wave.min()) / (wave.max() - wave.min()) - 1
    coeffs = torch.as_tensor(coeffs, dtype=wave.dtype)
    p_prev, p = torch.ones_like(x), x
    total = torch.zeros(coeffs.shape[:-1] + x.shape, dtype=wave.dtype)
    for k in range(1, coeffs.shape[-1] + 1):
        total = total + coeffs[..., k - 1: k] * p
        p_prev, p = p, ((2 * k + 1) * x * p - k * p_prev) / (k + 1)
    return torch.as_tensor(scale, dtype=wave.dtype)[..., None] * (1 + total)
