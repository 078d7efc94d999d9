"""Register a real LR scan to its HR scan and cut matching LR/HR training patches.

Geometry (see docs/pair.md): internally pixel coordinates have their origin at the corner of
pixel (0, 0), so pixel (i, j) spans x in [j, j+1), y in [i, i+1), and the registration
(:class:`Rigid`) maps an LR position to an HR position:

    P_hr = factor * R(angle) @ P_lr + t_hr          (x, y in each scan's own pixels)

with R(a) = [[cos a, -sin a], [sin a, cos a]] on (x, y). Identity is the SR grid convention:
LR pixel (i, j) covers HR pixels [8i, 8i+8) x [8j, 8j+8). In Z, LR slice k covers HR slices
[factor*k + z0, factor*k + z0 + factor) with z0 = ``z_offset_hr_slices``. ``registration.json``
reports the motion in simulate's convention instead (``CONVENTIONS``, ``Registration.motion``):
p_lr = R(angle_deg) (p_hr - c) + c + shift_um about the HR field's centre c, so it compares
directly with ``simulation.json``.

Matching never crosses the 8x gap: the LR slice is upsampled (cubic) by ``u`` and the HR slab
(the ``factor`` HR slices one LR slice covers, averaged) is area-downsampled by ``factor/u`` to a
common grid of at least ``match_size`` pixels, both are stretched to uint8 by percentiles and
A-KAZE keypoints are matched there.

Patches: the HR scan is resampled into the LR scan's orientation, never the reverse, so LR
patches are untouched LR pixels (what the network sees at inference, noise texture included)
and only the 8x oversampled HR is interpolated (cubic), where the interpolation error is far
below an LR pixel.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .errors import UserError

log = logging.getLogger(__name__)

METHODS = ("ransac", "two-point")
CSV_COLUMNS = ["patch_id", "scan_id", "lr_slice", "hr_slice", "lr_x", "lr_y", "hr_x", "hr_y",
               "angle_deg", "ncc"]
SCAN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CONVENTIONS = {
    "frame": "arrays (z, y, x); positions p = (x, y) in micrometres from the corner of pixel "
             "(0, 0) of each scan (x = column, right; y = row, down)",
    "motion": "p_lr = R(angle_deg) (p_hr - c) + c + shift_um: an HR point p_hr appears at p_lr "
              "in the LR scan; c = centre of the HR slice field of view (x_size/2, y_size/2); "
              "the same convention as simulate's simulation.json (rotation_deg, shift_um), so "
              "the two compare directly. Undo: p_hr = R(-angle_deg) (p_lr - c - shift_um) + c",
    "rotation": "R(a) = [[cos a, -sin a], [sin a, cos a]] acting on (x, y): a positive angle "
                "turns +x towards +y, i.e. clockwise as displayed with y pointing down",
    "shift_hr_px": "shift_um in HR pixels (given also when the voxel size is unknown)",
    "lr_to_hr_px": "2x3 affine [A | b]: (x_hr, y_hr) = A (x_lr, y_lr) + b in pixel units with "
                   "corner origin, i.e. LR pixel (i, j) centre (j + 0.5, i + 0.5)",
    "z": "LR slice k covers HR slices [factor*k + z_offset_hr_slices, factor*k + "
         "z_offset_hr_slices + factor); its HR patch is slice factor*k + z_offset_hr_slices + "
         "factor//2 (simulate's z_offset is 0)",
    "resampled": "HR is resampled (cubic) into the LR orientation; LR pixels are untouched",
    "lr_x_lr_y": "pairs.csv: centre of the LR crop in LR pixels (corner origin): the crop is "
                 "LR[lr_slice, lr_y - p/2 : lr_y + p/2, lr_x - p/2 : lr_x + p/2]",
    "hr_x_hr_y": "pairs.csv: centre of the HR crop in the HR scan's own pixels (corner origin)",
}


def _path(vol) -> str | None:
    return getattr(vol, "path", None)


# ----------------------------------------------------------------------------- geometry
@dataclass
class Rigid:
    """``P_hr = factor * R(angle_deg) @ P_lr + t_hr`` (pixels, corner origin, (x, y))."""

    angle_deg: float
    t_hr: tuple[float, float]
    factor: int

    def rotation(self) -> np.ndarray:
        a = math.radians(self.angle_deg)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

    def lr_to_hr(self, pts_lr: np.ndarray) -> np.ndarray:
        """(n, 2) LR (x, y) -> (n, 2) HR (x, y)."""
        return self.factor * np.asarray(pts_lr, float) @ self.rotation().T + np.asarray(self.t_hr)


def rotation_angle_deg(m: np.ndarray) -> float:
    """Angle of the rotation part of a 2x2 (or 2x3) similarity matrix."""
    return math.degrees(math.atan2(m[1, 0], m[0, 0]))


def fit_rigid(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares rotation + translation (no scale) taking ``src`` (n, 2) onto ``dst``."""
    cs, cd = src.mean(0), dst.mean(0)
    a, b = src - cs, dst - cd
    num = np.sum(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    den = np.sum(a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1])
    ang = math.atan2(num, den)
    r = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    return math.degrees(ang), cd - r @ cs


# ----------------------------------------------------------------------------- images
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


# ----------------------------------------------------------------------------- features
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


# ----------------------------------------------------------------------------- per slice
@dataclass
class SliceFit:
    """One LR slice matched to its HR slab on the common grid."""

    lr_slice: int
    z_offset: int
    n_matches: int
    ok: bool = False
    reason: str = ""
    angle_deg: float = float("nan")
    t_grid: tuple[float, float] = (float("nan"), float("nan"))
    scale: float = float("nan")
    src: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # inliers, LR grid
    dst: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # inliers, HR grid
    all_src: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # ratio-test matches
    all_dst: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def fit_ransac(fit: SliceFit, *, min_inliers: int, max_scale_error: float,
               threshold_px: float, seed: int) -> SliceFit:
    """``cv2.estimateAffinePartial2D`` with RANSAC; rejects bad scale or few inliers."""
    cv2 = _cv2()
    if fit.n_matches < max(3, min_inliers):
        fit.reason = f"{fit.n_matches} matches"
        return fit
    cv2.setRNGSeed(seed)
    m, mask = cv2.estimateAffinePartial2D(
        fit.all_src.astype(np.float32), fit.all_dst.astype(np.float32), method=cv2.RANSAC,
        ransacReprojThreshold=threshold_px, maxIters=5000, confidence=0.999, refineIters=10)
    if m is None:
        fit.reason = "RANSAC found no model"
        return fit
    inl = mask.ravel().astype(bool)
    fit.scale = float(math.hypot(m[0, 0], m[1, 0]))
    fit.src, fit.dst = fit.all_src[inl], fit.all_dst[inl]
    if inl.sum() < min_inliers:
        fit.reason = f"{int(inl.sum())} inliers < {min_inliers}"
        return fit
    if abs(fit.scale - 1) > max_scale_error:
        fit.reason = f"scale {fit.scale:.3f} is not ~1"
        return fit
    fit.angle_deg, t = fit_rigid(fit.src, fit.dst)
    fit.t_grid = (float(t[0]), float(t[1]))
    fit.ok = True
    return fit


def two_point_estimate(a: np.ndarray, b: np.ndarray, A: np.ndarray, B: np.ndarray
                       ) -> tuple[float, np.ndarray]:
    """The paper's Eq. 1: angle between ab (LR) and AB (HR); shift from the midpoints."""
    ang = math.atan2(B[1] - A[1], B[0] - A[0]) - math.atan2(b[1] - a[1], b[0] - a[0])
    ang = (ang + math.pi) % (2 * math.pi) - math.pi
    r = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    return math.degrees(ang), (A + B) / 2 - r @ ((a + b) / 2)


def fit_two_point(fit: SliceFit, *, min_separation: float) -> SliceFit:
    """Two best matches (lowest Hamming distance) at least ``min_separation`` apart."""
    if fit.n_matches < 2:
        fit.reason = f"{fit.n_matches} matches"
        return fit
    src, dst = fit.all_src, fit.all_dst
    for j in range(1, len(src)):
        if np.hypot(*(src[j] - src[0])) >= min_separation:
            fit.angle_deg, t = two_point_estimate(src[0], src[j], dst[0], dst[j])
            fit.t_grid = (float(t[0]), float(t[1]))
            fit.src, fit.dst = src[[0, j]], dst[[0, j]]
            fit.ok = True
            return fit
    fit.reason = "no two matches far enough apart"
    return fit


def two_point_failure_rate(src: np.ndarray, dst: np.ndarray, true_angle_deg: float, *,
                           n_pairs: int = 2000, tol_deg: float = 5.0, min_separation: float = 0,
                           seed: int = 0) -> float:
    """Fraction of random match pairs whose Eq. 1 angle is off by more than ``tol_deg``."""
    rng = np.random.default_rng(seed)
    if len(src) < 2:
        return float("nan")
    bad = n = 0
    for _ in range(n_pairs):
        i, j = rng.choice(len(src), 2, replace=False)
        if np.hypot(*(src[i] - src[j])) < max(min_separation, 1e-6):
            continue
        ang, _ = two_point_estimate(src[i], src[j], dst[i], dst[j])
        n += 1
        bad += abs((ang - true_angle_deg + 180) % 360 - 180) > tol_deg
    return bad / n if n else float("nan")


# ----------------------------------------------------------------------------- registration
def motion_of(rigid: Rigid, hr_shape_yx: Sequence[int]) -> tuple[float, np.ndarray]:
    """``rigid`` (LR -> HR) as simulate's motion: (angle_deg, shift in HR px) with
    p_lr = R(angle) (p_hr - c) + c + shift, c the HR field's centre."""
    c = np.array([hr_shape_yx[1], hr_shape_yx[0]], float) / 2
    a = math.radians(rigid.angle_deg)
    r_inv = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return -rigid.angle_deg, r_inv @ (c - np.asarray(rigid.t_hr)) - c


def rigid_from_motion(angle_deg: float, shift_hr_px: Sequence[float], factor: int,
                      hr_shape_yx: Sequence[int]) -> Rigid:
    """The inverse of :func:`motion_of`: simulate's motion (p_lr = R(angle) (p_hr - c) + c +
    shift, HR px) as the LR -> HR :class:`Rigid`, p_hr = R(-angle) (p_lr - c - shift) + c."""
    c = np.array([hr_shape_yx[1], hr_shape_yx[0]], float) / 2
    a = math.radians(-angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    t = c - r @ (c + np.asarray(shift_hr_px, float))
    return Rigid(angle_deg=-angle_deg, t_hr=(float(t[0]), float(t[1])), factor=factor)


def read_simulated_motion(path: str | Path) -> tuple[float, list[float]]:
    """(rotation_deg, shift_um) from a ``simulation.json`` written by ``simulate``."""
    try:
        truth = json.loads(Path(path).read_text())
        return float(truth["rotation_deg"]), [float(v) for v in truth["shift_um"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"not a readable simulation.json with rotation_deg and shift_um ({e})",
                        path) from e


def registration_from_motion(lr, hr, opts: "PairOptions", scan_id: str, angle_deg: float,
                             shift_um: Sequence[float]) -> "Registration":
    """A known motion (e.g. ``simulate``'s ``simulation.json``) as a :class:`Registration`,
    for simulated scans too blurred or noisy for A-KAZE; patches are still NCC-screened."""
    sx = hr_pixel_um(lr, hr, opts.factor)
    if sx is None:
        raise UserError("a known motion in um needs the HR voxel size: pass --hr-spacing-um",
                        _path(hr))
    rigid = rigid_from_motion(angle_deg, [v / sx for v in shift_um], opts.factor, hr.shape[1:])
    return Registration(scan_id=scan_id, method="known-motion", rigid=rigid, z_offset=0,
                        inliers=0, slices_used=[], slices_sampled=0, z_ncc={},
                        grid_upsample=grid_upsample(lr.shape[1:], opts.factor, opts.match_size),
                        ncc=0.0, hr_spacing_um=sx, hr_shape_yx=tuple(hr.shape[1:]))


@dataclass
class Registration:
    scan_id: str
    method: str
    rigid: Rigid
    z_offset: int
    inliers: int
    slices_used: list[int]
    slices_sampled: int
    grid_upsample: int
    z_ncc: dict[int, float]
    ncc: float
    hr_spacing_um: float | None
    hr_shape_yx: tuple[int, int]
    best: SliceFit | None = None
    per_slice: bool = False

    def motion(self) -> tuple[float, np.ndarray]:
        """(angle_deg, shift in HR px) in simulate's convention (see CONVENTIONS)."""
        return motion_of(self.rigid, self.hr_shape_yx)

    def to_json(self) -> dict:
        """The ``registration.json`` object for this scan."""
        sx = self.hr_spacing_um
        angle, shift = self.motion()
        m = np.hstack([self.rigid.factor * self.rigid.rotation(),
                       np.asarray(self.rigid.t_hr)[:, None]])
        return {
            "scan_id": self.scan_id,
            "method": self.method,
            "angle_deg": round(angle, 4),
            "shift_um": None if sx is None else [round(float(v) * sx, 3) for v in shift],
            "z_offset_hr_slices": int(self.z_offset),
            "inliers": int(self.inliers),
            "slices_used": [int(k) for k in self.slices_used],
            "shift_hr_px": [round(float(v), 3) for v in shift],
            "lr_to_hr_px": np.round(m, 6).tolist(),
            "factor": self.rigid.factor,
            "hr_pixel_um": sx,
            "registration_ncc": round(self.ncc, 4),
            "slices_sampled": self.slices_sampled,
            "match_grid_lr_upsample": self.grid_upsample,
            "refined_per_slice": self.per_slice,
            "conventions": CONVENTIONS,
        }


@dataclass
class PairOptions:
    factor: int = 8
    lr_patch: int = 40
    method: str = "ransac"
    z_search: int = 16
    min_ncc: float = 0.5
    max_patches_per_slice: int = 3
    n_slices: int = 24
    match_size: int = 512
    ratio: float = 0.8
    min_inliers: int = 8
    max_scale_error: float = 0.05
    ransac_threshold_lr_px: float = 0.75
    min_registration_ncc: float = 0.3
    refine: bool = True
    refine_per_slice: bool = False
    jobs: int = 2
    seed: int = 0
    quiet: bool = False
    qc_png: bool = False


class _Reader:
    """Thread-safe slice access to the two volumes (volume readers need not be thread safe),
    with an LRU cache of area-downsampled HR slices (the registration revisits them)."""

    def __init__(self, lr, hr, cache_mb: int = 384):
        self.lr, self.hr = lr, hr
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes, self._max_bytes = 0, cache_mb * 2 ** 20

    def lr_slice(self, k: int) -> np.ndarray:
        with self._lock:
            return np.asarray(self.lr.read(k, k + 1))[0]

    def hr_slices(self, z0: int, z1: int) -> np.ndarray:
        with self._lock:
            return np.asarray(self.hr.read(z0, z1))

    def hr_down(self, z: int, d: int) -> np.ndarray:
        """HR slice ``z`` area-downsampled by ``d`` (float32, cached)."""
        with self._lock:
            if (z, d) in self._cache:
                self._cache.move_to_end((z, d))
                return self._cache[(z, d)]
            raw = np.asarray(self.hr.read(z, z + 1))[0]
        img = area_down(raw, d)
        if img is raw:
            img = img.copy()
        with self._lock:
            self._cache[(z, d)] = img
            self._bytes += img.nbytes
            while self._bytes > self._max_bytes and len(self._cache) > 1:
                self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return img

    def hr_slab_down(self, z0: int, z1: int, d: int) -> np.ndarray:
        """Mean of HR slices [z0, z1) area-downsampled by ``d`` (= downsampled slab mean)."""
        return np.mean([self.hr_down(z, d) for z in range(z0, z1)], axis=0, dtype=np.float32)


def grid_upsample(lr_shape_yx: Sequence[int], factor: int, match_size: int) -> int:
    """Smallest power-of-two ``u`` <= factor with min(LR size) * u >= match_size (common grid:
    LR x u, HR / (factor / u)). u = factor means 'LR upsampled x8', u = 1 'HR downsampled x8'."""
    u = 1
    while u < factor and min(lr_shape_yx) * u < match_size and factor % (u * 2) == 0:
        u *= 2
    return u


def valid_lr_slices(n_lr: int, n_hr: int, factor: int, z_lo: int, z_hi: int) -> list[int]:
    """LR slices whose HR slab lies inside HR for every offset in [z_lo, z_hi]."""
    return [k for k in range(n_lr) if factor * k + z_lo >= 0 and factor * k + z_hi + factor <= n_hr]


def _sample(ks: list[int], n: int) -> list[int]:
    if len(ks) <= n:
        return list(ks)
    idx = np.unique(np.round(np.linspace(0, len(ks) - 1, n)).astype(int))
    return [ks[i] for i in idx]


class _Matcher:
    """Detects and matches LR slices against HR slabs on the common grid (caches LR features)."""

    def __init__(self, reader: _Reader, opts: PairOptions, u: int):
        self.r, self.o, self.u = reader, opts, u
        self.d = opts.factor // u
        self._lr_cache: dict[int, tuple[np.ndarray, Features]] = {}
        self._lock = threading.Lock()

    def lr_features(self, k: int) -> tuple[np.ndarray, Features]:
        with self._lock:
            if k in self._lr_cache:
                return self._lr_cache[k]
        img = stretch_u8(cubic_up(self.r.lr_slice(k), self.u))
        out = (img, detect(img))
        with self._lock:
            self._lr_cache[k] = out
        return out

    def hr_features(self, k: int, z0: int) -> tuple[np.ndarray, Features]:
        f = self.o.factor
        img = stretch_u8(self.r.hr_slab_down(f * k + z0, f * k + z0 + f, self.d))
        return img, detect(img)

    def fit(self, k: int, z0: int, method: str | None = None) -> SliceFit:
        _, fl = self.lr_features(k)
        _, fh = self.hr_features(k, z0)
        m = match(fl, fh, self.o.ratio)
        fit = SliceFit(k, z0, len(m))
        if len(m):
            fit.all_src = fl.pts[m[:, 0].astype(int)]
            fit.all_dst = fh.pts[m[:, 1].astype(int)]
        if (method or self.o.method) == "two-point":
            size = min(self._lr_cache[k][0].shape)
            return fit_two_point(fit, min_separation=0.1 * size)
        return fit_ransac(fit, min_inliers=self.o.min_inliers,
                          max_scale_error=self.o.max_scale_error,
                          threshold_px=max(2.0, self.o.ransac_threshold_lr_px * self.u),
                          seed=self.o.seed + k)

    def fit_many(self, pairs: list[tuple[int, int]], method: str | None = None
                 ) -> list[SliceFit]:
        with ThreadPoolExecutor(max(1, self.o.jobs)) as ex:
            return list(ex.map(lambda kz: self.fit(*kz, method=method), pairs))


def combine(fits: list[SliceFit], method: str, factor: int, d: int, u: int,
            max_angle_dev: float = 2.0) -> tuple[Rigid, list[SliceFit]]:
    """One rigid transform per scan from per-slice fits.

    ransac: slices whose angle is within ``max_angle_dev`` of the median angle pool their
    inliers, then a rigid least-squares fit with residual trimming (3 x MAD, >= 1 grid px).
    two-point: median of the per-slice angles and shifts."""
    good = [f for f in fits if f.ok]
    if not good:
        return Rigid(float("nan"), (float("nan"),) * 2, factor), []
    angles = np.array([f.angle_deg for f in good])
    # consensus: the slice angle with most others within max_angle_dev (circular), then median
    diff = np.abs((angles[:, None] - angles[None, :] + 180) % 360 - 180)
    centre = angles[int(np.argmax((diff <= max_angle_dev).sum(1)))]
    dev = np.abs((angles - centre + 180) % 360 - 180)
    med = float(centre + np.median(((angles - centre + 180) % 360 - 180)[dev <= max_angle_dev]))
    dev = np.abs((angles - med + 180) % 360 - 180)
    good = [f for f, dv in zip(good, dev) if dv <= max_angle_dev]
    if method == "two-point":
        # each slice's shift re-derived at the median angle (shifts at different angles differ)
        a = math.radians(med)
        r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        ts = np.array([f.dst.mean(0) - r @ f.src.mean(0) for f in good])
        ang, t = med, np.median(ts, axis=0)
        used = good
    else:
        used = good
        src = np.concatenate([f.src for f in used])
        dst = np.concatenate([f.dst for f in used])
        keep = np.ones(len(src), bool)
        for _ in range(5):
            ang, t = fit_rigid(src[keep], dst[keep])
            rig = Rigid(ang, tuple(t), 1)
            res = np.hypot(*(rig.lr_to_hr(src) - dst).T)
            mad = np.median(np.abs(res[keep] - np.median(res[keep])))
            new = res <= max(1.0, np.median(res[keep]) + 3 * 1.4826 * mad)
            if new.sum() < 3 or np.array_equal(new, keep):
                break
            keep = new
        ang, t = fit_rigid(src[keep], dst[keep])
    # common grid: c_lr = u * P_lr, c_hr = P_hr / d  =>  P_hr = factor R P_lr + d t
    return Rigid(float(ang), (float(t[0] * d), float(t[1] * d)), factor), used


def warp_lr_to_hr_grid(lr_slice: np.ndarray, rigid: Rigid, out_shape: tuple[int, int]
                       ) -> np.ndarray:
    """LR slice mapped onto the HR scan's orientation at LR pixel size (HR / factor); outside
    pixels are NaN."""
    cv2 = _cv2()
    r = rigid.rotation()
    t = np.asarray(rigid.t_hr) / rigid.factor
    # corner coords Q = R P + t; cv2 uses centre coords (corner - 0.5)
    m = np.hstack([r, (r @ [0.5, 0.5] + t - 0.5)[:, None]]).astype(np.float64)
    return cv2.warpAffine(lr_slice.astype(np.float32), m, (out_shape[1], out_shape[0]),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=float("nan"))


def z_profile(reader: _Reader, ks: list[int], rigid: Rigid, offsets: list[int],
              n_hr: int, jobs: int) -> dict[int, float]:
    """Mean NCC over ``ks`` between the warped LR slice and each candidate HR slab mean."""
    f = rigid.factor
    lo, hi = min(offsets), max(offsets)

    def one(k: int) -> dict[int, float]:
        z_a, z_b = max(0, f * k + lo), min(n_hr, f * k + hi + f)
        down = np.stack([reader.hr_down(z, f) for z in range(z_a, z_b)])
        warped = warp_lr_to_hr_grid(reader.lr_slice(k), rigid, down.shape[1:])
        valid = np.isfinite(warped)
        valid[[0, -1], :] = valid[:, [0, -1]] = False
        if valid.sum() < 16:
            return {}
        csum = np.concatenate([np.zeros((1,) + down.shape[1:], np.float64),
                               np.cumsum(down, axis=0, dtype=np.float64)])
        out = {}
        for z0 in offsets:
            a, b = f * k + z0 - z_a, f * k + z0 + f - z_a
            if a >= 0 and f * k + z0 + f <= z_b:
                out[z0] = ncc(warped[valid], ((csum[b] - csum[a]) / f)[valid])
        return out

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        per = list(ex.map(one, ks))
    return {z0: float(np.mean([p[z0] for p in per if z0 in p]))
            for z0 in offsets if any(z0 in p for p in per)}


def _slice_ncc(lr_slice: np.ndarray, hr_small: np.ndarray, rigid: Rigid,
               mask: np.ndarray | None = None) -> float:
    """NCC of the LR slice warped onto ``hr_small`` (HR orientation, LR pixel size), over
    ``mask`` (default: where the warp is defined, less one pixel)."""
    warped = warp_lr_to_hr_grid(lr_slice, rigid, hr_small.shape)
    valid = np.isfinite(warped)
    if mask is None:
        valid[[0, -1], :] = valid[:, [0, -1]] = False
    else:
        valid &= mask
    return ncc(warped[valid], hr_small[valid]) if valid.sum() >= 16 else 0.0


def _fixed_mask(lr_slice: np.ndarray, shape: tuple[int, int], rigid: Rigid, margin: int
                ) -> np.ndarray:
    """Where the LR warp is defined at ``rigid``, eroded by ``margin`` px, away from the
    HR border: a fixed region, so the cost does not jump as the warp's edge moves."""
    from scipy import ndimage

    valid = np.isfinite(warp_lr_to_hr_grid(lr_slice, rigid, shape))
    valid = ndimage.binary_erosion(valid, iterations=margin)
    valid[:margin], valid[-margin:], valid[:, :margin], valid[:, -margin:] = (False,) * 4
    return valid


def refine_ncc(reader: _Reader, ks: list[int], rigid: Rigid, z0: int,
               lr_shape_yx: Sequence[int], max_change_lr_px: float = 2.0,
               blur_lr_px: float = 1.0, margin: int = 3, warn: bool = True) -> Rigid:
    """Polish the feature-based transform by maximising the mean NCC between the warped LR
    slices and the HR slab means at LR pixel size, blurred by ``blur_lr_px`` (a scanner's LR is
    blurrier than a box average; matching the blur smooths the cost), by Nelder-Mead over the
    angle about the LR centre and the shift. Kept only when it moves the LR corners by less
    than ``max_change_lr_px``."""
    from scipy.optimize import minimize

    cv2 = _cv2()
    f = rigid.factor
    data = []
    for k in ks:
        hr_small = cv2.GaussianBlur(reader.hr_slab_down(f * k + z0, f * k + z0 + f, f), (0, 0),
                                    blur_lr_px)
        lr_k = reader.lr_slice(k).astype(np.float32)
        data.append((lr_k, hr_small, _fixed_mask(lr_k, hr_small.shape, rigid, margin)))
    c = np.array([lr_shape_yx[1], lr_shape_yx[0]], float) / 2

    def make(p: np.ndarray) -> Rigid:
        ang = rigid.angle_deg + p[0]
        r0 = rigid.rotation()
        r1 = Rigid(ang, (0, 0), f).rotation()
        t = np.asarray(rigid.t_hr) + f * (r0 - r1) @ c + p[1:] * f
        return Rigid(float(ang), (float(t[0]), float(t[1])), f)

    def cost(p: np.ndarray) -> float:
        rg = make(p)
        return -float(np.mean([_slice_ncc(a, b, rg, m) for a, b, m in data]))

    res = minimize(cost, np.zeros(3), method="Nelder-Mead",
                   options={"initial_simplex": np.array([[0, 0, 0], [0.5, 0, 0], [0, 0.3, 0],
                                                         [0, 0, 0.3]], float),
                            "xatol": 1e-3, "fatol": 1e-6, "maxiter": 400})
    new = make(res.x)
    corners = np.array([[0, 0], [2 * c[0], 0], [0, 2 * c[1]], [2 * c[0], 2 * c[1]]])
    move = np.abs(new.lr_to_hr(corners) - rigid.lr_to_hr(corners)).max() / f
    if not res.fun < cost(np.zeros(3)):
        return rigid
    if move >= max_change_lr_px:
        (log.warning if warn else log.debug)("NCC refinement moved the transform by %.1f LR px; kept the feature fit",
                    move)
        return rigid
    return new


def check_inputs(lr, hr, opts: PairOptions) -> None:
    """Sizes and pixel sizes about ``factor`` apart; enough slices; a known method."""
    f = opts.factor
    if opts.method not in METHODS:
        raise UserError(f"unknown --method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if f < 2:
        raise UserError(f"--factor must be >= 2, got {f}")
    for name, vol in (("LR", lr), ("HR", hr)):
        if len(vol.shape) != 3 or min(vol.shape) < 1:
            raise UserError(f"{name} is not a 3D volume (shape {vol.shape})", _path(vol))
    for ax, name in ((1, "height"), (2, "width")):
        ratio = hr.shape[ax] / lr.shape[ax]
        if not f / 2 <= ratio <= 2 * f:
            raise UserError(
                f"HR {name} {hr.shape[ax]} px is {ratio:.2f}x the LR {name} {lr.shape[ax]} px; "
                f"with --factor {f} the scans should be about {f}x apart (allowed {f / 2:g}x to "
                f"{2 * f:g}x). Check that LR and HR are not swapped and --factor is right", _path(lr))
    sl, sh = getattr(lr, "spacing_um", None), getattr(hr, "spacing_um", None)
    if sl and sh:
        ratio = sl[2] / sh[2]
        if abs(ratio / f - 1) > 0.15:
            raise UserError(
                f"LR pixel {sl[2]:g} um is {ratio:.2f}x the HR pixel {sh[2]:g} um, not "
                f"--factor {f}; give --factor {round(ratio)} or fix the spacing", _path(lr))
    if hr.shape[0] < f:
        raise UserError(f"HR has {hr.shape[0]} slices, fewer than one LR slice ({f})", _path(hr))
    p = opts.lr_patch
    if p < 4 or p % 2 or p > min(lr.shape[1:]):
        raise UserError(f"--lr-patch {p} must be even, >= 4 and fit in the LR slice "
                        f"{lr.shape[2]}x{lr.shape[1]}", _path(lr))


def hr_pixel_um(lr, hr, factor: int) -> float | None:
    """HR in-plane (x) pixel size, or LR's / factor, or None."""
    sh = getattr(hr, "spacing_um", None)
    if sh:
        return float(sh[2])
    sl = getattr(lr, "spacing_um", None)
    return float(sl[2]) / factor if sl else None


def register(lr, hr, opts: PairOptions, scan_id: str = "scan") -> Registration:
    """Rigid in-plane transform + Z offset of LR relative to HR (see the module docstring)."""
    f, zs = opts.factor, max(0, opts.z_search)
    reader = _Reader(lr, hr)
    u = grid_upsample(lr.shape[1:], f, opts.match_size)
    mt = _Matcher(reader, opts, u)
    n_lr, n_hr = lr.shape[0], hr.shape[0]
    # 1. coarse Z (steps of a quarter LR slice) by the RANSAC inlier count on a few slices
    step = max(1, f // 4)
    coarse = [z for z in range(-(zs // step) * step, zs + 1, step)
              if valid_lr_slices(n_lr, n_hr, f, z, z)]
    if not coarse:
        raise UserError(f"no LR slice fits inside the HR scan's {n_hr} slices with "
                        f"--z-search {zs}: the scans do not overlap in Z", _path(hr))
    z_c = coarse[0]
    if len(coarse) > 1:
        score = {}
        ks_c = valid_lr_slices(n_lr, n_hr, f, min(coarse), max(coarse))
        # slice-major order keeps the HR cache's working set small
        todo = [(k, z) for k in _sample(ks_c, 6) for z in coarse] if ks_c else \
            [(k, z) for z in coarse for k in _sample(valid_lr_slices(n_lr, n_hr, f, z, z), 6)]
        fits = mt.fit_many(todo, method="ransac")
        for z in coarse:
            score[z] = float(np.mean([len(x.src) + 1e-3 * x.n_matches
                                      for x in fits if x.z_offset == z]))
        z_c = max(score, key=score.get)
        log.debug("coarse Z offset scores %s", score)
    # 2. in-plane fit at the coarse offset
    ks = _sample(valid_lr_slices(n_lr, n_hr, f, z_c, z_c), opts.n_slices)
    rigid, used = combine(mt.fit_many([(k, z_c) for k in ks]), opts.method, f, mt.d, u)
    _check_fit(used, ks, opts, lr, hr)
    refine = opts.method == "ransac" and opts.refine

    def polish(rg: Rigid, z: int) -> Rigid:
        ks_z = _sample(valid_lr_slices(n_lr, n_hr, f, z, z), opts.n_slices)
        return refine_ncc(reader, ks_z, rg, z, lr.shape[1:]) if refine else rg

    rigid = polish(rigid, z_c)
    # 3. fine Z by NCC around the coarse offset (slices valid for every candidate)
    z0, prof = z_c, {}
    for _ in range(2):
        offsets = [z for z in range(z0 - f, z0 + f + 1) if -zs <= z <= zs]
        prof = z_profile(reader, _z_slices(n_lr, n_hr, f, offsets, opts.n_slices), rigid,
                         offsets, n_hr, opts.jobs)
        if not prof:
            raise UserError("the registered LR and HR fields of view do not overlap", _path(lr))
        z_new = max(prof, key=prof.get)
        if z_new == z0:
            break
        z0 = z_new
        # 4. in-plane fit again at the fine offset
        if refine:
            rigid = polish(rigid, z0)
        else:
            ks = _sample(valid_lr_slices(n_lr, n_hr, f, z0, z0), opts.n_slices)
            rigid2, used2 = combine(mt.fit_many([(k, z0) for k in ks]), opts.method, f, mt.d, u)
            if len(used2) >= len(used) // 2 and len(used2) >= 1:
                rigid, used = rigid2, used2
    reg_ncc = z_profile(reader, [x.lr_slice for x in used], rigid, [z0], n_hr, opts.jobs)
    r_ncc = reg_ncc.get(z0, float("nan"))
    if not r_ncc >= opts.min_registration_ncc:
        raise UserError(
            f"registration failed: after alignment LR and HR correlate with NCC {r_ncc:.2f} < "
            f"{opts.min_registration_ncc} (the matches are inconsistent or the fields of view "
            "do not overlap)", _path(lr))
    best = max(used, key=lambda x: len(x.src))
    return Registration(scan_id, opts.method, rigid, z0, sum(len(x.src) for x in used),
                        sorted(x.lr_slice for x in used), len(ks), u, prof, r_ncc,
                        hr_pixel_um(lr, hr, f), tuple(hr.shape[1:]), best,
                        opts.refine_per_slice)


def _z_slices(n_lr: int, n_hr: int, f: int, offsets: list[int], n: int) -> list[int]:
    """Up to ``n`` LR slices valid for every offset (or, failing that, for some)."""
    ks = valid_lr_slices(n_lr, n_hr, f, min(offsets), max(offsets))
    return _sample(ks or list(range(n_lr)), n)


def _check_fit(used: list[SliceFit], ks: list[int], opts: PairOptions, lr, hr) -> None:
    need = max(1, min(3, len(ks) // 4)) if opts.method == "ransac" else max(1, len(ks) // 4)
    if len(used) < need:
        raise UserError(
            f"too few matches between LR and HR: {len(used)} of {len(ks)} sampled slices gave "
            f"a consistent {opts.method} fit (need {need}); the scans may show different "
            "regions (fields of view that do not overlap), a wrong --factor or a wrong "
            "--z-search", _path(lr))


# ----------------------------------------------------------------------------- patches
@dataclass
class Patch:
    lr_slice: int
    hr_slice: int
    lr_x: float
    lr_y: float
    hr_x: float
    hr_y: float
    ncc: float
    lr: np.ndarray
    hr: np.ndarray
    rigid: Rigid


def hr_crop(hr_slice: np.ndarray, rigid: Rigid, j0: int, i0: int, size_hr: int) -> np.ndarray:
    """HR crop in the LR orientation covering LR pixels [i0, i0+p) x [j0, j0+p) (cubic)."""
    cv2 = _cv2()
    r = rigid.rotation()
    off = r @ [0.5, 0.5] + rigid.factor * (r @ [j0, i0]) + np.asarray(rigid.t_hr) - 0.5
    m = np.hstack([r, off[:, None]])
    src = hr_slice if hr_slice.dtype in (np.uint8, np.uint16, np.float32) else \
        hr_slice.astype(np.float32)
    out = cv2.warpAffine(src, m, (size_hr, size_hr),
                         flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    if out.dtype != hr_slice.dtype:
        from .volume import to_dtype

        out = to_dtype(out, hr_slice.dtype)
    return out


def _hr_corners_inside(rigid: Rigid, j0: int, i0: int, p: int, hr_shape: tuple[int, int],
                       margin: float = 2.0) -> bool:
    c = rigid.lr_to_hr(np.array([[j0, i0], [j0 + p, i0], [j0, i0 + p], [j0 + p, i0 + p]], float))
    return bool((c[:, 0] >= margin).all() and (c[:, 0] <= hr_shape[1] - margin).all()
                and (c[:, 1] >= margin).all() and (c[:, 1] <= hr_shape[0] - margin).all())


def slice_patches(lr_slice: np.ndarray, hr_slice: np.ndarray, k: int, hr_k: int, rigid: Rigid,
                  opts: PairOptions, u: int, points: np.ndarray | None = None
                  ) -> tuple[list[Patch], dict[str, int]]:
    """Candidate centres (A-KAZE keypoints of the LR slice, strongest first), kept when both
    crops lie inside their fields of view, the NCC passes and no kept patch is closer than
    half a patch."""
    p, f = opts.lr_patch, opts.factor
    stats = {"candidates": 0, "outside": 0, "low_ncc": 0, "duplicates": 0}
    if points is None:
        points = detect(stretch_u8(cubic_up(lr_slice, u))).pts / u
    kept: list[Patch] = []
    tried = 0
    for x, y in points:
        j0, i0 = round(float(x) - p / 2), round(float(y) - p / 2)
        stats["candidates"] += 1
        if j0 < 0 or i0 < 0 or j0 + p > lr_slice.shape[1] or i0 + p > lr_slice.shape[0] or \
                not _hr_corners_inside(rigid, j0, i0, p, hr_slice.shape):
            stats["outside"] += 1
            continue
        cx, cy = j0 + p / 2, i0 + p / 2
        if any(math.hypot(cx - q.lr_x, cy - q.lr_y) < p / 2 for q in kept):
            stats["duplicates"] += 1
            continue
        if tried >= 8 * opts.max_patches_per_slice:
            break
        tried += 1
        lr_c = lr_slice[i0:i0 + p, j0:j0 + p]
        hr_c = hr_crop(hr_slice, rigid, j0, i0, p * f)
        score = ncc(cubic_up(lr_c, f), hr_c)
        if score < opts.min_ncc:
            stats["low_ncc"] += 1
            continue
        hx, hy = rigid.lr_to_hr(np.array([[cx, cy]]))[0]
        kept.append(Patch(k, hr_k, cx, cy, float(hx), float(hy), score, lr_c.copy(), hr_c,
                          rigid))
        if len(kept) >= opts.max_patches_per_slice:
            break
    return kept, stats


def iter_patches(lr, hr, reg: Registration, opts: PairOptions,
                 on_slice: Callable[[], None] | None = None) -> Iterable[tuple[list[Patch], dict]]:
    """Patches of every LR slice whose HR slab lies inside HR, in slice order (2 threads)."""
    f, z0 = opts.factor, reg.z_offset
    reader = _Reader(lr, hr)
    ks = valid_lr_slices(lr.shape[0], hr.shape[0], f, z0, z0)

    def one(k: int):
        hr_k = f * k + z0 + f // 2
        rigid = reg.rigid
        if opts.refine_per_slice:
            rigid = refine_ncc(reader, [k], rigid, z0, lr.shape[1:], max_change_lr_px=1.5,
                               warn=False)
        out = slice_patches(reader.lr_slice(k), reader.hr_slices(hr_k, hr_k + 1)[0], k, hr_k,
                            rigid, opts, reg.grid_upsample)
        if on_slice:
            on_slice()
        return out

    with ThreadPoolExecutor(max(1, opts.jobs)) as ex:
        yield from ex.map(one, ks)


# ----------------------------------------------------------------------------- output folder
def _read_index(out_dir: Path) -> tuple[list[dict], list[dict]]:
    rows, regs = [], []
    csv_p, reg_p = out_dir / "pairs.csv", out_dir / "registration.json"
    if csv_p.exists():
        with open(csv_p, newline="") as fh:
            rows = list(csv.DictReader(fh))
    if reg_p.exists():
        try:
            regs = json.loads(reg_p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON ({e}); fix or remove it", reg_p)
        if not isinstance(regs, list):
            raise UserError("expected a JSON list of per-scan objects", reg_p)
    return rows, regs


def scan_exists(out_dir: Path, scan_id: str) -> bool:
    """True when OUT_DIR already holds patches or a registration for ``scan_id``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return False
    rows, regs = _read_index(out_dir)
    return (any(r.get("scan_id") == scan_id for r in rows)
            or any(g.get("scan_id") == scan_id for g in regs)
            or (out_dir / "lr" / f"{scan_id}_00000.tif").exists())


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _commit(out_dir: Path, tmp: Path, scan_id: str, rows: list[dict], reg: dict,
            overwrite: bool) -> None:
    """Replace this scan's patches/rows/registration by the new ones; other scans untouched."""
    with open(out_dir / ".microct-sr-pair.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old_rows, old_regs = _read_index(out_dir)
        if not overwrite and scan_exists(out_dir, scan_id):
            raise UserError(f"scan id {scan_id!r} is already in {out_dir}; use --overwrite to "
                            "replace it or choose another --scan-id", out_dir)
        for sub in ("lr", "hr"):
            (out_dir / sub).mkdir(exist_ok=True)
            for r in old_rows:
                if r.get("scan_id") == scan_id:
                    (out_dir / sub / f"{r['patch_id']}.tif").unlink(missing_ok=True)
            for p in sorted((tmp / sub).iterdir()):
                os.replace(p, out_dir / sub / p.name)
        keep = [r for r in old_rows if r.get("scan_id") != scan_id]
        _atomic_text(out_dir / "pairs.csv", _csv_text(keep + rows))
        regs = [g for g in old_regs if g.get("scan_id") != scan_id] + [reg]
        _atomic_text(out_dir / "registration.json", json.dumps(regs, indent=2) + "\n")
        if (tmp / "qc.png").exists():
            (out_dir / "qc").mkdir(exist_ok=True)
            os.replace(tmp / "qc.png", out_dir / "qc" / f"{scan_id}.png")


def _csv_text(rows: list[dict]) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def pair_scans(lr, hr, out_dir: str | Path, *, scan_id: str, overwrite: bool = False,
               known_motion: tuple[float, Sequence[float]] | None = None,
               **options: Any) -> dict:
    """Register ``lr`` to ``hr`` (``Volume``s), cut patches into ``out_dir`` and return
    ``{"registration": {...}, "patches": n, ...}``. See docs/pair.md.

    ``known_motion = (rotation_deg, shift_um)`` in simulate's convention skips the registration
    (Z offset 0), for simulated scans whose truth is known."""
    import tifffile

    from .progress import progress

    opts = PairOptions(**options)
    out_dir = Path(out_dir)
    if not SCAN_ID_RE.match(scan_id or ""):
        raise UserError(f"--scan-id {scan_id!r}: use letters, digits, '.', '_' or '-' "
                        "(it names the patch files)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("OUT_DIR exists and is not a folder", out_dir)
    if not overwrite and scan_exists(out_dir, scan_id):
        raise UserError(f"scan id {scan_id!r} is already in {out_dir}; use --overwrite to "
                        "replace its patches or choose another --scan-id", out_dir)
    check_inputs(lr, hr, opts)
    if known_motion is None:
        _cv2()
        reg = register(lr, hr, opts, scan_id)
    else:
        reg = registration_from_motion(lr, hr, opts, scan_id, *known_motion)
    reg_json = reg.to_json()
    log.info("%s: registered (angle %.3f deg, shift %s HR px, Z offset %d, NCC %.3f); cutting "
             "patches", scan_id, reg_json["angle_deg"], reg_json["shift_hr_px"], reg.z_offset,
             reg.ncc)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".microct-sr-tmp-pair-{scan_id}-", dir=out_dir))
    done = False
    try:
        (tmp / "lr").mkdir()
        (tmp / "hr").mkdir()
        rows, totals = [], {"candidates": 0, "outside": 0, "low_ncc": 0, "duplicates": 0}
        n_valid = len(valid_lr_slices(lr.shape[0], hr.shape[0], opts.factor, reg.z_offset,
                                      reg.z_offset))
        bar = progress(total=n_valid, desc=f"pair {scan_id}", quiet=opts.quiet, unit="slice")
        with bar:
            for patches, st in iter_patches(lr, hr, reg, opts):
                bar.update(1)
                for k, v in st.items():
                    totals[k] += v
                for pt in patches:
                    pid = f"{scan_id}_{len(rows):05d}"
                    tifffile.imwrite(tmp / "lr" / f"{pid}.tif", pt.lr)
                    tifffile.imwrite(tmp / "hr" / f"{pid}.tif", pt.hr)
                    rows.append({"patch_id": pid, "scan_id": scan_id, "lr_slice": pt.lr_slice,
                                 "hr_slice": pt.hr_slice, "lr_x": f"{pt.lr_x:g}",
                                 "lr_y": f"{pt.lr_y:g}", "hr_x": f"{pt.hr_x:.2f}",
                                 "hr_y": f"{pt.hr_y:.2f}",
                                 "angle_deg": f"{motion_of(pt.rigid, hr.shape[1:])[0]:.4f}",
                                 "ncc": f"{pt.ncc:.4f}"})
        if not rows:
            raise UserError(
                f"no patch pair passed: {totals['candidates']} candidates, {totals['outside']} "
                f"outside a field of view, {totals['low_ncc']} below --min-ncc {opts.min_ncc}; "
                "the fields of view may barely overlap or --lr-patch is too large", _path(lr))
        reg_json["patches"] = len(rows)
        if opts.qc_png:
            from .pairing_qc import write_qc_png

            write_qc_png(tmp / "qc.png", lr, hr, reg)
        _commit(out_dir, tmp, scan_id, rows, reg_json, overwrite)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not done:
            shutil.rmtree(out_dir, ignore_errors=True)  # we made it; leave nothing behind
    nccs = np.array([float(r["ncc"]) for r in rows])
    return {"registration": reg_json, "patches": len(rows), "out_dir": str(out_dir),
            "median_ncc": float(np.median(nccs)), "rejected": totals,
            "slices": n_valid, "qc_png": str(out_dir / "qc" / f"{scan_id}.png")
            if opts.qc_png else None}
