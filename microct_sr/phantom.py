"""Procedural trabecular bone: an HR micro-CT-like volume with a known BV/TV and thickness.

Geometry (docs/simulate.md, "Phantom"): three band-limited Gaussian random fields f1, f2, f3
(wavelength ``lam`` voxels, slightly elongated along z). Plates are the thickened zero level
set of f1 (|f1|/|grad f1| < t/2), perforated where f2 is high; rods are the thickened
intersection lines of f1 = 0 and f3 = 0. Each part is an approximate signed distance in voxels,
so the bone fraction of a voxel, clip(0.5 + d, 0, 1), gives partial-volume edges. An optional
cortex (an elliptic shell around the trabecular compartment) and soft tissue outside it, gray
levels for marrow / bone / tissue, a Gaussian point-spread function and noise complete it.
BV/TV is matched by a small offset of the distance; the wavelength is refined so the measured
thickness (mean of 2 x distance-to-marrow on the bone's medial ridge, like a local-thickness
estimate) is near the request.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import UserError

log = logging.getLogger(__name__)

# Gray levels on the uint8 scale (uint16: times 257): air-free sample in soft tissue.
GRAY = {"tissue": 50.0, "marrow": 60.0, "bone": 215.0}
NOISE_STD = 7.0           # uint8 gray levels, after the PSF
PSF_SIGMA_VOX = 0.6       # Gaussian point-spread function, voxels
Z_ELONGATION = 1.3        # trabeculae a little longer along z (loading axis)
PERFORATED = 0.3          # fraction of plate area removed by perforations
THICKNESS_BLOCK = 160     # thickness is measured on the central block of this many voxels/axis
# Peak memory of make_phantom per voxel: 33 bytes measured at 128 x 256 x 256 (float32 noise,
# its FFT, distance fields, the gray volume); 40 leaves a margin.
PEAK_BYTES_PER_VOXEL = 40


@dataclass
class PhantomSpec:
    """What was asked for."""

    shape: tuple[int, int, int] = (128, 256, 256)
    spacing_um: tuple[float, float, float] = (10.0, 10.0, 10.0)
    bvtv: float = 0.25
    thickness_um: float = 80.0
    cortex: bool = True
    seed: int = 0
    dtype: str = "uint8"


def _field(shape: tuple[int, int, int], lam: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with a band-pass spectrum peaked at 1/lam."""
    spec = np.fft.rfftn(rng.standard_normal(shape, dtype=np.float32))
    kz = (np.fft.fftfreq(shape[0]) / Z_ELONGATION).astype(np.float32)[:, None, None]
    ky = np.fft.fftfreq(shape[1]).astype(np.float32)[None, :, None]
    kx = np.fft.rfftfreq(shape[2]).astype(np.float32)[None, None, :]
    k0 = np.float32(1.0 / lam)
    for z in range(spec.shape[0]):        # plane by plane: no full-size temporaries
        k = np.sqrt(kz[z] ** 2 + ky ** 2 + kx ** 2)[0]
        spec[z] *= np.exp(-0.5 * ((k - k0) / (0.3 * k0)) ** 2)
    f = np.fft.irfftn(spec, s=shape, axes=(0, 1, 2)).astype(np.float32, copy=False)
    del spec
    f /= f.std() + 1e-12
    return f


def _dist(f: np.ndarray) -> np.ndarray:
    """f / |grad f|: signed distance (voxels) to the zero level set, to first order."""
    g2 = np.zeros_like(f)
    for axis in range(f.ndim):
        d = np.gradient(f, axis=axis)
        g2 += d * d
        del d
    np.sqrt(g2, out=g2)
    np.maximum(g2, 1e-3, out=g2)
    return np.divide(f, g2, out=g2)


def _trabecular_distance(shape: tuple[int, int, int], lam: float, half_th: float,
                         seed: int) -> np.ndarray:
    """Signed distance (voxels, > 0 in bone) of perforated plates plus rods."""
    rng = np.random.default_rng(seed)
    d1 = _dist(_field(shape, lam, rng))
    f2 = _field(shape, lam, rng)
    hole = float(np.quantile(f2[:: 4, :: 4, :: 4], 1.0 - PERFORATED))
    np.subtract(hole, f2, out=f2)
    keep = _dist(f2)                                   # > 0 where the plate is kept
    del f2
    d3 = _dist(_field(shape, lam, rng))
    rods = np.square(d3, out=d3)
    rods += np.square(d1)
    np.sqrt(rods, out=rods)
    np.subtract(half_th, rods, out=rods)               # rods: lines where f1 = f3 = 0
    plates = np.abs(d1, out=d1)
    np.subtract(half_th, plates, out=plates)
    np.minimum(plates, keep, out=plates)               # perforated plates
    del keep
    return np.maximum(plates, rods, out=plates)


def _cortex(shape: tuple[int, int, int], thick_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """(cortex distance, inside mask) for an elliptic shell along z (2D, broadcast over z)."""
    _, ny, nx = shape
    y = (np.arange(ny) + 0.5 - ny / 2)[:, None]
    x = (np.arange(nx) + 0.5 - nx / 2)[None, :]
    ay, ax = 0.42 * ny, 0.46 * nx
    rho = np.sqrt((y / ay) ** 2 + (x / ax) ** 2)          # 1 on the periosteal surface
    scale = min(ay, ax)
    d_out = (1.0 - rho) * scale
    d_in = d_out - thick_vox
    return np.minimum(d_out, -d_in).astype(np.float32), d_in > 1.0


def cortex_thickness_vox(shape: tuple[int, int, int], trab_thickness_vox: float) -> float:
    """Cortical shell thickness: 6% of the slice size, within 1.5-3 trabecular thicknesses."""
    return float(np.clip(0.06 * min(shape[1:]), 1.5 * trab_thickness_vox,
                         3.0 * trab_thickness_vox))


def trabecular_compartment(shape: tuple[int, int, int], spacing_um: tuple[float, float, float],
                           thickness_um: float) -> np.ndarray:
    """(y, x) mask of the trabecular compartment inside the cortex of a phantom made with
    ``cortex=True`` and this ``shape``, ``spacing_um`` and requested ``thickness_um``."""
    target = thickness_um / float(np.mean(spacing_um[1:]))
    return _cortex(shape, cortex_thickness_vox(shape, target))[1]


def _fraction(d: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + d, 0.0, 1.0).astype(np.float32)


def _central_block(a: np.ndarray, size: int = THICKNESS_BLOCK) -> np.ndarray:
    """The central block of at most ``size`` voxels per axis."""
    sl = tuple(slice(max(0, (n - size) // 2), max(0, (n - size) // 2) + min(n, size))
               for n in a.shape)
    return a[sl]


def ridge_thickness_vox(bone: np.ndarray) -> float:
    """Fast trabecular thickness in voxels: the mean sphere diameter on the bone's medial ridge
    (local maxima of the distance map), with distances measured to the voxel *surface* like
    ``metrics.morphometry`` (EDT to the nearest marrow voxel centre minus 0.5; so a plate of
    an even number t of voxels measures t - 1, as there). Measured on the central block of at
    most THICKNESS_BLOCK voxels per axis (memory and time)."""
    bone = _central_block(bone)
    if not bone.any():
        return 0.0
    edt = ndimage.distance_transform_edt(bone).astype(np.float32)
    ridge = (edt >= ndimage.maximum_filter(edt, size=3)) & (edt >= 1.0)
    return float(2.0 * edt[ridge].mean() - 1.0) if ridge.any() else 0.0


def _offset_for_bvtv(d: np.ndarray, inside: np.ndarray | None, bvtv: float) -> float:
    """Offset added to d so that the mean bone fraction (inside) equals bvtv (bisection)."""
    sample = d[::2, ::2, ::2] if inside is None else d[::2, ::2, ::2][:, inside[::2, ::2]]
    lo, hi = -20.0, 20.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _fraction(sample + mid).mean() < bvtv:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def make_phantom(shape: tuple[int, int, int] = (128, 256, 256),
                 spacing_um: tuple[float, float, float] = (10.0, 10.0, 10.0),
                 bvtv: float = 0.25, thickness_um: float = 80.0, cortex: bool = True,
                 seed: int = 0, mask: np.ndarray | None = None, dtype: str = "uint8",
                 mask_path: str | None = None) -> tuple[np.ndarray, dict]:
    """An HR bone volume (z, y, x) of ``dtype`` and an info dict with the achieved values.

    ``mask`` (a binary bone volume, nonzero = bone) replaces the procedural geometry: it gets
    the same gray levels, partial-volume edges, PSF and noise; ``shape``, ``bvtv``,
    ``thickness_um`` and ``cortex`` are then ignored; ``mask_path`` names it in messages.
    """
    check_request(shape, spacing_um, bvtv, thickness_um, dtype, seed, mask, mask_path,
                  cortex=cortex)
    vox = float(np.mean(spacing_um[1:]))
    if mask is not None:     # nonzero = bone, negative values too (as check_mask counts)
        frac = ndimage.gaussian_filter((mask != 0).astype(np.float32), 0.5)
        inside, cort = None, None
        lam = None
    else:
        frac, inside, cort, lam = _procedural(tuple(shape), vox, bvtv, thickness_um, cortex,
                                              seed)
    info = _measure(frac, inside, spacing_um)
    gray = _to_gray(frac, inside if cort is not None else None, cort, seed, dtype)
    info.update({
        "shape": list(gray.shape), "spacing_um": list(map(float, spacing_um)),
        "dtype": dtype, "seed": seed, "cortex": bool(cort is not None),
        "source": "mask" if mask is not None else "procedural",
        "requested_bvtv": None if mask is not None else bvtv,
        "requested_thickness_um": None if mask is not None else thickness_um,
        "wavelength_um": None if lam is None else round(lam * vox, 2),
        "gray_levels": {k: v * (257 if dtype == "uint16" else 1) for k, v in GRAY.items()},
        "noise_std": NOISE_STD * (257 if dtype == "uint16" else 1),
        "psf_sigma_vox": PSF_SIGMA_VOX,
    })
    return gray, info


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(shape: tuple[int, ...]) -> None:
    """UserError when building a phantom of ``shape`` would need more memory than there is
    (the whole volume is built at once): refused up front, not by the OOM killer later."""
    need = PEAK_BYTES_PER_VOXEL * math.prod(int(n) for n in shape)
    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise UserError(f"--shape {' x '.join(map(str, shape))} needs about "
                        f"{need / 2**30:.1f} GiB of memory; {avail / 2**30:.1f} GiB are "
                        "available (make it smaller)")


def check_mask(mask: np.ndarray, path: str | None = None) -> None:
    """UserError unless ``mask`` is 3D, at least 8 voxels a side (as ``--shape``), with some
    bone; a warning when it is not binary: every nonzero voxel counts as bone, so a gray image
    given as a mask becomes nearly solid bone."""
    if mask.ndim != 3 or min(mask.shape) < 8:
        raise UserError(f"the mask must be 3D with at least 8 voxels a side, got shape "
                        f"{mask.shape}", path)
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise UserError("the mask holds NaN or Inf values; a mask is 0 (marrow) or nonzero "
                        "(bone)", path)
    if not mask.any():
        raise UserError("the mask holds no bone (every voxel is 0)", path)
    values = np.unique(mask[::max(1, mask.shape[0] // 16)])  # a few slices are enough
    if len(values) > 2:
        log.warning("%s: the mask is not binary (%d gray values in the sampled slices); every "
                    "nonzero voxel counts as bone (BV/TV %.2f)", path or "mask", len(values),
                    float(np.count_nonzero(mask)) / mask.size)


def check_request(shape: tuple[int, ...], spacing_um: tuple[float, float, float], bvtv: float,
                  thickness_um: float, dtype: str, seed: int = 0, mask: np.ndarray | None = None,
                  mask_path: str | None = None, cortex: bool = False) -> None:
    """UserError for a phantom that cannot be made: too big for the memory, a bad --dtype,
    voxel size, --seed, --shape, --bvtv or --thickness-um, a slice with no room inside the
    cortex, or a bad ``mask``. Cheap without a mask: callers run it before opening the output."""
    check_memory(tuple(shape) if mask is None else mask.shape)
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if dtype not in ("uint8", "uint16"):
        raise UserError(f"--dtype must be uint8 or uint16, got {dtype!r}")
    if any(s <= 0 for s in spacing_um):
        raise UserError(f"voxel size must be positive, got {spacing_um}")
    if mask is not None:
        check_mask(mask, mask_path)
        return
    if len(shape) != 3 or min(shape) < 8:
        raise UserError(f"--shape must be three sizes Z Y X of at least 8, got {shape}")
    if not 0.02 <= bvtv <= 0.6:
        raise UserError(f"--bvtv must be in [0.02, 0.6], got {bvtv}")
    th_vox = thickness_um / float(np.mean(spacing_um[1:]))
    if not 2.0 <= th_vox <= max(shape[1:]) / 4:
        raise UserError(f"--thickness-um {thickness_um:g} is {th_vox:.3g} voxels; it must be "
                        f"between 2 voxels and a quarter of the slice size ({max(shape[1:]) / 4:g})")
    if cortex and not trabecular_compartment(tuple(shape), spacing_um, thickness_um).any():
        raise UserError(f"--shape {' x '.join(map(str, shape))} leaves no room inside a cortex "
                        f"{cortex_thickness_vox(tuple(shape), th_vox):g} voxels thick; use a "
                        "larger slice or --no-cortex")


def _procedural(shape, vox, bvtv, thickness_um, cortex, seed):
    """(bone fraction, trabecular compartment mask or None, cortex fraction or None, lam)."""
    target = thickness_um / vox
    cort_d, inside = (None, None)
    if cortex:
        cort_d, inside = _cortex(shape, cortex_thickness_vox(shape, target))
    # plate model: BV/TV ~ thickness x surface density ~ thickness / (0.4 lam); then a
    # secant search on log(thickness) vs log(lam), keeping the closest result
    lam = target / (0.4 * bvtv) * 0.9
    tried: list[tuple[float, float]] = []
    best = None
    for _ in range(6):
        d = _trabecular_distance(shape, lam, target / 2, seed)
        d += _offset_for_bvtv(d, inside, bvtv)
        bone = d > 0 if inside is None else (d > 0) & inside[None]
        got = max(ridge_thickness_vox(bone), 0.1)
        log.debug("phantom: lam %.2f vox -> thickness %.2f vox (target %.2f)", lam, got, target)
        if best is None or abs(math.log(got / target)) < abs(math.log(best[1] / target)):
            best = (lam, got, d)
        if abs(got / target - 1) < 0.04:
            break
        tried.append((math.log(lam), math.log(got)))
        lam = _next_lam(tried, math.log(target))
    lam, _, d = best
    frac = _fraction(d)
    cort = None
    if cortex:
        frac *= inside[None]
        cort = _fraction(cort_d)
    return frac, inside, cort, lam


def _next_lam(tried: list[tuple[float, float]], log_target: float) -> float:
    """Secant step on (log lam, log thickness), at most a factor 1.5 per step."""
    x1, y1 = tried[-1]
    slope = 1.0
    if len(tried) > 1:
        x0, y0 = tried[-2]
        if abs(x1 - x0) > 1e-6 and (y1 - y0) / (x1 - x0) > 0.1:
            slope = (y1 - y0) / (x1 - x0)
    step = float(np.clip((log_target - y1) / slope, -math.log(1.5), math.log(1.5)))
    return math.exp(x1 + step)


def _measure(frac: np.ndarray, inside: np.ndarray | None, spacing_um) -> dict:
    """Achieved BV/TV (mean bone fraction) and thickness in the trabecular compartment."""
    vox = float(np.mean(spacing_um[1:]))
    bone = frac > 0.5
    if inside is None:
        bvtv = float(frac.mean())
    else:
        bvtv = float(frac[:, inside].mean())
        bone &= inside[None]
    return {"bvtv": round(bvtv, 4),
            "thickness_um": round(ridge_thickness_vox(bone) * vox, 2),
            "thickness_method": ("mean sphere diameter on the medial ridge, distances to the voxel "
                                 "surface as in metrics.morphometry (fast; see docs/simulate.md)"),
            "bvtv_region": "trabecular compartment" if inside is not None else "whole volume"}


def _to_gray(frac: np.ndarray, inside: np.ndarray | None, cort: np.ndarray | None, seed: int,
             dtype: str) -> np.ndarray:
    """Gray values: marrow / tissue background, bone, cortex; PSF; noise; cast."""
    if cort is not None:
        background = np.where(inside, GRAY["marrow"], GRAY["tissue"]).astype(np.float32)
        # marrow also fills the shell's inner side: the cortex overrides where it is bone
        bone_frac = np.maximum(frac, cort[None])
        g = background[None] + (GRAY["bone"] - background[None]) * bone_frac
    else:
        g = GRAY["marrow"] + (GRAY["bone"] - GRAY["marrow"]) * frac
    g = ndimage.gaussian_filter(g.astype(np.float32), PSF_SIGMA_VOX)
    rng = np.random.default_rng([seed, 104729])
    noise = ndimage.gaussian_filter(rng.standard_normal(g.shape, dtype=np.float32), 0.5)
    g += noise * (NOISE_STD / (noise.std() + 1e-12))
    scale = 257.0 if dtype == "uint16" else 1.0
    info = np.iinfo(dtype)
    return np.clip(np.rint(g * scale), info.min, info.max).astype(dtype)
