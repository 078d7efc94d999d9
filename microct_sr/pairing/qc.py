"""QC picture of one pairing: the inlier matches of the best slice and an LR-over-HR overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import area_down, cubic_up, stretch_u8
from .registration import Registration, warp_lr_to_hr_grid
from .scans import _Reader


def _to_size(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    s = size / max(img.shape[:2])
    return cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))),
                      interpolation=cv2.INTER_NEAREST if s > 1 else cv2.INTER_AREA)


def matches_panel(lr_u8: np.ndarray, hr_u8: np.ndarray, src: np.ndarray, dst: np.ndarray,
                  size: int = 512) -> np.ndarray:
    """LR (left) and HR (right) common-grid images with green lines between matched points."""
    import cv2

    a, b = _to_size(lr_u8, size), _to_size(hr_u8, size)
    sa, sb = a.shape[1] / lr_u8.shape[1], b.shape[1] / hr_u8.shape[1]
    h = max(a.shape[0], b.shape[0])
    canvas = np.zeros((h, a.shape[1] + b.shape[1], 3), np.uint8)
    canvas[:a.shape[0], :a.shape[1]] = a[..., None]
    canvas[:b.shape[0], a.shape[1]:] = b[..., None]
    for p, q in zip(src, dst):
        pa = (int(p[0] * sa), int(p[1] * sa))
        pb = (int(q[0] * sb) + a.shape[1], int(q[1] * sb))
        cv2.line(canvas, pa, pb, (0, 255, 0), 1, cv2.LINE_AA)
        cv2.circle(canvas, pa, 3, (0, 200, 255), 1)
        cv2.circle(canvas, pb, 3, (0, 200, 255), 1)
    return canvas


def overlay_panel(lr_slice: np.ndarray, hr_slab: np.ndarray, reg: Registration,
                  size: int = 512) -> np.ndarray:
    """HR (green) and the registered LR (magenta) at LR pixel size, in the HR orientation:
    grey where they agree."""
    hr_small = area_down(hr_slab, reg.rigid.factor)
    lr_w = warp_lr_to_hr_grid(lr_slice, reg.rigid, hr_small.shape)
    lr_w = np.where(np.isfinite(lr_w), lr_w, np.nanmin(lr_w) if np.isfinite(lr_w).any() else 0)
    g, m = stretch_u8(hr_small), stretch_u8(lr_w)
    rgb = np.stack([m, g, m], axis=-1)  # OpenCV order BGR: magenta = B + R
    return _to_size(rgb, size)


def write_qc_png(path: Path, lr, hr, reg: Registration) -> None:
    """Write the two panels side by side with a caption to ``path`` (PNG)."""
    import cv2

    best, f = reg.best, reg.rigid.factor
    if best is None:
        return
    reader = _Reader(lr, hr)
    k, z0 = best.lr_slice, reg.z_offset
    lr_slice = reader.lr_slice(k)
    slab = reader.hr_slices(f * k + z0, f * k + z0 + f).astype(np.float32).mean(0)
    u = reg.grid_upsample
    lr_u8 = stretch_u8(cubic_up(lr_slice, u))
    hr_u8 = stretch_u8(area_down(slab, f // u))
    left = matches_panel(lr_u8, hr_u8, best.src - 0.5, best.dst - 0.5)
    right = overlay_panel(lr_slice, slab, reg)
    h = max(left.shape[0], right.shape[0])
    img = np.zeros((h + 40, left.shape[1] + right.shape[1] + 10, 3), np.uint8)
    img[:left.shape[0], :left.shape[1]] = left
    img[:right.shape[0], left.shape[1] + 10:] = right
    angle, t = reg.motion()
    text = (f"{reg.scan_id} [{reg.method}] LR slice {k}: {len(best.src)} matches | angle "
            f"{angle:.2f} deg, shift ({t[0]:.1f}, {t[1]:.1f}) HR px, z0 {z0} | "
            f"overlay: HR green, LR magenta, NCC {reg.ncc:.2f}")
    cv2.putText(img, text, (8, h + 26), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
