"""Speed of `microct-sr simulate`, extrapolated to a 1280 x 1280 x 4000 HR volume.

Goal (issue 6): 1280x1280x4000 HR -> 160x160x500 LR in under 30 minutes on a 2-core machine.

What it measures (one run, real slice size, few slices):
1. per-stage CPU time of one LR slice at the target slice size, one thread: slab mean +
   gray->mu, forward projection at pitch 2 (the default; alone and per slice in a batch of 4
   sharing the sampling grids, as the workers run it) and pitch 1 (full HR resolution),
   noise, FBP, smoothing; and scikit-image's radon/iradon for the same slice (the alternative
   the issue names), timed on a subset of angles and scaled to all views;
2. end to end: ``simulate_volume`` on ``--lr-slices`` LR slices of a phantom tiled to the
   target slice size (in memory, so no disk read), with ``--workers`` processes, writing an
   NRecon folder to a temporary directory: wall time and CPU time (this process + workers);
3. reading: HR slices of that size from a multi-page TIFF on the temporary disk.

Extrapolation (printed with its inputs): the work is the same for every LR slice, so
    wall_estimate  = wall per LR slice x ceil(Z / factor) + HR read time per slice x Z
    quiet_estimate = CPU per LR slice x ceil(Z / factor) / workers + read time
The wall figure is what this machine gave now (other jobs included: the load average is
printed); the CPU-based figure is what the same work takes with ``workers`` idle cores.

Usage: python benchmarks/simulate.py [--size 1280] [--lr-slices 4] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class ArrayVolume:
    """The part of volume.Volume that simulate_volume uses, over an in-memory array."""

    def __init__(self, array: np.ndarray, spacing_um: tuple[float, float, float]):
        self.array, self.spacing_um = array, spacing_um
        self.shape, self.dtype, self.path = array.shape, array.dtype, Path("<memory>")

    def read(self, z0: int, z1: int) -> np.ndarray:
        return self.array[z0:z1]

    def __getitem__(self, z: int) -> np.ndarray:
        return self.array[z]


def hr_block(n_slices: int, size: int) -> np.ndarray:
    """A phantom of 320 x 320 tiles (cortex off) repeated to ``size`` x ``size``."""
    from microct_sr.phantom import make_phantom

    tile, _ = make_phantom((n_slices, 320, 320), (10.0, 10.0, 10.0), bvtv=0.25,
                           thickness_um=80, cortex=False, seed=0)
    reps = -(-size // 320)
    return np.ascontiguousarray(np.tile(tile, (1, reps, reps))[:, :size, :size])


def cpu(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn(*args, **kw)
    return time.process_time() - t0, out


def stages(block: np.ndarray, views: int) -> dict:
    """CPU seconds per LR slice for each stage, one torch thread."""
    import torch

    from microct_sr import simulate as S

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    p2 = S.SimParams(views=views, window=(0.0, 255.0), proj_pitch=2)
    p1 = S.SimParams(views=views, window=(0.0, 255.0), proj_pitch=1)
    slab = block[:8]
    n = slab.shape[1] // 8
    t_mu, mu = cpu(lambda: S.gray_to_mu(slab.astype(np.float32).mean(0), (0, 255), 4e-4))
    t_p2, trans = cpu(S.forward_project, mu, p2, 10.0)
    t_p2b, _ = cpu(S.forward_project, np.stack([mu] * 4), p2, 10.0)
    t_p1, _ = cpu(S.forward_project, mu, p1, 10.0)
    t_noise, sino = cpu(S.add_noise, trans, p2.photons, rng)
    t_fbp, rec = cpu(S.fbp, sino, (n, n), 1.0, 80.0, "hamming")
    from scipy import ndimage
    t_smooth, _ = cpu(ndimage.gaussian_filter, rec, 0.5)
    out = {"slab_mean_and_mu": t_mu, "project_pitch2": t_p2,
           "project_pitch2_batch4": t_p2b / 4, "project_pitch1": t_p1,
           "noise": t_noise, "fbp": t_fbp, "smoothing": t_smooth}
    out.update(skimage_stage(mu, views, sino))
    return out


def skimage_stage(mu: np.ndarray, views: int, sino: np.ndarray) -> dict:
    """scikit-image radon (HR and HR/2 grid) and iradon (LR grid), CPU s per slice."""
    from skimage.transform import iradon, radon

    sub = 16
    theta = np.linspace(0.0, 360.0, views, endpoint=False)
    half = mu.reshape(mu.shape[0] // 2, 2, mu.shape[1] // 2, 2).mean(axis=(1, 3))
    t_full, _ = cpu(radon, mu, theta[:sub], circle=False)
    t_half, _ = cpu(radon, half, theta[:sub], circle=False)
    n = mu.shape[0] // 8
    t_ir, _ = cpu(iradon, sino.T, theta, output_size=n, filter_name="hamming", circle=False)
    scale = views / sub
    return {"skimage_radon_hr": t_full * scale, "skimage_radon_half": t_half * scale,
            "skimage_iradon_lr": t_ir}


def end_to_end(block: np.ndarray, workers: int, views: int) -> dict:
    from microct_sr.simulate import SimParams, simulate_volume

    vol = ArrayVolume(block, (10.0, 10.0, 10.0))
    params = SimParams(views=views, rotation_deg=3.0, shift_um=(50.0, -30.0), window=(0, 255))
    with tempfile.TemporaryDirectory() as tmp:
        c0 = time.process_time()
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        simulate_volume(vol, Path(tmp) / "lr", params, quiet=True, workers=workers)
        wall = time.perf_counter() - t0
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (time.process_time() - c0) + (ch1.ru_utime - ch0.ru_utime) \
            + (ch1.ru_stime - ch0.ru_stime)
    n_lr = block.shape[0] // 8
    return {"lr_slices": n_lr, "workers": workers, "wall_s": wall, "cpu_s": cpu_s,
            "wall_per_lr_slice": wall / n_lr, "cpu_per_lr_slice": cpu_s / n_lr}


def read_speed(block: np.ndarray) -> float:
    """Seconds per HR slice read back from a multi-page TIFF (open_volume)."""
    import tifffile

    from microct_sr.volume import open_volume

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hr.tif"
        tifffile.imwrite(path, block, imagej=True)
        t0 = time.perf_counter()
        with open_volume(path, spacing_um=(10.0, 10.0, 10.0)) as v:
            for z in range(0, len(v), 8):
                v.read(z, z + 8).mean()
        return (time.perf_counter() - t0) / block.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1280, help="HR slice size (y = x)")
    ap.add_argument("--depth", type=int, default=4000, help="HR slices to extrapolate to")
    ap.add_argument("--lr-slices", type=int, default=4, help="LR slices to simulate")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--views", type=int, default=225)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    block = hr_block(8 * a.lr_slices, a.size)
    st = stages(block, a.views)
    e2e = end_to_end(block, a.workers, a.views)
    read_s = read_speed(block)
    n_lr = math.ceil(a.depth / 8)
    wall_est = e2e["wall_per_lr_slice"] * n_lr + read_s * a.depth
    quiet_est = e2e["cpu_per_lr_slice"] * n_lr / a.workers + read_s * a.depth
    goal = 30 * 60
    res = {"target": [a.depth, a.size, a.size], "lr_slices_target": n_lr,
           "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
           "stages_cpu_s_per_lr_slice": {k: round(v, 3) for k, v in st.items()},
           "end_to_end": {k: round(v, 3) if isinstance(v, float) else v for k, v in e2e.items()},
           "read_s_per_hr_slice": round(read_s, 4),
           "estimate_wall_min": round(wall_est / 60, 1),
           "estimate_idle_cores_min": round(quiet_est / 60, 1),
           "ratio_to_goal_wall": round(wall_est / goal, 2),
           "ratio_to_goal_idle_cores": round(quiet_est / goal, 2),
           "skimage_vs_torch_projection": round(st["skimage_radon_half"] / st["project_pitch2"], 1)}
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
        return
    print(f"HR {a.size}x{a.size}, {a.views} views, factor 8; load average {res['load_average']}")
    print("CPU s per LR slice, one thread:")
    for k, v in res["stages_cpu_s_per_lr_slice"].items():
        print(f"  {k:22s} {v:8.3f}")
    print(f"end to end ({e2e['lr_slices']} LR slices, {a.workers} workers): "
          f"{e2e['wall_per_lr_slice']:.2f} s wall, {e2e['cpu_per_lr_slice']:.2f} s CPU per LR slice")
    print(f"reading: {read_s * 1000:.1f} ms per HR slice")
    print(f"extrapolated to {a.depth}x{a.size}x{a.size} ({n_lr} LR slices): "
          f"{res['estimate_wall_min']} min wall now, {res['estimate_idle_cores_min']} min on "
          f"{a.workers} idle cores (goal 30 min: ratios {res['ratio_to_goal_wall']} / "
          f"{res['ratio_to_goal_idle_cores']})")
    print(f"scikit-image radon (HR/2 grid) / torch projector (pitch 2): "
          f"{res['skimage_vs_torch_projection']}x")


if __name__ == "__main__":
    main()
