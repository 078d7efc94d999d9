"""How long `microct-sr pair` would take on a 160x160x500 LR / 1280x1280x4000 HR scan pair.

    python benchmarks/pair.py [--lr-slices 24] [--jobs 2] [--method ransac]

A full-size pair does not fit this shared machine's time, so we run `pair_scans` on a pair with
the full in-plane size (LR 160x160, HR 1280x1280, uint16) but only ``--lr-slices`` LR slices,
and extrapolate:

    total(500) = registration + patch_phase * 500 / n + disk_reads

- registration: measured once; it samples at most 24 LR slices (plus 6 per coarse Z candidate)
  whatever the scan's length, so it does not grow with Z.
- patch_phase: measured over n LR slices; it visits every LR slice once, so it scales linearly.
- The HR here is synthesised into memory first (procedural trabecular bone), so the measured
  phases exclude disk reads; we add the measured cost of reading an HR slice from a 16-bit
  NRecon TIFF folder on this disk (warm page cache: cold or network storage will be slower)
  times the number of HR slices `pair` reads (counted; `pair` never reads all 4000).

The pair has a known motion, so the script also prints the registration errors of both methods
and how often Eq. 1 (two-point) on a random pair of ratio-test matches is off by > 5 degrees.
Goal: total under 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from microct_sr import pairing

FACTOR, HR_XY, FULL_LR_SLICES = 8, 1280, 500


class LazyBone:
    """HR volume (z, 1280, 1280) uint16 synthesised per slice from a coarse band-passed noise
    field: thin trabecular shells inside a cylinder with a cortex, plus noise."""

    def __init__(self, nz: int, seed: int = 0):
        from scipy import ndimage

        rng = np.random.default_rng(seed)
        c = rng.standard_normal((nz // 4 + 2, HR_XY // 4, HR_XY // 4)).astype(np.float32)
        self.coarse = ndimage.gaussian_filter(c, 1.5) - ndimage.gaussian_filter(c, 3.0)
        self.thr = 0.19 * float(self.coarse.std())
        yy, xx = np.mgrid[:HR_XY, :HR_XY]
        r = np.hypot(yy - HR_XY / 2, xx - HR_XY / 2)
        self.inside = r < 0.46 * HR_XY
        self.cortex = self.inside & (r > 0.42 * HR_XY)
        self.shape, self.dtype = (nz, HR_XY, HR_XY), np.dtype(np.uint16)
        self.spacing_um, self.path = (10.0, 10.0, 10.0), "<synthetic HR>"
        self.reads, self.cache = 0, None
        self._lock = threading.Lock()

    def slice(self, z: int) -> np.ndarray:
        a, w = divmod(z / 4, 1)
        g = (1 - w) * self.coarse[int(a)] + w * self.coarse[int(a) + 1]
        g = cv2.resize(g, (HR_XY, HR_XY), interpolation=cv2.INTER_CUBIC)
        img = np.where(np.abs(g) < self.thr, 30000.0, 9000.0) * self.inside
        img[self.cortex] = 30000.0
        noise = np.random.default_rng(z).normal(0, 1500, img.shape)
        return np.clip(img + 1000 + noise, 0, 65535).astype(np.uint16)

    def materialise(self) -> LazyBone:
        """Synthesise every slice once into memory, so `pair` timings exclude synthesis."""
        self.cache = np.stack([self.slice(z) for z in range(self.shape[0])])
        return self

    def read(self, z0: int, z1: int) -> np.ndarray:
        with self._lock:
            self.reads += z1 - z0
        return self.cache[z0:z1]


class ArrayLR:
    """The LR scan in memory (small)."""

    def __init__(self, arr: np.ndarray):
        self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype
        self.spacing_um, self.path = (80.0, 80.0, 80.0), "<synthetic LR>"

    def read(self, z0: int, z1: int) -> np.ndarray:
        return self.arr[z0:z1]


def make_lr(hr: LazyBone, n_lr: int, angle_deg: float, shift_hr_px: tuple[float, float],
            z0: int) -> np.ndarray:
    """LR pixel P shows HR at factor R P + t (pairing's internal frame), slab [8k+z0, +8),
    blurred, with noise."""
    a = math.radians(angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m = np.hstack([r, (r @ [0.5, 0.5] + np.asarray(shift_hr_px) - 0.5)[:, None]])
    n = HR_XY // FACTOR
    out = np.empty((n_lr, n, n), np.uint16)
    rng = np.random.default_rng(1)
    for k in range(n_lr):
        slab = np.stack([hr.slice(z) for z in range(FACTOR * k + z0, FACTOR * k + z0 + FACTOR)])
        moved = cv2.warpAffine(slab.astype(np.float32).mean(0), m, (HR_XY, HR_XY),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderValue=1000.0)
        small = cv2.GaussianBlur(pairing.area_down(moved, FACTOR), (0, 0), 0.7)
        out[k] = np.clip(small + rng.normal(0, 600, small.shape), 0, 65535)
    return out


def disk_read_s_per_slice(n: int = 24) -> float:
    """Seconds to read one 1280x1280 uint16 slice from an NRecon TIFF folder (warm cache)."""
    from microct_sr.volume import create_volume_writer, open_volume

    hr = LazyBone(n + 8)
    with tempfile.TemporaryDirectory() as tmp:
        w = create_volume_writer(Path(tmp) / "scan", (n, HR_XY, HR_XY), np.uint16,
                                 (10.0, 10.0, 10.0), nrecon_prefix="scan_")
        with w:
            for z in range(n):
                w.write(hr.slice(z)[None])
        with open_volume(Path(tmp) / "scan") as v:
            t = time.perf_counter()
            for z in range(n):
                v.read(z, z + 1)
            return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr-slices", type=int, default=24)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--method", choices=pairing.METHODS, default="ransac")
    args = ap.parse_args()
    n, z0, angle, extra = args.lr_slices, 3, 6.5, (40.0, -25.0)
    hr = LazyBone(FACTOR * n + z0 + FACTOR + 4).materialise()
    c = np.array([HR_XY / 2] * 2)
    a = math.radians(angle)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    t_hr = tuple(c - r @ c + np.asarray(extra))
    t = time.perf_counter()
    lr = ArrayLR(make_lr(hr, n, angle, t_hr, z0))
    print(f"made a {lr.shape} LR / {hr.shape} HR pair in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    read_s = disk_read_s_per_slice()
    results = {}
    for method in dict.fromkeys([args.method, "two-point"]):
        opts = pairing.PairOptions(method=method, jobs=args.jobs)
        hr.reads = 0
        t = time.perf_counter()
        try:
            reg = pairing.register(lr, hr, opts, "bench")
        except pairing.UserError as e:
            results[method] = {"error": str(e)}
            continue
        t_reg = time.perf_counter() - t
        reads_reg = hr.reads
        err_angle = abs(reg.rigid.angle_deg - angle)
        err_shift_lr = math.hypot(*(np.asarray(reg.rigid.t_hr) - t_hr)) / FACTOR
        row = {"registration_s": round(t_reg, 1), "hr_slices_read_registration": reads_reg,
               "angle_error_deg": round(err_angle, 3), "shift_error_lr_px": round(err_shift_lr, 3),
               "z_offset_found": reg.z_offset, "z_offset_true": z0}
        if method == args.method:
            hr.reads = 0
            t = time.perf_counter()
            n_patches = sum(len(p) for p, _ in pairing.iter_patches(lr, hr, reg, opts))
            t_patch = time.perf_counter() - t
            scale = FULL_LR_SLICES / n
            reads_full = reads_reg + hr.reads * scale
            total = t_reg + t_patch * scale + reads_full * read_s
            row.update({"patch_phase_s": round(t_patch, 1), "patches": n_patches,
                        "disk_read_s_per_hr_slice": round(read_s, 4),
                        "estimate_500_lr_slices_s": round(total, 0),
                        "estimate_breakdown_s": {
                            "registration": round(t_reg, 0),
                            "patches": round(t_patch * scale, 0),
                            "disk_reads": round(reads_full * read_s, 0)},
                        "goal_s": 600, "ratio_to_goal": round(total / 600, 3)})
        results[method] = row
        print(f"{method}: {json.dumps(row)}", file=sys.stderr)
    # Eq. 1 on random match pairs at the true Z offset
    mt = pairing._Matcher(pairing._Reader(lr, hr), pairing.PairOptions(), 4)
    rates = [pairing.two_point_failure_rate(f.all_src, f.all_dst, angle, n_pairs=500, seed=k)
             for k, f in enumerate(mt.fit(k, z0) for k in range(0, n, max(1, n // 6)))]
    results["two_point_random_pairs_off_by_more_than_5_deg"] = round(float(np.nanmean(rates)), 3)
    results["setup"] = {"lr_slices_measured": n, "extrapolated_to": FULL_LR_SLICES,
                        "jobs": args.jobs, "true_angle_deg_internal": angle}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
