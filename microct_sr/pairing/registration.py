"""The registration of LR to HR: per-slice fits (RANSAC or the paper's two-point Eq. 1), their
combination into one rigid transform, the NCC polish, the Z offset (:func:`register`), and a known
motion from simulate's ``simulation.json`` instead (:func:`registration_from_motion`)."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .geometry import CONVENTIONS, Rigid, fit_rigid, motion_of, rigid_from_motion
from .images import _cv2, cubic_up, ncc, stretch_u8
from .keypoints import Features, detect, match
from .scans import (
    PairOptions,
    _path,
    _Reader,
    _sample,
    grid_upsample,
    hr_pixel_um,
    valid_lr_slices,
)

log = logging.getLogger(__name__)


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
    # measured as for a ransac fit (reported, not checked: the motion is known)
    ks = _sample(valid_lr_slices(lr.shape[0], hr.shape[0], opts.factor, 0, 0), opts.n_slices)
    r_ncc = z_profile(_Reader(lr, hr), ks, rigid, [0], hr.shape[0], opts.jobs).get(0, math.nan)
    return Registration(scan_id=scan_id, method="known-motion", rigid=rigid, z_offset=0,
                        inliers=0, slices_used=[], slices_sampled=len(ks), z_ncc={},
                        grid_upsample=grid_upsample(lr.shape[1:], opts.factor, opts.match_size),
                        ncc=r_ncc, hr_spacing_um=sx, hr_shape_yx=tuple(hr.shape[1:]))


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
            "registration_ncc": round(self.ncc, 4) if math.isfinite(self.ncc) else None,
            "slices_sampled": self.slices_sampled,
            "match_grid_lr_upsample": self.grid_upsample,
            "refined_per_slice": self.per_slice,
            "conventions": CONVENTIONS,
        }


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
        if not any(0 <= f * k + z0 and f * k + z0 + f <= n_hr for z0 in offsets):
            return {}  # HR holds no candidate slab of this LR slice
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
    """Up to ``n`` LR slices valid for every offset (or, failing that, for some: an HR scan
    shorter than the LR holds no slab of some LR slices at some offsets)."""
    ks = valid_lr_slices(n_lr, n_hr, f, min(offsets), max(offsets))
    some = sorted({k for z in offsets for k in valid_lr_slices(n_lr, n_hr, f, z, z)})
    return _sample(ks or some, n)


def _check_fit(used: list[SliceFit], ks: list[int], opts: PairOptions, lr, hr) -> None:
    need = max(1, min(3, len(ks) // 4)) if opts.method == "ransac" else max(1, len(ks) // 4)
    if len(used) < need:
        raise UserError(
            f"too few matches between LR and HR: {len(used)} of {len(ks)} sampled slices gave "
            f"a consistent {opts.method} fit (need {need}); the scans may show different "
            "regions (fields of view that do not overlap), a wrong --factor or a wrong "
            "--z-search", _path(lr))
