"""Tiny LR/HR pair folders (the `microct-sr pair` layout) for the training tests.

HR patches are crops of the real LHDL bone volume in ../shared/data when it is there, else of a
synthetic trabecular texture (thresholded smoothed noise: plates and rods a few voxels thick).
LR = Gaussian blur (a scanner's point spread) + 8x8 area average (the SR grid) + noise, uint8.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from conftest import SHARED_DATA

LHDL = SHARED_DATA / "bone" / "lhdl_3155_D_4_bc.tif"


def bone_volume(seed: int = 0) -> np.ndarray:
    """(z, y, x) uint8 bone: the real LHDL crop, or a synthetic texture of the same look."""
    if LHDL.is_file():
        return tifffile.imread(LHDL)
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((64, 200, 200)), 3.0)
    bone = np.abs(field) < 0.25 * field.std()
    return np.where(bone, 200, 40).astype(np.uint8) + rng.integers(0, 15, bone.shape, np.uint8)


def make_pair_folder(out: Path, scan_ids: list[str], patches_per_scan: int = 4,
                     lr_patch: int = 8, factor: int = 8, seed: int = 0,
                     context: int = 0) -> Path:
    """Write lr/, hr/, pairs.csv for ``scan_ids`` (each from its own Z range of the volume);
    with ``context`` > 0 each LR patch is a (2 * context + 1)-page stack of the LR of HR slices
    ``factor`` apart (clamped at the volume's ends), as `pair --context` cuts them."""
    vol = bone_volume(seed)
    rng = np.random.default_rng(seed)
    hp = lr_patch * factor
    (out / "lr").mkdir(parents=True, exist_ok=True)
    (out / "hr").mkdir(exist_ok=True)
    rows = []
    for s, scan in enumerate(scan_ids):
        z_range = np.arange(len(vol))[s::len(scan_ids)]
        for n in range(patches_per_scan):
            z = int(rng.choice(z_range))
            y, x = (int(v) for v in rng.integers(0, vol.shape[1] - hp, 2))
            hr = vol[z, y:y + hp, x:x + hp]
            zs = np.clip(z + factor * np.arange(-context, context + 1), 0, len(vol) - 1)
            blurred = ndimage.gaussian_filter(vol[zs, y:y + hp, x:x + hp].astype(np.float32),
                                              (0, 3.0, 3.0))
            lr = blurred.reshape(len(zs), lr_patch, factor, lr_patch, factor).mean(axis=(2, 4))
            lr = np.clip(lr + rng.normal(0, 3, lr.shape), 0, 255).round().astype(np.uint8)
            lr = lr[0] if context == 0 else lr
            pid = f"{scan}_{n:05d}"
            tifffile.imwrite(out / "lr" / f"{pid}.tif", lr, photometric="minisblack")
            tifffile.imwrite(out / "hr" / f"{pid}.tif", hr)
            rows.append({"patch_id": pid, "scan_id": scan, "lr_slice": z // factor,
                         "hr_slice": z, "lr_x": x // factor, "lr_y": y // factor, "hr_x": x,
                         "hr_y": y, "angle_deg": 0.0, "ncc": 1.0})
    with open(out / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def make_16_bit_copy(src: Path, out: Path, gain: int = 100, offset: int = 1000) -> Path:
    """A copy of the pair folder ``src`` whose patches are uint16 (``gain * x + offset``)."""
    (out / "lr").mkdir(parents=True, exist_ok=True)
    (out / "hr").mkdir(exist_ok=True)
    for sub in ("lr", "hr"):
        for p in (src / sub).glob("*.tif"):
            tifffile.imwrite(out / sub / p.name, tifffile.imread(p).astype(np.uint16) * gain
                             + offset)
    (out / "pairs.csv").write_bytes((src / "pairs.csv").read_bytes())
    return out
