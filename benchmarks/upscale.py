"""Benchmark `microct-sr upscale` (infer.upscale_volume) on a 160 x 160 x N LR volume.

Measures, in one run on this machine:
- the conv3x3 64 -> 64 peak (GFLOP/s, best over map sizes and NCHW / channels_last), in the
  parent and again in every child right after its timed run (the machine is shared);
- for the default CPU model (`small` preset) and the `paper` preset, random weights:
  slices/s, achieved GFLOP/s (the network's conv MACs x 2 / time) and its ratio to the peak,
  the same for the MACs actually executed (the paper upsampler's fused last stage does fewer,
  see blocks.PixelShuffleUpsampler), peak RSS; `paper` also with the fusion off; `small` also
  with `--self-ensemble` (``ensemble_cost``: its time over the plain run's; its GFLOP figures
  count one pass per slice);
- the same model run by two peers implemented minimally here, on the same volume:
  (a) a Real-ESRGAN-style tile loop (one tile per forward, reflect-free zero-context pad of
      ``--re-pad`` LR px, crop, paste) and (b) MONAI `sliding_window_inference` semantics
      (roi windows at ``(1 - overlap)`` steps, batched ``sw_batch_size`` at a time, constant
      importance map, sum / count);
- the tiled-vs-untiled seam error of infer's blending for the `small` preset;
- peak RSS of a long run (``--rss-slices``, 500 by default) with the default model.

Each measurement runs in its own subprocess (peak RSS = that process's VmHWM) after one
untimed forward pass at the shapes it will use (all methods alike); configs are
timed in ``--repeat`` interleaved rounds and the best round counts (the machine is shared). Ours reads and
writes real TIFF files; the peers get the volume in memory and keep the output in memory
(no I/O charged to them). Ratios printed are peer seconds / our seconds (> 1: we are faster).

    python benchmarks/upscale.py                      # full run, 1 thread (see --threads)
    python benchmarks/upscale.py --slices 8 --paper-slices 0 --rss-slices 0   # quick
    python benchmarks/upscale.py --device cuda --precision fp16 --slices 64 --paper-slices 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZE = 160


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


PEAK_SHAPES = ((1, 48), (1, 64), (1, 96), (1, 160), (4, 160))  # (batch, side) of 64-ch maps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def conv_peak(reps: int = 3, device: str = "cpu", precision: str = "fp32") -> dict:
    """GFLOP/s of conv3x3 64 -> 64 per (batch, side) and memory format; "peak" is the best.
    Small maps fit in cache and run fastest: the peak is what the core can do, the 160 px
    figures are what a whole 160 x 160 slice gets."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval().to(device)
    out: dict = {}
    amp = torch.autocast(device.split(":")[0], dtype=torch.float16,
                         enabled=precision == "fp16")
    with torch.inference_mode(), amp:
        for name, fmt in (("nchw", torch.contiguous_format),
                          ("channels_last", torch.channels_last)):
            c = conv.to(memory_format=fmt)
            for b, side in PEAK_SHAPES:
                x = torch.rand(b, 64, side, side, device=device).contiguous(memory_format=fmt)
                n = max(1, int(4 * 160 * 160 / (b * side * side)))  # ~same work per timing
                n *= 20 if device.startswith("cuda") else 1
                c(x)
                times = []
                for _ in range(reps):
                    _sync(device)
                    t = time.perf_counter()
                    for _ in range(n):
                        c(x)
                    _sync(device)
                    times.append((time.perf_counter() - t) / n)
                out[f"{name}_{b}x{side}"] = 2 * b * side * side * 64 * 64 * 9 / min(times) / 1e9
    out["peak"] = max(out.values())
    return out


# ---- peers (minimal re-implementations of their inference semantics) ---------------------

def realesrgan_tiles(model, img: torch.Tensor, scale: int, tile: int, pad: int) -> torch.Tensor:
    """Real-ESRGAN's tile loop: each tile plus ``pad`` LR px of context (clamped to the image)
    is one forward pass; the tile's part of the output is cropped and pasted."""
    _, _, h, w = img.shape
    out = torch.zeros(1, 1, h * scale, w * scale, device=img.device)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(y0 - pad, 0), max(x0 - pad, 0)
            py1, px1 = min(y1 + pad, h), min(x1 + pad, w)
            res = model(img[:, :, py0:py1, px0:px1])
            oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                res[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    return out


def monai_sliding_window(model, img: torch.Tensor, scale: int, roi: int, sw_batch: int,
                         overlap: float) -> torch.Tensor:
    """MONAI ``sliding_window_inference`` semantics (mode="constant"): windows every
    ``int(roi * (1 - overlap))`` px (last one flush with the border), run ``sw_batch`` windows
    per forward, add each output into a zoomed accumulator, divide by the count map."""
    _, _, h, w = img.shape
    step = max(1, int(roi * (1 - overlap)))

    def starts(n: int) -> list[int]:
        s = list(range(0, max(n - roi, 0) + 1, step))
        return s if s[-1] + roi >= n else s + [n - roi]

    wins = [(y, x) for y in starts(h) for x in starts(w)]
    acc = torch.zeros(1, 1, h * scale, w * scale, device=img.device)
    cnt = torch.zeros(1, 1, h * scale, w * scale, device=img.device)
    for i in range(0, len(wins), sw_batch):
        chunk = wins[i:i + sw_batch]
        batch = torch.cat([img[:, :, y:y + roi, x:x + roi] for y, x in chunk])
        res = model(batch)
        for k, (y, x) in enumerate(chunk):
            sl = (slice(None), slice(None), slice(y * scale, (y + roi) * scale),
                  slice(x * scale, (x + roi) * scale))
            acc[sl] += res[k:k + 1]
            cnt[sl] += 1
    return acc / cnt


# ---- one measurement (child process) -----------------------------------------------------

def make_lr(n: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-noise uint8 LR volume (n, 160, 160), built slice by slice so that the
    benchmark's own set-up does not inflate the peak RSS it reports."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    base = (0.5 + 0.3 * np.sin(yy / 5.0) * np.cos(xx / 7.0)).astype(np.float32)
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for z in range(n):
        noisy = base + 0.05 * rng.standard_normal(base.shape, dtype=np.float32)
        out[z] = np.clip(noisy * 255, 0, 255).astype(np.uint8)
    return out


def child(spec: dict) -> dict:
    """Run one (preset, method) measurement; returns timings and peak RSS."""
    from microct_sr.infer import upscale_volume
    from microct_sr.models import build_model, count_macs, preset
    from microct_sr.volume import create_volume_writer, open_volume, write_volume

    torch.manual_seed(0)
    cfg = preset("r2rcan", spec["preset"])
    model = build_model(cfg).eval()
    gflop = 2 * count_macs(model, (SIZE, SIZE))["total"] / 1e9
    executed = gflop
    if hasattr(model.tail, "fuse_last"):
        model.tail.fuse_last = spec.get("fuse_last", True)
        if model.tail.fuse_last:
            executed += 2 * model.tail.fused_mac_change((SIZE, SIZE)) / 1e9
    n, method = spec["slices"], spec["method"]
    dev, prec = spec.get("device", "cpu"), spec.get("precision", "fp32")
    lr = make_lr(n)
    intensity = {"window": [0, 255], "dtype": "uint8"}
    fmt = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    model = model.to(device=dev, memory_format=fmt)
    tile = spec.get("tile", 0) if method != "ours" else spec.get("ours_tile", 0)
    warm = torch.rand(1, 1, tile or SIZE, tile or SIZE, device=dev).contiguous(memory_format=fmt)
    with torch.inference_mode():  # untimed warm-up of the shapes it will see (oneDNN setup)
        model(warm)
    with tempfile.TemporaryDirectory() as d:
        if method == "ours":
            src = write_volume(Path(d) / "lr.tif", lr, (80.0, 80.0, 80.0))
            del lr
            with open_volume(src) as vol, create_volume_writer(
                    Path(d) / "sr.tif", (n, SIZE * 8, SIZE * 8), np.uint8,
                    (80.0, 10.0, 10.0)) as w:
                t = time.perf_counter()
                stats = upscale_volume(vol, w, model, intensity=intensity,
                                       batch_size=spec["batch_size"] or None, device=dev,
                                       precision=prec,
                                       tile=spec.get("ours_tile", 0), tile_overlap=16,
                                       channels_last=spec.get("channels_last", True),
                                       quiet=True, ensemble=spec.get("ensemble", False))
                seconds = time.perf_counter() - t
            extra = {"compute_seconds": stats["compute_seconds"]}
        else:
            out = np.empty((n, SIZE * 8, SIZE * 8), np.uint8)
            amp = torch.autocast(dev.split(":")[0], dtype=torch.float16, enabled=prec == "fp16")
            t = time.perf_counter()
            with torch.inference_mode(), amp:
                for z in range(n):
                    img = torch.from_numpy(lr[z].astype(np.float32) / 255)[None, None]
                    img = img.to(dev).contiguous(memory_format=fmt)
                    if method == "realesrgan":
                        y = realesrgan_tiles(model, img, 8, spec["tile"], spec["pad"])
                    else:
                        y = monai_sliding_window(model, img, 8, spec["tile"], 4, 0.25)
                    out[z] = (y[0, 0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()
            seconds = time.perf_counter() - t
            extra = {}
    return {**spec, "seconds": seconds, "slices_per_second": n / seconds,
            "gflop_per_slice": gflop, "gflops": gflop * n / seconds,
            "executed_gflop_per_slice": executed, "executed_gflops": executed * n / seconds,
            "peak_rss_mib": peak_rss_mib(), "conv_peak_here": conv_peak(2, dev, prec)["peak"],
            **extra}


def seam_error(tile: int, overlap: int) -> dict:
    """max / mean |tiled - untiled| of infer's blending, small preset, 2 slices, [0, 1] units."""
    from microct_sr.infer import sr_forward, tiled_forward
    from microct_sr.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("r2rcan", "small")).eval()
    x = torch.from_numpy(make_lr(2).astype(np.float32) / 255)[:, None]
    def fwd(t: torch.Tensor) -> torch.Tensor:
        return sr_forward(model, t, precision="fp32")

    with torch.inference_mode():
        whole = fwd(x)
        tiled = tiled_forward(fwd, x, scale=8, tile=tile, overlap=overlap,
                              output_device=torch.device("cpu"))
        pasted = realesrgan_tiles(fwd, x[:1], 8, tile, 0)
    err, perr = (tiled - whole).abs(), (pasted - whole[:1]).abs()
    rng = float(whole.max() - whole.min())
    return {"tile": tile, "overlap": overlap, "output_range": rng,
            "blended_max": float(err.max()), "blended_mean": float(err.mean()),
            "pasted_no_overlap_max": float(perr.max()),
            "pasted_no_overlap_mean": float(perr.mean())}


def run_child(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise RuntimeError(f"child {spec} failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    method = res["method"] + (f"/t{res['ours_tile']}" if res.get("ours_tile") else "") + \
        ("/unfused" if res.get("fuse_last") is False else "") + \
        ("/nchw" if not res.get("channels_last", True) else "") + \
        ("/ens" if res.get("ensemble") else "")
    print(f"  {res['preset']:6s} {method:10s} n={res['slices']:3d} "
          f"{res['slices_per_second']:8.3f} slices/s {res['gflops']:7.1f} GFLOP/s "
          f"peak RSS {res['peak_rss_mib']:7.0f} MiB", file=sys.stderr, flush=True)
    return res


def summarise(rounds: list[dict]) -> dict:
    """Best round of one config (its figures), plus the median time and the largest RSS."""
    best = dict(min(rounds, key=lambda r: r["seconds"]))
    best["seconds_all"] = [r["seconds"] for r in rounds]
    best["seconds_median"] = float(np.median(best["seconds_all"]))
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rounds)
    best["conv_peak_here"] = max(r["conv_peak_here"] for r in rounds)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--slices", type=int, default=32, help="slices for the small preset")
    ap.add_argument("--paper-slices", type=int, default=1, help="slices for paper (0: skip)")
    ap.add_argument("--rss-slices", type=int, default=500, help="long run for RSS (0: skip)")
    ap.add_argument("--batch-size", type=int, default=0, help="ours; 0: infer's default")
    ap.add_argument("--tile", type=int, default=64, help="peers' tile / roi (LR px)")
    ap.add_argument("--re-pad", type=int, default=10, help="Real-ESRGAN tile_pad (LR px)")
    ap.add_argument("--ours-tile", type=int, default=64,
                    help="also time ours with --tile N --tile-overlap 16 (0: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (best counts)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads (1: stable figures on a shared machine)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (peers run there too)")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                    help="fp16: autocast for ours, the peers and the conv peak")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    res: dict = {"command": " ".join(["python", "benchmarks/upscale.py", *sys.argv[1:]]),
                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    res["conv_peak"] = conv_peak(device=args.device, precision=args.precision)
    print(f"conv3x3 64->64 peak: {res['conv_peak']}", file=sys.stderr)
    peers = {"tile": args.tile, "pad": args.re_pad, "channels_last": True}
    configs = []
    for name, n, bs in (("small", args.slices, args.batch_size),
                        ("paper", args.paper_slices, args.batch_size)):
        if n <= 0:
            continue
        base = {"preset": name, "slices": n, "batch_size": bs, "device": args.device,
                "precision": args.precision}
        configs.append({**base, "method": "ours", "channels_last": True})
        if name == "small":  # the memory-format decision (NCHW vs channels_last)
            configs.append({**base, "method": "ours", "channels_last": False})
            # what --self-ensemble costs (8 passes per slice)
            configs.append({**base, "method": "ours", "channels_last": True, "ensemble": True})
        else:  # the fused upsampler's last stage against the plain layout
            configs.append({**base, "method": "ours", "channels_last": True, "fuse_last": False})
        if args.ours_tile:  # whole slices vs tiles for the same work
            configs.append({**base, "method": "ours", "channels_last": True,
                            "ours_tile": args.ours_tile})
        configs += [{**base, "method": m, **peers} for m in ("realesrgan", "monai")]
    # Interleaved rounds: other people's load drifts, so every config is timed once per round
    # and the best round counts (the median is reported too).
    timings: list[list[dict]] = [[] for _ in configs]
    for _ in range(args.repeat):
        for i, spec in enumerate(configs):
            timings[i].append(run_child(spec, args.threads))
    res["runs"] = [summarise(t) for t in timings]
    for r in res["runs"]:
        ours = next(o for o in res["runs"] if o["preset"] == r["preset"]
                    and o["method"] == "ours" and o["channels_last"] and not o.get("ours_tile")
                    and o.get("fuse_last", True) and not o.get("ensemble"))
        if r.get("ensemble"):  # > 1: how many times slower the self-ensemble is
            r["ensemble_cost"] = r["seconds"] / ours["seconds"]
        if r["method"] != "ours" or r.get("fuse_last") is False:
            r["ours_speedup"] = r["seconds"] / ours["seconds"]
            r["ours_speedup_median"] = r["seconds_median"] / ours["seconds_median"]
    runs = res["runs"]
    if args.rss_slices > 0:
        res["rss_run"] = run_child({"preset": "small", "slices": args.rss_slices,
                                    "batch_size": args.batch_size, "method": "ours",
                                    "device": args.device, "precision": args.precision,
                                    "channels_last": True},
                                   args.threads)
    res["seam"] = [seam_error(64, 16), seam_error(40, 8)]
    runs_all = runs + ([res["rss_run"]] if "rss_run" in res else [])
    res["machine_conv_peak"] = max([res["conv_peak"]["peak"]] +
                                   [r["conv_peak_here"] for r in runs_all])
    for r in runs_all:
        r["peak_fraction"] = r["gflops"] / res["machine_conv_peak"]
        r["local_peak_fraction"] = r["gflops"] / r["conv_peak_here"]
        r["executed_peak_fraction"] = r["executed_gflops"] / res["machine_conv_peak"]
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
