"""Image helpers shared by matching, registration and patch cutting: the OpenCV (A-KAZE) check,
the uint8 stretch, area downsampling, cubic upsampling and the NCC."""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError


def _cv2():
    import cv2

    if not hasattr(cv2, "AKAZE_create"):
        raise UserError(
            f"OpenCV {cv2.__version__} has no A-KAZE (cv2.AKAZE_create); OpenCV 5's main wheel "
            "moved it out. Install 'opencv-python-headless>=4.8,<5' (and make sure no other "
            "opencv wheel shadows it), then retry")
    return cv2


def stretch_u8(img: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Percentile stretch to uint8 (A-KAZE finds nothing on dark 16-bit data)."""
    x = img.astype(np.float32, copy=False)
    lo, hi = np.percentile(x, [lo_pct, hi_pct])
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    return np.clip((x - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def area_down(img: np.ndarray, d: int) -> np.ndarray:
    """Block mean by ``d`` (crops the remainder at the far edges, keeping the corner origin)."""
    if d == 1:
        return img.astype(np.float32, copy=False)
    h, w = (img.shape[0] // d) * d, (img.shape[1] // d) * d
    return img[:h, :w].astype(np.float32).reshape(h // d, d, w // d, d).mean(axis=(1, 3))


def cubic_up(img: np.ndarray, u: int) -> np.ndarray:
    """Cubic upsampling by ``u`` (half-pixel convention, matches ``align_corners=False``)."""
    cv2 = _cv2()
    x = img.astype(np.float32, copy=False)
    if u == 1:
        return x
    return cv2.resize(x, (x.shape[1] * u, x.shape[0] * u), interpolation=cv2.INTER_CUBIC)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (0 when either is flat)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    # einsum, not BLAS dot: a threaded BLAS is far slower on these sizes on a busy machine
    den = math.sqrt(float(np.einsum("i,i->", a, a)) * float(np.einsum("i,i->", b, b)))
    return float(np.einsum("i,i->", a, b) / den) if den > 0 else 0.0
