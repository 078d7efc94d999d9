"""Trabecular bone morphometry on binary volumes in physical units: BV/TV, Tb.Th, Tb.Sp, Tb.N.

Tb.Th and Tb.Sp are mean local thicknesses (Hildebrand & Rueegsegger 1997): the local
thickness at a voxel is the diameter of the largest sphere that fits inside the structure and
contains the voxel. Implemented here with ``scipy.ndimage.distance_transform_edt`` because the
maintained libraries (porespy's ``local_thickness``, the ``localthickness`` package) work in
voxel units on isotropic grids, while SR volumes from ``upscale`` are anisotropic (e.g.
80 x 10 x 10 um); ITK's BoneMorphometry uses a plate model instead of local thickness.

Distances are to the voxel *surface* of the other phase (half a voxel short of its centre along
an axis; see :func:`surface_distance`), so a plate of an odd number ``t`` of voxels measures
exactly ``t`` voxels and an even one ``t - 1``, along any axis of an anisotropic grid. The array
border is not a surface (structures cut by the volume edge are not thinned).
Tb.N = (BV/TV) / Tb.Th (plate model), in 1/mm.

Never imports pyiqa.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

MAX_LEVELS = 64  # radius levels of the sphere-fitting sweep (accuracy vs time)


def otsu_threshold_from_histogram(counts: np.ndarray, centers: np.ndarray) -> float:
    """Otsu's threshold (scikit-image) from a histogram; voxels ``> t`` are bone."""
    from skimage.filters import threshold_otsu

    nz = np.flatnonzero(counts)
    if nz.size < 2:
        raise ValueError("the HR volume has a single intensity: no Otsu threshold")
    return float(threshold_otsu(hist=(counts, centers)))


def surface_distance(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """For each ``True`` voxel, the physical distance to the surface of the other phase.

    A voxel of the other phase is a ball of diameter ``s`` (the finest voxel side) along the
    finest axes and a box along coarser ones (e.g. z of an 80 x 10 x 10 um grid): the distance
    is ``sqrt(d_box^2 + max(rho - s / 2, 0)^2)``, ``d_box`` the distance to the box along the
    coarse axes (exact: their faces are sampled on a grid twice as fine) and ``rho`` the
    centre distance along the finest axes. Isotropic grids: the centre distance less ``s / 2``;
    along any axis exactly half a voxel short of the centre.
    ``0`` outside ``mask``; ``inf`` everywhere when there is no other phase.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    if mask.all():
        return np.full(mask.shape, np.inf)
    coarse = sp > sp.min() * (1 + 1e-6)
    other = ~mask
    for a in np.flatnonzero(coarse):  # add the faces between voxels: closed boxes of `other`
        n = other.shape[a]
        both = np.take(other, range(n - 1), a) | np.take(other, range(1, n), a)
        fine_grid = np.zeros(other.shape[:a] + (2 * n - 1,) + other.shape[a + 1:], bool)
        idx = [slice(None)] * 3
        idx[a] = slice(0, None, 2)
        fine_grid[tuple(idx)] = other
        idx[a] = slice(1, None, 2)
        fine_grid[tuple(idx)] = both
        other = fine_grid
    step = np.where(coarse, sp / 2, sp)
    near = ndimage.distance_transform_edt(~other, sampling=step, return_distances=False,
                                          return_indices=True)
    centres = tuple(slice(0, None, 2) if c else slice(None) for c in coarse)
    grid = np.indices(other.shape, sparse=True)
    d_box = np.zeros(mask.shape)
    rho = np.zeros(mask.shape)
    for a in range(3):  # offset to the nearest sample of the other phase, per axis
        d = (near[a][centres] - grid[a][centres]) * step[a]
        if coarse[a]:
            d_box += d * d
        else:
            rho += d * d
    rho = np.maximum(np.sqrt(rho) - sp.min() / 2, 0.0)
    return np.where(mask, np.sqrt(d_box + rho * rho), 0.0)


def local_thickness(mask: np.ndarray, spacing: tuple[float, float, float], *,
                    desc: str = "local thickness", quiet: bool = True,
                    threads: int | None = None) -> np.ndarray:
    """Local thickness (diameter of the largest inscribed sphere containing each voxel), physical
    units; ``0`` outside ``mask``. Swept over at most :data:`MAX_LEVELS` radius levels (one
    distance transform each: minutes at 16 M voxels), with a progress bar unless ``quiet``.
    The levels' distance transforms run on ``threads`` threads (default: the usable cores, at
    most :data:`MAX_THREADS`); the result does not depend on it."""
    from concurrent.futures import ThreadPoolExecutor

    from ..progress import progress

    mask = np.asarray(mask, dtype=bool)
    thick = np.zeros(mask.shape, dtype=np.float64)
    if not mask.any():
        return thick
    sp = np.asarray(spacing, dtype=np.float64)
    radius = surface_distance(mask, spacing)
    finite = radius[mask & np.isfinite(radius)]
    if finite.size == 0:  # everything is one phase: no surface at all
        thick[mask] = np.inf
        return thick
    r_max = float(finite.max())
    step = max(float(sp.min()) / 2, r_max / MAX_LEVELS)
    levels = np.arange(step, r_max + step, step)
    levels[-1] = min(levels[-1], r_max)
    # every voxel is at least its own sphere's centre
    thick[mask] = 2 * radius[mask]

    def reach(r: float) -> np.ndarray:
        """Voxels within ``r`` of a sphere centre of radius >= r (scipy's distance transform
        releases the GIL, so levels run in parallel threads)."""
        centres = radius >= r * (1 - 1e-9)
        return ndimage.distance_transform_edt(~centres, sampling=sp) <= r * (1 + 1e-9)

    n = max(1, threads if threads is not None else min(usable_cores(), MAX_THREADS))
    with ThreadPoolExecutor(n) as pool:
        bar = progress(total=len(levels), desc=desc, quiet=quiet, unit="level")
        for start in range(0, len(levels), n):  # n levels at a time bounds the memory
            chunk = levels[start:start + n]
            for r, hit in zip(chunk, pool.map(reach, chunk)):
                hit &= mask
                thick[hit] = np.maximum(thick[hit], 2 * r)
                bar.update(1)
        bar.close()
    return thick


MAX_THREADS = 4  # each thread holds a distance transform of the window (~20 bytes a voxel)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; all cores off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def morphometry(bone: np.ndarray, spacing_um: tuple[float, float, float], *,
                desc: str = "morphometry", quiet: bool = True) -> dict[str, float]:
    """BV/TV, Tb.Th (um), Tb.Sp (um), Tb.N (1/mm) of a binary volume (``True`` = bone); a
    progress bar per phase (``desc``) unless ``quiet``."""
    bone = np.asarray(bone, dtype=bool)
    if bone.ndim != 3 or bone.size == 0:
        raise ValueError(f"need a non-empty 3D binary volume, got shape {bone.shape}")
    bv_tv = float(bone.mean())
    tb_th = _mean_or_nan(local_thickness(bone, spacing_um, desc=f"{desc}: Tb.Th",
                                         quiet=quiet), bone)
    tb_sp = _mean_or_nan(local_thickness(~bone, spacing_um, desc=f"{desc}: Tb.Sp",
                                         quiet=quiet), ~bone)
    tb_n = bv_tv / (tb_th / 1000.0) if tb_th > 0 and np.isfinite(tb_th) else float("nan")
    return {"bv_tv": bv_tv, "tb_th_um": tb_th, "tb_sp_um": tb_sp, "tb_n_per_mm": tb_n}


def compare(sr: dict[str, float], hr: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """{quantity: {"sr", "hr", "rel_error"}} with rel_error = (sr - hr) / hr (None if undefined)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in ("bv_tv", "tb_th_um", "tb_sp_um", "tb_n_per_mm"):
        s, h = _finite(sr[key]), _finite(hr[key])
        rel = None if s is None or h is None or h == 0 else (s - h) / h
        out[key] = {"sr": s, "hr": h, "rel_error": rel}
    return out


def _mean_or_nan(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else float("nan")


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None
