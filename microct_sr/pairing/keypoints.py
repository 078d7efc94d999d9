"""A-KAZE keypoints and brute-force Hamming matching with Lowe's ratio test (on the common grid,
see :mod:`microct_sr.pairing`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import _cv2


@dataclass
class Features:
    pts: np.ndarray          # (n, 2) x, y in common-grid pixels, corner origin
    desc: np.ndarray | None  # (n, 61) uint8
    response: np.ndarray     # (n,)


def detect(img_u8: np.ndarray, threshold: float = 1e-4, max_points: int = 2000) -> Features:
    """A-KAZE keypoints and descriptors; retries with a lower threshold on flat images."""
    cv2 = _cv2()
    kps, desc = [], None
    for thr in (threshold, threshold / 10):
        kps, desc = cv2.AKAZE_create(threshold=thr).detectAndCompute(img_u8, None)
        if len(kps) >= 50:
            break
    if not kps or desc is None:
        return Features(np.zeros((0, 2)), None, np.zeros(0))
    resp = np.array([k.response for k in kps])
    order = np.argsort(-resp, kind="stable")[:max_points]
    pts = np.array([kps[i].pt for i in order], float) + 0.5
    return Features(pts, desc[order], resp[order])


def match(fa: Features, fb: Features, ratio: float = 0.8) -> np.ndarray:
    """Brute-force Hamming matches passing Lowe's ratio test: (m, 3) rows (ia, ib, distance),
    sorted by distance."""
    cv2 = _cv2()
    if fa.desc is None or fb.desc is None or len(fa.pts) < 2 or len(fb.pts) < 2:
        return np.zeros((0, 3))
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(fa.desc, fb.desc, k=2)
    rows = [(m[0].queryIdx, m[0].trainIdx, m[0].distance) for m in knn
            if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    if not rows:
        return np.zeros((0, 3))
    out = np.array(rows, float)
    return out[np.argsort(out[:, 2], kind="stable")]
