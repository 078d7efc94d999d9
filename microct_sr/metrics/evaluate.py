"""Evaluation of SR volumes against their HR scan: fidelity, perceptual and morphometry metrics
(the engine of ``microct-sr evaluate``).

:func:`evaluate_volume` streams the SR volume slice by slice against the matching HR slices
and returns an :class:`EvalResult` (the JSON summary of ``microct-sr evaluate --json``, the
per-slice rows and the raw values for plots). pyiqa is imported only when a perceptual metric
(NIQE, Ma, PI) is asked for, through :mod:`.perceptual`.

SR grid (docs/architecture.md): LR pixel (i, j) covers HR pixels [8i, 8i+8) x [8j, 8j+8) and
LR slice k covers HR slices [8k, 8k+8). An SR volume from ``upscale`` has the LR's slice count;
its slice k is compared with HR slice 8k+4 (the middle of that slab; ``hr_slice="mean"`` uses
the slab mean instead). An SR volume of HR's shape is compared slice by slice.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import UserError
from . import fidelity
from .morphometry import usable_cores

log = logging.getLogger(__name__)

FACTOR = 8
ALL_METRICS = ("psnr", "ssim", "niqe", "ma", "pi", "morph")
PERCEPTUAL = frozenset({"niqe", "ma", "pi"})
HR_SLICE_MODES = ("middle", "mean")
BICUBIC_LABEL = "Bicubic"  # the row of --bicubic
MORPH_MAX_VOXELS = 16_000_000  # morphometry on a central window beyond this (time, memory)
OTSU_MAX_SAMPLES = 4_000_000  # HR voxels kept for the Otsu histogram of non-integer-binned dtypes


class VolumeLike(Protocol):
    """What the evaluation reads: ``microct_sr.volume.Volume`` or :class:`BicubicVolume`."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    spacing_um: tuple[float, float, float] | None

    def read(self, z0: int, z1: int) -> np.ndarray: ...


# ---------------------------------------------------------------------------- option parsing

def parse_metrics(text: str | None) -> tuple[set[str], bool]:
    """``"psnr,ssim"`` -> ({"psnr", "ssim"}, True); ``None`` -> (all, False). UserError if unknown."""
    if text is None or not text.strip():
        return set(ALL_METRICS), False
    names = {n.strip().lower() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(ALL_METRICS))
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)} in --metrics "
                        f"(choose from {', '.join(ALL_METRICS)})")
    return names, True


def check_labels(labels: list[str]) -> None:
    """UserError when two methods share a label (case-insensitive): their rows would merge."""
    seen: dict[str, str] = {}
    for label in labels:
        first = seen.get(label.casefold())
        if first is not None:
            same = f"{label!r} twice" if first == label else f"{first!r} and {label!r}"
            raise UserError(f"two methods are labelled {same} (labels are case-insensitive; the "
                            f"--bicubic row is {BICUBIC_LABEL!r}): give each --sr NAME=PATH "
                            "(or --label) a distinct name")
        seen[label.casefold()] = label


def parse_slices(text: str | None) -> tuple[int | None, int | None] | None:
    """``"A:B"`` (either may be empty) -> (A, B) in SR slice indices; UserError if malformed."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise UserError(f"--slices {text!r}: expected A:B (SR slice indices, B exclusive)")
    return a, b


# ---------------------------------------------------------------------------- grids

@dataclass(frozen=True)
class Grid:
    """How SR slices map onto HR: ``factor_z`` is 1 (same shape) or 8 (SR from ``upscale``).

    ``n_hr`` is HR's slice count: with an LR grid rounded up (``simulate`` of an HR whose
    slice count is not a multiple of 8) the last SR slice may have no HR slice to compare."""

    factor_z: int
    n_slices: int
    height: int
    width: int
    hr_cropped: bool
    n_hr: int

    def hr_range(self, k: int, mode: str) -> tuple[int, int]:
        """HR slices [z0, z1) compared with SR slice ``k``."""
        if self.factor_z == 1:
            return k, k + 1
        z0 = self.factor_z * k
        if mode == "mean":
            return z0, z0 + self.factor_z
        return z0 + self.factor_z // 2, z0 + self.factor_z // 2 + 1

    def n_comparable(self, mode: str) -> int:
        """SR slices 0..n-1 whose HR slices (``hr_range``) all exist."""
        return sum(1 for k in range(self.n_slices) if self.hr_range(k, mode)[1] <= self.n_hr)

    def describe(self, mode: str) -> str:
        if self.factor_z == 1:
            text = "SR and HR have the same slice count: SR slice k is compared with HR slice k"
        elif mode == "mean":
            text = (f"SR slice k (one per LR slice) is compared with the mean of HR slices "
                    f"[{FACTOR}k, {FACTOR}k+{FACTOR}), the slab LR slice k covers")
        else:
            text = (f"SR slice k (one per LR slice) is compared with HR slice {FACTOR}k+"
                    f"{FACTOR // 2}, the middle of the slab [{FACTOR}k, {FACTOR}k+{FACTOR}) "
                    "that LR slice k covers")
        m = self.n_comparable(mode)
        if m < self.n_slices:
            left = f"slice {m}" if m == self.n_slices - 1 else f"slices {m}..{self.n_slices - 1}"
            text += (f"; SR {left} left out (not compared): HR has {self.n_hr} slices, not the "
                     f"{FACTOR * self.n_slices} of {self.n_slices} LR slices (the LR grid rounded "
                     "up, as simulate makes it), so the HR slices to compare do not exist")
        if self.hr_cropped:
            text += (f"; HR cropped in-plane to the SR extent {self.height}x{self.width} "
                     f"(its size is not a multiple of {FACTOR})")
        return text


def match_grid(sr_shape: tuple[int, ...], hr_shape: tuple[int, ...], sr_path: Any,
               hr_path: Any) -> Grid:
    """The :class:`Grid` relating SR to HR shapes; UserError when they are not related."""
    for shape, path in ((sr_shape, sr_path), (hr_shape, hr_path)):
        if len(shape) != 3 or min(shape) == 0:
            raise UserError(f"empty or not a 3D volume (shape {tuple(shape)})", path)
    n, h, w = sr_shape
    nh, hh, wh = hr_shape
    same_plane = (h, w) == (hh, wh)
    cropped_plane = (h % FACTOR == 0 and w % FACTOR == 0 and hh // FACTOR * FACTOR == h
                     and wh // FACTOR * FACTOR == w)
    if not (same_plane or cropped_plane):
        raise UserError(f"in-plane size {h}x{w} of SR {sr_path} does not match HR {hr_path} "
                        f"({hh}x{wh}); SR must have HR's in-plane size (an {FACTOR}x upscale)")
    lr_counts = sorted({nh // FACTOR, -(-nh // FACTOR)})  # LR grid rounded down or up
    if n == nh:
        factor = 1
    elif n in lr_counts:
        factor = FACTOR
    else:
        swapped = nh in sorted({n // FACTOR, -(-n // FACTOR)})
        raise UserError(f"slice count {n} of SR {sr_path} fits neither HR's {nh} slices nor "
                        f"its {FACTOR}x coarser LR grid "
                        f"({' or '.join(map(str, lr_counts))} slices)"
                        + ("; HR has the SR's LR grid: are HR and SR swapped? (evaluate SR HR)"
                           if swapped else ""))
    return Grid(factor, n, h, w, not same_plane, nh)


class BicubicVolume:
    """The bicubic 8x upscaling of an LR volume, computed slice by slice on read.

    ``align_corners=False`` (torch, a = -0.75): LR pixel (i, j) covers HR [8i, 8i+8); the
    result is clipped and rounded back to the LR dtype.
    """

    def __init__(self, lr: VolumeLike, factor: int = FACTOR):
        self.lr = lr
        self.factor = factor
        self.path = Path(lr.path)
        z, y, x = lr.shape
        self.shape = (z, y * factor, x * factor)
        self.dtype = np.dtype(lr.dtype)
        sp = lr.spacing_um
        self.spacing_um = None if sp is None else (sp[0], sp[1] / factor, sp[2] / factor)
        self.note = (f"Bicubic: {factor}x in-plane bicubic upscaling of {self.path.name} (torch, "
                     "a = -0.75, align_corners=False), clipped and rounded to its dtype")

    def read(self, z0: int, z1: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from ..volume import to_dtype

        lr = np.asarray(self.lr.read(z0, z1), dtype=np.float32)
        t = torch.from_numpy(lr)[:, None]
        up = F.interpolate(t, size=self.shape[1:], mode="bicubic", align_corners=False)
        return to_dtype(up[:, 0].numpy(), self.dtype)


# ---------------------------------------------------------------------------- options, result

@dataclass
class EvalOptions:
    """Everything :func:`evaluate_volume` needs besides the volumes."""

    metrics: set[str] = field(default_factory=lambda: set(ALL_METRICS))
    crop_border: int = 4
    slices: tuple[int | None, int | None] | None = None
    perceptual_sample: int = 16
    perceptual_crop: int = 256
    seed: int = 0
    hr_slice: str = "middle"
    spacing_um: tuple[float, float, float] | None = None  # overrides HR's spacing
    metrics_explicit: bool = False  # metrics named by the user: missing means an error
    quiet: bool = False


@dataclass
class EvalResult:
    """One method's evaluation: ``summary`` is the JSON object; ``rows`` the per-slice table."""

    label: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    values: dict[str, list[float]]


@dataclass
class Reference:
    """HR statistics shared by every method on one grid: intensity window, Otsu threshold."""

    window: tuple[float, float]
    threshold: float | None
    z_range: tuple[int, int]
    hr_morphometry: dict[str, float] | None = None  # computed once, shared by the methods


def slice_range(n: int, slices: tuple[int | None, int | None] | None) -> tuple[int, int]:
    """[start, stop) of the evaluated SR slices (Python slice semantics); UserError if empty."""
    if slices is None:
        return 0, n
    start, stop, step = slice(*slices).indices(n)
    if stop <= start:
        raise UserError(f"--slices {slices[0]}:{slices[1]} selects no slice of {n}")
    return start, stop


def compared_range(grid: Grid, opts: EvalOptions) -> tuple[int, int]:
    """[start, stop) of the SR slices evaluated: ``--slices`` less those without HR slices."""
    k0, k1 = slice_range(grid.n_slices, opts.slices)
    k1 = min(k1, grid.n_comparable(opts.hr_slice))
    if k1 <= k0:
        raise UserError(f"no selected SR slice (--slices) has its HR slice(s): "
                        f"{grid.describe(opts.hr_slice)}")
    return k0, k1


def _read_checked(vol: VolumeLike, z0: int, z1: int) -> np.ndarray:
    from ..volume import finite_slices

    return finite_slices(vol.read(z0, z1), vol.path, z0)


def _hr_slice(hr: VolumeLike, grid: Grid, k: int, mode: str) -> np.ndarray:
    z0, z1 = grid.hr_range(k, mode)
    a = _read_checked(hr, z0, z1)[:, :grid.height, :grid.width]
    return a[0] if a.shape[0] == 1 else a.astype(np.float64).mean(axis=0)


def otsu_sample(a: np.ndarray, n_slices: int, rng: np.random.Generator) -> np.ndarray:
    """float32 voxels of HR slice ``a`` for the Otsu histogram: every 2nd pixel in-plane (a
    quarter is plenty), or a seeded random sample of pixels when the quarters of ``n_slices``
    slices would exceed :data:`OTSU_MAX_SAMPLES` (random, not strided: no aliasing with a
    periodic structure)."""
    quarter = a[::2, ::2]
    per_slice = max(1, OTSU_MAX_SAMPLES // max(1, n_slices))
    if quarter.size <= per_slice:
        return quarter.astype(np.float32).ravel()
    ys = rng.integers(0, a.shape[0], per_slice)
    xs = rng.integers(0, a.shape[1], per_slice)
    return a[ys, xs].astype(np.float32)


def reference_stats(hr: VolumeLike, grid: Grid, opts: EvalOptions) -> Reference:
    """One pass over the matched HR slices: intensity window and (for morph) Otsu threshold."""
    from ..progress import progress
    from .morphometry import otsu_threshold_from_histogram

    k0, k1 = compared_range(grid, opts)
    dtype = np.dtype(hr.dtype)
    lo, hi = math.inf, -math.inf
    counts = np.zeros(1 << 16 if dtype.itemsize <= 2 and dtype.kind == "u" else 0, np.int64)
    floats = []
    rng = np.random.default_rng(0)
    for k in progress(range(k0, k1), desc="HR statistics", quiet=opts.quiet, unit="slice"):
        a = _hr_slice(hr, grid, k, opts.hr_slice)
        lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
        if "morph" in opts.metrics:
            if counts.size:
                counts += np.bincount(np.rint(a).astype(np.int64).ravel(), minlength=counts.size)
            else:  # a subsample whose total stays within OTSU_MAX_SAMPLES
                floats.append(otsu_sample(a, k1 - k0, rng))
    try:
        window = fidelity.intensity_window(dtype, lo, hi)
    except ValueError as e:
        raise UserError(str(e), hr.path)
    threshold = None
    if "morph" in opts.metrics:
        if counts.size:
            centers = np.arange(counts.size, dtype=np.float64)
        else:
            counts, edges = np.histogram(np.concatenate(floats), bins=4096, range=(lo, hi))
            centers = (edges[:-1] + edges[1:]) / 2
        try:
            threshold = otsu_threshold_from_histogram(counts, centers)
        except ValueError as e:
            raise UserError(str(e), hr.path)
    return Reference(window, threshold, (k0, k1))


# ---------------------------------------------------------------------------- evaluation

def check_pair(sr: VolumeLike, hr: VolumeLike) -> Grid:
    """The grid of an SR/HR pair; UserError when shapes or dtypes are not comparable."""
    grid = match_grid(sr.shape, hr.shape, sr.path, hr.path)
    if np.dtype(sr.dtype) != np.dtype(hr.dtype):
        raise UserError(f"SR dtype {np.dtype(sr.dtype)} differs from HR dtype "
                        f"{np.dtype(hr.dtype)} ({hr.path}): intensities are not comparable",
                        sr.path)
    return grid


def check_crop_border(grid: Grid, opts: EvalOptions) -> None:
    """UserError when ``--crop-border`` leaves nothing, or less than SSIM's window for ssim."""
    b, h, w = opts.crop_border, grid.height, grid.width
    if 2 * b >= min(h, w):
        raise UserError(f"--crop-border {b} leaves nothing of {h}x{w} slices")
    win = fidelity.SSIM_WINDOW
    if "ssim" in opts.metrics and min(h, w) - 2 * b < win:
        raise UserError(f"--crop-border {b} leaves {h - 2 * b}x{w - 2 * b} px of {h}x{w} slices, "
                        f"smaller than SSIM's {win}x{win} window; use a smaller --crop-border "
                        "or leave ssim out of --metrics")


def evaluate_volume(sr: VolumeLike, hr: VolumeLike, opts: EvalOptions, *, label: str,
                    scorer: Any = None, reference: Reference | None = None,
                    grid: Grid | None = None) -> EvalResult:
    """Evaluate one SR volume against HR. ``scorer`` is a ``perceptual.PerceptualScorer`` (or
    None when no perceptual metric is wanted or pyiqa is missing); ``reference`` may be shared
    between methods on the same grid."""
    grid = grid or check_pair(sr, hr)
    check_crop_border(grid, opts)
    reference = reference or reference_stats(hr, grid, opts)
    b = opts.crop_border
    scorer = _fit_scorer(scorer, grid, opts)
    scan = _scan(sr, hr, grid, reference, opts, scorer, label)

    notes = [grid.describe(opts.hr_slice), _intensity_note(hr, reference.window)]
    if getattr(sr, "note", None):
        notes.append(sr.note)
    if b:
        notes.append(f"PSNR/SSIM/NIQE/Ma/PI on slices with a {b}-pixel border cropped (PIRM)")
    summary: dict[str, Any] = {"n_slices": len(scan.rows)}
    values: dict[str, list[float]] = {}
    for name in ("psnr", "ssim", "niqe", "ma", "pi"):
        values[name] = scan.values.get(name, [])
        summary[name] = _stats(values[name], name, notes) if name in scan.values else None
    if scan.crops:
        notes.append(_crop_note(scan.crops, len(scan.rows), grid, opts))
    if scorer is not None:
        notes.extend(scorer.notes)
    summary["morphometry"] = (_morphometry(scan.sr_bone, scan.hr_bone, hr, grid, reference,
                                           opts, notes, label)
                              if scan.sr_bone is not None else None)
    summary["notes"] = notes
    return EvalResult(label, summary, scan.rows, values)


@dataclass
class _Scan:
    """What one pass over the slices collects."""

    rows: list[dict[str, Any]]
    values: dict[str, list[float]]  # per slice (psnr, ssim) or per crop (niqe, ma, pi)
    crops: list
    sr_bone: np.ndarray | None
    hr_bone: np.ndarray | None


def _scan(sr: VolumeLike, hr: VolumeLike, grid: Grid, reference: Reference, opts: EvalOptions,
          scorer: Any, label: str) -> _Scan:
    """One pass: per-slice PSNR/SSIM, perceptual scores of the crops, binary stacks."""
    from ..progress import progress

    k0, k1 = reference.z_range
    n, b = k1 - k0, opts.crop_border
    crops = _plan_crops(scorer, n, grid, opts)
    crop_at: dict[int, list] = {}
    for c in crops:
        crop_at.setdefault(c.z, []).append(c)
    fid = [m for m in ("psnr", "ssim") if m in opts.metrics]
    values: dict[str, list[float]] = {m: [] for m in fid}
    values.update({m: [] for m in sorted(scorer.available)} if scorer else {})
    y0, y1, x0, x1 = morph_voi(n, grid.height, grid.width)
    sr_bone = np.zeros((n, y1 - y0, x1 - x0), bool) if "morph" in opts.metrics else None
    hr_bone = None if sr_bone is None else np.zeros_like(sr_bone)
    rows: list[dict[str, Any]] = []
    # PSNR/SSIM of a slice run on worker threads (scikit-image and numpy release the GIL:
    # 1.96x on 2 cores for 1272 x 1272 SSIM) while the next slices are read; a few slices
    # in flight, results taken in slice order
    threads = max(1, min(usable_cores(), FIDELITY_THREADS)) if fid else 1
    pending: deque[tuple[dict[str, Any], Future]] = deque()

    def finish_oldest() -> None:
        row, future = pending.popleft()
        for name, v in future.result().items():
            row[name] = v
            values[name].append(v)

    with ThreadPoolExecutor(threads) as pool:
        for i, k in enumerate(progress(range(k0, k1), desc=f"evaluate {label}",
                                       quiet=opts.quiet, unit="slice")):
            s = _read_checked(sr, k, k + 1)[0]
            h = _hr_slice(hr, grid, k, opts.hr_slice)
            s255 = fidelity.crop_border(fidelity.to_255(s, reference.window), b)
            h255 = fidelity.crop_border(fidelity.to_255(h, reference.window), b)
            z0, z1 = grid.hr_range(k, opts.hr_slice)
            row: dict[str, Any] = {"label": label, "sr_slice": k, "hr_slice_start": z0,
                                   "hr_slice_stop": z1}
            pending.append((row, pool.submit(_fidelity_of, fid, s255, h255)))
            for name, vals in _score_crops(scorer, s255, crop_at.get(i, [])).items():
                values[name].extend(vals)
                finite = [v for v in vals if math.isfinite(v)]
                row[name] = float(np.mean(finite)) if finite else None
            if sr_bone is not None:
                sr_bone[i] = s[y0:y1, x0:x1] > reference.threshold
                hr_bone[i] = h[y0:y1, x0:x1] > reference.threshold
            rows.append(row)
            while len(pending) > 2 * threads:
                finish_oldest()
        while pending:
            finish_oldest()
    return _Scan(rows, values, crops, sr_bone, hr_bone)


FIDELITY_THREADS = 4  # PSNR/SSIM worker threads at most (each holds a few float64 slices)


def _fidelity_of(names: list[str], s255: np.ndarray, h255: np.ndarray) -> dict[str, float]:
    """``{name: value}`` of the fidelity metrics ``names`` (psnr, ssim) of one slice pair."""
    return {name: getattr(fidelity, name)(s255, h255) for name in names}


def make_scorer(metrics: set[str], explicit: bool, weights_dir: str | Path | None) -> Any:
    """The perceptual scorer for the wanted metrics, or None when none is wanted.

    pyiqa missing: UserError (with how to install it) when niqe/ma/pi were asked for by name,
    else an empty scorer whose note says they were skipped.
    """
    from . import perceptual

    wanted = metrics & PERCEPTUAL
    perceptual.weights_search_path(weights_dir)  # UserError if the folder is missing
    if not wanted:
        return None
    if not perceptual.pyiqa_available():
        if explicit:
            raise UserError(f"{', '.join(sorted(wanted))} need pyiqa: {perceptual.INSTALL_HINT}")
        return _NoScorer([f"NIQE/Ma/PI skipped: pyiqa is not installed; "
                          f"{perceptual.INSTALL_HINT}"])
    return perceptual.PerceptualScorer(wanted, weights_dir)


@dataclass
class _NoScorer:
    notes: list[str]
    available: frozenset = frozenset()


def _fit_scorer(scorer: Any, grid: Grid, opts: EvalOptions) -> Any:
    """The scorer, or an empty one with a note when slices are too small for NIQE (an error
    when niqe/ma/pi were asked for by name)."""
    from .perceptual import NIQE_MIN_SIDE

    side = min(grid.height, grid.width) - 2 * opts.crop_border
    if scorer is None or not scorer.available or side >= NIQE_MIN_SIDE:
        return scorer
    text = (f"slices of {grid.height}x{grid.width} less a {opts.crop_border}-pixel border are "
            f"smaller than the {NIQE_MIN_SIDE}x{NIQE_MIN_SIDE} pixels NIQE/Ma/PI need")
    if opts.metrics_explicit:
        raise UserError(f"{text}; leave niqe/ma/pi out of --metrics")
    return _NoScorer([f"NIQE/Ma/PI skipped: {text}"])


def _plan_crops(scorer: Any, n: int, grid: Grid, opts: EvalOptions) -> list:
    if scorer is None or not scorer.available:
        return []
    from .perceptual import sample_crops

    b = opts.crop_border
    return sample_crops(n, grid.height - 2 * b, grid.width - 2 * b, opts.perceptual_sample,
                        opts.perceptual_crop, opts.seed)


def _score_crops(scorer: Any, img255: np.ndarray, crops: list) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {m: [] for m in (scorer.available if scorer else ())}
    for c in crops:
        patch = img255[c.y0:c.y0 + c.size_y, c.x0:c.x0 + c.size_x]
        try:
            scores = scorer.score(patch)
        except ValueError as e:
            raise UserError(f"perceptual metrics: {e}; use a larger --perceptual-crop or "
                            "leave niqe/ma/pi out of --metrics")
        for name, v in scores.items():
            out[name].append(v)
    return out


def _crop_note(crops: list, n: int, grid: Grid, opts: EvalOptions) -> str:
    from .perceptual import whole_slices

    b, c = opts.crop_border, crops[0]
    if whole_slices(n, grid.height - 2 * b, grid.width - 2 * b, opts.perceptual_sample,
                    opts.perceptual_crop):
        return (f"NIQE/Ma/PI on every evaluated slice (whole {c.size_y}x{c.size_x} px after "
                "the border crop)")
    return (f"NIQE/Ma/PI on a seeded sample of {len(crops)} crops of {c.size_y}x{c.size_x} px "
            f"(seed {opts.seed}, --perceptual-sample {opts.perceptual_sample}), the same crops "
            "for every method")


def _intensity_note(hr: VolumeLike, window: tuple[float, float]) -> str:
    if np.dtype(hr.dtype) == np.uint8:
        return "PSNR (Eq. 8, peak 255) and SSIM on the 8-bit values as they are"
    return (f"PSNR (Eq. 8, peak 255) and SSIM after mapping {np.dtype(hr.dtype)} intensities "
            f"linearly from the HR range [{window[0]:g}, {window[1]:g}] to [0, 255] (clipped, "
            "same window for SR and HR)")


def _stats(vals: list[float], name: str, notes: list[str]) -> dict[str, float] | None:
    arr = np.asarray([v for v in vals if v is not None], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if arr.size and finite.size < arr.size:
        notes.append(f"{name}: {arr.size - finite.size} of {arr.size} values not finite "
                     "(identical slices give PSNR = inf; flat crops can make NIQE undefined); "
                     "left out of mean and std")
    if finite.size == 0:
        return None
    return {"mean": float(finite.mean()), "std": float(finite.std())}


def morph_voi(n: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Central in-plane window (y0, y1, x0, x1) keeping n x h x w within MORPH_MAX_VOXELS."""
    if n * height * width <= MORPH_MAX_VOXELS:
        return 0, height, 0, width
    side = max(1, int(math.sqrt(MORPH_MAX_VOXELS / n)))
    h, w = min(side, height), min(side, width)
    y0, x0 = (height - h) // 2, (width - w) // 2
    return y0, y0 + h, x0, x0 + w


def _morphometry(sr_bone: np.ndarray, hr_bone: np.ndarray, hr: VolumeLike, grid: Grid,
                 reference: Reference, opts: EvalOptions, notes: list[str],
                 label: str = "SR") -> dict[str, Any] | None:
    from . import morphometry as morph

    spacing = opts.spacing_um or hr.spacing_um
    if spacing is None:
        notes.append(f"morphometry skipped: voxel size of {hr.path} unknown (give --spacing-um)")
        return None
    sp = (spacing[0] * grid.factor_z, spacing[1], spacing[2])
    notes.append(f"morphometry: Otsu threshold {reference.threshold:g} chosen on HR, applied "
                 f"to SR and HR; voxel {sp[0]:g} x {sp[1]:g} x {sp[2]:g} um (z, y, x) on the "
                 "compared slices; Tb.Th/Tb.Sp = mean local thickness (distance transform), "
                 "Tb.N = (BV/TV)/Tb.Th. Values on this anisotropic grid are for comparing SR "
                 "with HR (rel_error), not the bone's own morphometry (measure that on the "
                 "full 10 um HR scan)")
    if sr_bone.shape[1:] != (grid.height, grid.width):
        notes.append(f"morphometry on the central {sr_bone.shape[1]}x{sr_bone.shape[2]} px of "
                     f"every compared slice (at most {MORPH_MAX_VOXELS:,} voxels: local "
                     "thickness time and memory grow with the volume)")
    if reference.hr_morphometry is None:
        reference.hr_morphometry = morph.morphometry(hr_bone, sp, desc="morphometry HR",
                                                     quiet=opts.quiet)
    return morph.compare(morph.morphometry(sr_bone, sp, desc=f"morphometry {label}",
                                           quiet=opts.quiet), reference.hr_morphometry)


def evaluate_files(hr_path: str | Path, methods: list[tuple[str, str | Path]], opts: EvalOptions,
                   *, lr_path: str | Path | None = None,
                   weights_dir: str | Path | None = None,
                   check_inputs: Callable[[list[Any]], None] | None = None) -> list[EvalResult]:
    """Open HR and every ``(label, path)`` SR volume (and the bicubic upscaling of ``lr_path``
    when given, labelled "Bicubic") and evaluate each against HR on shared crops/statistics.
    ``check_inputs`` gets the opened volumes (HR, SRs, LR) before any work."""
    from ..volume import open_volume

    check_labels([label for label, _ in methods] + ([BICUBIC_LABEL] if lr_path else []))
    if opts.hr_slice not in HR_SLICE_MODES:
        raise UserError(f"unknown HR slice mode {opts.hr_slice!r} (choose {HR_SLICE_MODES})")
    scorer = make_scorer(opts.metrics, opts.metrics_explicit, weights_dir)
    with contextlib.ExitStack() as stack:
        hr = stack.enter_context(open_volume(hr_path, opts.spacing_um))
        volumes: list[tuple[str, VolumeLike]] = [
            (lab, stack.enter_context(open_volume(p))) for lab, p in methods]
        lr = None if lr_path is None else stack.enter_context(open_volume(lr_path))
        if check_inputs is not None:
            check_inputs([hr, *(v for _, v in volumes), *([lr] if lr is not None else [])])
        if lr is not None:
            volumes.append((BICUBIC_LABEL, BicubicVolume(lr)))
        grids = [check_pair(v, hr) for _, v in volumes]  # every input checked before any work
        for grid in grids:
            check_crop_border(grid, opts)
        references: dict[Grid, Reference] = {}
        results = []
        for (label, vol), grid in zip(volumes, grids):
            if grid not in references:
                references[grid] = reference_stats(hr, grid, opts)
            results.append(evaluate_volume(vol, hr, opts, label=label, scorer=scorer,
                                           reference=references[grid], grid=grid))
    for note in alignment_warnings(results, lr_path):
        log.warning("%s", note)
        for r in results:
            r.summary.setdefault("notes", []).append(note)
    return results


def alignment_warnings(results: list[EvalResult], lr_path: str | Path | None) -> list[str]:
    """Signs that SR and HR are not on one grid, which makes every score meaningless: an LR
    scan that `simulate` made with motion, or a method far below bicubic on the same grid."""
    import json

    out = []
    if lr_path is not None:
        lr = Path(lr_path)
        truth = (lr if lr.is_dir() else lr.parent) / "simulation.json"
        try:
            t = json.loads(truth.read_text())
            rot, shift = float(t.get("rotation_deg") or 0.0), t.get("shift_um") or [0.0, 0.0]
            moved = abs(rot) > 1e-9 or any(abs(float(v)) > 1e-9 for v in shift)
        except (OSError, ValueError, TypeError, AttributeError):
            moved = False
        if moved:
            out.append(f"{lr} was simulated with motion (rotation {rot:g} deg, shift {shift} "
                       "um): it is not on HR's grid, so no score against HR means anything; "
                       "simulate a scan without motion (or register it) for scoring")
    bic = next((r for r in results if r.label == BICUBIC_LABEL), None)
    bic_psnr = (bic.summary.get("psnr") or {}).get("mean") if bic is not None else None
    for r in results:
        psnr = (r.summary.get("psnr") or {}).get("mean")
        if r is not bic and bic_psnr is not None and psnr is not None and psnr < bic_psnr - 1:
            out.append(f"{r.label} scores {bic_psnr - psnr:.1f} dB below bicubic: check that "
                       "it was made from this LR scan and that LR and HR are registered (a "
                       "model trained for another scanner can also do this)")
    return out
