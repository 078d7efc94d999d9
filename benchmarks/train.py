"""Training speed per preset on this machine, and how much of it is spent waiting for data.

    python benchmarks/train.py [--presets tiny,small,paper] [--arch r2rcan] [--workers 2]
                               [--data PAIR_DIR] [--device cpu]

Without --data it writes a temporary pair folder at the paper's patch size (LR 40x40, HR
320x320, uint16 TIFFs, as `microct-sr pair` writes them) cut from the real LHDL bone volume in
../shared/data (mirrored to 320 pixels), or from a synthetic texture when that is absent.
Each preset trains for a few iterations with its own batch size; the first CSV window (worker
start-up, first allocations) is excluded from the steady-state figures.
Prints one line per preset and a JSON summary: it/s, patches/s, and the data-wait fraction
(time blocked on the data loader / total iteration time; the goal is under 0.05).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from microct_sr.train import LOG_FILE, TrainConfig, train

LHDL = Path(__file__).resolve().parents[2] / "shared" / "data" / "bone" / "lhdl_3155_D_4_bc.tif"
# iterations and batch per preset: enough windows for a steady state, bounded run time
RUNS = {"tiny": dict(iters=60, batch=None, log_every=10),
        "small": dict(iters=24, batch=None, log_every=4),
        "paper": dict(iters=3, batch=2, log_every=1)}


def make_pairs(out: Path, n: int = 192, lr_patch: int = 40, factor: int = 8) -> Path:
    """``n`` uint16 LR/HR pairs in the `pair` layout (4 scan ids so the split has val scans)."""
    hp = lr_patch * factor
    if LHDL.is_file():
        vol = tifffile.imread(LHDL)
        source = "LHDL"
    else:
        from scipy import ndimage
        rng = np.random.default_rng(0)
        vol = (ndimage.gaussian_filter(rng.standard_normal((16, 200, 200)), 3) * 2000 + 8000)
        source = "synthetic"
    rng = np.random.default_rng(1)
    (out / "lr").mkdir(parents=True)
    (out / "hr").mkdir()
    rows = []
    for i in range(n):
        sl = vol[rng.integers(len(vol))].astype(np.float32)
        hr = np.pad(sl, ((0, hp - sl.shape[0]), (0, hp - sl.shape[1])), mode="symmetric")
        hr = (hr * 64).clip(0, 65535).astype(np.uint16)
        lr = hr.reshape(lr_patch, factor, lr_patch, factor).mean(axis=(1, 3)).astype(np.uint16)
        pid = f"scan{i % 4}_{i:05d}"
        tifffile.imwrite(out / "lr" / f"{pid}.tif", lr)
        tifffile.imwrite(out / "hr" / f"{pid}.tif", hr)
        rows.append({"patch_id": pid, "scan_id": f"scan{i % 4}"})
    with open(out / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["patch_id", "scan_id"])
        w.writeheader()
        w.writerows(rows)
    print(f"pair folder: {n} pairs LR {lr_patch}^2 / HR {hp}^2 uint16 from {source}",
          file=sys.stderr)
    return out


def steady_state(run_dir: Path) -> tuple[float, float]:
    """(it/s, data-wait fraction) over the CSV windows after the first."""
    with open(run_dir / LOG_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    its = [int(b["iteration"]) - int(a["iteration"]) for a, b in zip(rows, rows[1:])]
    secs = [n / float(r["it_per_s"]) for n, r in zip(its, rows[1:])]
    if not secs:
        return float("nan"), float("nan")
    wait = sum(s * float(r["data_wait"]) for s, r in zip(secs, rows[1:]))
    return sum(its) / sum(secs), wait / sum(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small,paper")
    ap.add_argument("--arch", default="r2rcan")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_pairs(Path(tmp) / "pairs")
        for name in args.presets.split(","):
            run = RUNS[name]
            out = Path(tmp) / f"run_{name}"
            s = train(TrainConfig(data=[str(data)], out=str(out), arch=args.arch, preset=name,
                                  iters=run["iters"], batch_size=run["batch"],
                                  workers=args.workers, device=args.device,
                                  val_every=10**9, save_every=10**9,
                                  log_every=run["log_every"], quiet=True))
            ips, wait = steady_state(out)
            batch = run["batch"] or TrainConfig(data=[], out="", preset=name).resolved().batch_size
            res = {"preset": name, "arch": args.arch, "batch": batch, "iters": run["iters"],
                   "workers": args.workers, "it_per_s": round(ips, 4),
                   "patches_per_s": round(ips * batch, 2),
                   "data_wait_fraction": round(wait, 4),
                   "whole_run_it_per_s": s["it_per_s"],
                   "whole_run_data_wait_fraction": s["data_wait_fraction"]}
            results.append(res)
            print(f"{name:6s} {args.arch} batch {batch:3d}: {ips:8.3f} it/s "
                  f"({ips * batch:7.1f} patches/s), data wait {100 * wait:5.2f}% "
                  f"(whole run incl. start-up {100 * s['data_wait_fraction']:.2f}%)")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
