"""The inputs of a pairing: :class:`PairOptions`, the checks on the two scans, the thread-safe
slice reader (with its cache of downsampled HR slices) and which LR slices to use."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..volume.base import context_index
from .images import area_down

METHODS = ("ransac", "two-point")


def _path(vol) -> str | None:
    return getattr(vol, "path", None)


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
    context: int = 0  # LR neighbours on each side in an LR patch file (2.5D): 2N+1 pages


MAX_CONTEXT = 8


class _Reader:
    """Thread-safe slice access to the two volumes (volume readers need not be thread safe),
    with an LRU cache of area-downsampled HR slices (the registration revisits them) and a
    small one of LR slices (``--context`` patches revisit each slice's neighbours)."""

    def __init__(self, lr, hr, cache_mb: int = 384, lr_cache_slices: int = 0):
        self.lr, self.hr = lr, hr
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes, self._max_bytes = 0, cache_mb * 2 ** 20
        self._lr_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lr_cache_slices = lr_cache_slices

    def lr_slice(self, k: int) -> np.ndarray:
        with self._lock:
            return np.asarray(self.lr.read(k, k + 1))[0]

    def lr_stack(self, k: int, n: int) -> np.ndarray:
        """LR slices k-n .. k+n as a (2n+1, Y, X) array, indices clamped to the volume (edge
        slices repeated). Slices missing from the small LR cache (``lr_cache_slices``, most
        recent kept) are read in one block, so neighbouring ``k`` read each slice about once."""
        idx = context_index(k, k + 1, n, self.lr.shape[0])[0].tolist()
        with self._lock:
            missing = [z for z in idx if z not in self._lr_cache]
            read: dict[int, np.ndarray] = {}
            if missing:
                z0, z1 = min(missing), max(missing) + 1
                block = np.asarray(self.lr.read(z0, z1))
                read = {z: block[z - z0] for z in range(z0, z1)}
            have = {z: read[z] if z in read else self._lr_cache[z] for z in dict.fromkeys(idx)}
            for z, img in have.items():
                self._lr_cache[z] = img
                self._lr_cache.move_to_end(z)
            while len(self._lr_cache) > self._lr_cache_slices:
                self._lr_cache.popitem(last=False)
        return np.stack([have[z] for z in idx])

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


def coverage_warning(n_lr: int, ks: list[int], factor: int, z_offset: int) -> str | None:
    """A warning when the HR scan holds the slabs of only some LR slices ``ks`` (None when all)."""
    if len(ks) == n_lr:
        return None
    span = f"{ks[0]}-{ks[-1]}" if ks else "none"
    return (f"the HR scan covers only {len(ks)} of the {n_lr} LR slices (LR slices {span} at "
            f"Z offset {z_offset} HR slices, {factor} HR slices each): patches are cut from "
            "those only")


def _sample(ks: list[int], n: int) -> list[int]:
    if len(ks) <= n:
        return list(ks)
    idx = np.unique(np.round(np.linspace(0, len(ks) - 1, n)).astype(int))
    return [ks[i] for i in idx]


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
    if not 0 <= opts.context <= MAX_CONTEXT:
        raise UserError(f"--context {opts.context} must be 0 to {MAX_CONTEXT}")
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
