"""Full-reference fidelity metrics on the 0-255 scale: PSNR (the paper's Eq. 8) and SSIM.

Intensity rule (stated in the JSON notes and docs/evaluate.md): 8-bit data are used as they
are; any other dtype (16-bit, float) is mapped linearly to 0-255 by one window shared by SR and
HR, ``[lo, hi]`` = the HR's minimum and maximum over the evaluated slices, then clipped to
[0, 255] (no rounding). See :func:`intensity_window` and :func:`to_255`.

This module never imports pyiqa (``upscale``/``pair``/``simulate``/``train`` stay light).
"""

from __future__ import annotations

import math

import numpy as np

PEAK = 255.0
SSIM_SIGMA = 1.5
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1  # scikit-image's Gaussian window: 11 px


def intensity_window(dtype: np.dtype, hr_min: float, hr_max: float) -> tuple[float, float]:
    """The window mapped to [0, 255]: (0, 255) for uint8, else the HR's (min, max)."""
    if np.dtype(dtype) == np.uint8:
        return 0.0, 255.0
    lo, hi = float(hr_min), float(hr_max)
    if not hi > lo:
        raise ValueError(f"the HR volume is constant ({lo:g}): no intensity window for PSNR/SSIM")
    return lo, hi


def to_255(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``x`` linearly from ``window`` to [0, 255] as float64, clipped."""
    lo, hi = window
    y = (np.asarray(x, dtype=np.float64) - lo) * (PEAK / (hi - lo))
    return np.clip(y, 0.0, PEAK)


def mse(sr: np.ndarray, hr: np.ndarray) -> float:
    """Mean squared error over all elements (same shape required)."""
    if sr.shape != hr.shape:
        raise ValueError(f"shape mismatch: {sr.shape} vs {hr.shape}")
    d = np.asarray(sr, dtype=np.float64) - np.asarray(hr, dtype=np.float64)
    return float(np.mean(d * d))


def psnr(sr: np.ndarray, hr: np.ndarray, peak: float = PEAK) -> float:
    """Eq. 8: ``10 log10(peak^2 / MSE)`` in dB on 0-255 images; ``inf`` when identical."""
    m = mse(sr, hr)
    if m == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / m)


def ssim(sr: np.ndarray, hr: np.ndarray, peak: float = PEAK) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on 0-255.

    2D images; an (H, W, 3) image is averaged over its channels. scikit-image does the work.
    ValueError when an image is smaller than the ``SSIM_WINDOW`` x ``SSIM_WINDOW`` window.
    """
    from skimage.metrics import structural_similarity

    a = np.asarray(sr, dtype=np.float64)
    b = np.asarray(hr, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    channel_axis = -1 if a.ndim == 3 else None
    h, w = a.shape[:2]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    return float(structural_similarity(a, b, data_range=peak, gaussian_weights=True,
                                       sigma=SSIM_SIGMA,
                                       use_sample_covariance=False, channel_axis=channel_axis))


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    """Drop ``border`` pixels on each side of the last two axes (PIRM convention)."""
    if border <= 0:
        return img
    h, w = img.shape[-2:]
    if 2 * border >= min(h, w):
        raise ValueError(f"crop border {border} leaves nothing of a {h}x{w} slice")
    return img[..., border:h - border, border:w - border]
