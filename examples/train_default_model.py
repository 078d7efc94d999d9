#!/usr/bin/env python3
"""Reproduce the shipped default model (weights/default.pt) and its model card figures.

Stages (each skips work whose output exists, so the script can be re-run after a stop):
  hr        HR volumes at a nominal 10 um: the FDA vertebra ROIs given gray values
            (`microct-sr phantom --mask`), the same ROIs magnified 1.5x and 2x (296^3 crops,
            trabeculae as thick and far apart as a rat's), procedural phantoms (`microct-sr
            phantom`), with a random gray-level window per volume; the real LHDL bone volume
            is held out for test.
  simulate  one LR scan per (HR volume, scanner setting): training scans draw their setting at
            random (views, photons, smoothing, filter, motion; three "first" settings, three
            from a wider range, one or two heavily smoothed ones and two near-nominal ones
            (for the `near` candidate only) per volume); held-out scans
            get the nominal setting (225 views, Hamming, smoothing 0.5) plus off-nominal ones,
            some outside the training range, without motion so that `evaluate` compares aligned
            volumes.
  pair      `microct-sr pair` registers every LR scan to its HR volume and cuts patch pairs.
  train     `microct-sr train --stage psnr` (L1) on the "first" training scans (split by HR
            volume): the first default model.
  finetune  the same with `--pixel-loss mse`, initialised from it, on every training scan but
            the magnified vertebrae and the heavily smoothed scans: the second default model.
  scaled    the same again, initialised from the second model, on every training scan but
            the heavily smoothed ones: the third default model.
  gray      the same again, initialised from the third model, on every training scan, with
            gray-level augmentation (`train --gray-augment`) and an EMA of the weights: the
            fourth default model.
  context   the fifth model (the shipped one): the fourth widened to 2.5D input (each LR slice
            with its two neighbours; `widen_input`, neighbour weights starting at zero) and
            fine-tuned like the fourth on the same patches cut as 3-slice stacks
            (`context_pairs`, what `pair --context 1` cuts).
  near      (not run by default) the fourth model fine-tuned further with two near-nominal scans
            per training volume added (180-300 views, Hamming or Hann, smoothing 0.2-0.9; they
            are simulated and paired with the others): a candidate, not shipped (model card).
  evaluate  `microct-sr upscale` + `microct-sr evaluate` against bicubic on every held-out scan.

Usage: python examples/train_default_model.py WORK_DIR
       [--stages hr,simulate,pair,train,finetune,scaled,gray,context,evaluate] [--iters N]
       [--finetune-iters N] [--scaled-iters N] [--gray-iters N] [--near-iters N]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# (name, source, split). Split is by HR volume ("animal"): settings of one volume never straddle.
VERTEBRAE = sorted((SHARED / "bone" / "vertebra_rois").glob("*.nrrd")) if SHARED.exists() else []
PHANTOMS = [  # name, bvtv, thickness_um, cortex, seed
    ("ph1", 0.15, 60, True, 101), ("ph2", 0.25, 80, False, 102), ("ph3", 0.32, 100, True, 103),
    ("ph4", 0.20, 55, False, 104), ("ph5", 0.22, 75, True, 105), ("ph6", 0.28, 90, False, 106),
]
SPLIT_OF_PHANTOM = {"ph1": "train", "ph2": "train", "ph3": "train", "ph4": "train",
                    "ph5": "val", "ph6": "test"}
# The vertebra ROIs again, magnified (the third model's data): at 1x their trabeculae are thinner
# and closer together (HR Tb.Th 73 um, Tb.Sp 164 um on vert7) than the real LHDL bone's (104 and
# 389 um) or a rat's. (name suffix, magnification, corner of the 296^3 crop: 0 near, 1 far).
SCALED_CROPS = {"train": (("a", 1.5, 0), ("b", 2.0, 1)), "val": (("a", 1.5, 0),),
                "test": (("a", 1.5, 1),)}

NOMINAL = {"views": 225, "photons": None, "smoothing": 0.5, "filter": "hamming"}
# Held-out settings: the nominal one, then plausible scanners, then some outside training range.
TEST_SETTINGS = {
    "nominal": NOMINAL,
    "views450": {**NOMINAL, "views": 450},
    "views120": {**NOMINAL, "views": 120},
    "lowdose": {**NOMINAL, "photons": 2500.0},
    "highdose": {**NOMINAL, "photons": 40000.0},
    "ramp_nosmooth": {**NOMINAL, "filter": "ramp", "smoothing": 0.0},
    "sheplogan_smooth1": {**NOMINAL, "filter": "shepp-logan", "smoothing": 1.0},
    "smooth2": {**NOMINAL, "smoothing": 2.0},
    "out_views60": {**NOMINAL, "views": 60},
    "out_smooth3": {**NOMINAL, "smoothing": 3.0},
    "out_smooth4": {**NOMINAL, "smoothing": 4.0},
    "out_photons1000": {**NOMINAL, "photons": 1000.0},
}
VERT_TEST_SETTINGS = ("nominal", "views120", "lowdose", "ramp_nosmooth", "smooth2")


def acquisition(rng: random.Random) -> dict:
    """Views and photons of a training scan (drawn in this order: the seeds' settings depend
    on it)."""
    return {"views": rng.choice([90, 120, 150, 180, 225, 300, 360, 450, 600]),
            "photons": float(round(10 ** rng.uniform(np.log10(2000), np.log10(50000))))}


def random_setting(rng: random.Random) -> dict:
    """A training scanner setting; the ranges bracket the nominal 225 views / Hamming / 0.5 px
    widely, because a model trained on one setting hurts users whose scanner differs."""
    return {
        **acquisition(rng),
        "smoothing": round(rng.uniform(0.0, 2.2), 2),
        "filter": rng.choice(["hamming", "hamming", "hann", "shepp-logan", "cosine", "ramp"]),
    }


def wide_setting(rng: random.Random) -> dict:
    """An extra training setting from a wider range (the second model's data): the first default
    sharpened heavily smoothed scans (Gaussian sigma >= 2 LR px) and under-sharpened unsmoothed
    ramp-filtered ones, both of which were rare in :func:`random_setting`'s draws."""
    filt = rng.choice(["hamming", "hann", "shepp-logan", "cosine", "ramp", "ramp"])
    smooth = rng.uniform(0.0, 3.2)
    if filt in ("ramp", "shepp-logan") and rng.random() < 0.5:
        smooth = 0.0
    return {**acquisition(rng), "smoothing": round(smooth, 2), "filter": filt}


def heavy_setting(rng: random.Random) -> dict:
    """A heavily smoothed training setting (the fourth model's data): Gaussian sigma 1.8-4.5 LR
    px, where the third model sharpened 1x vertebrae into bone that is not there (below
    bicubic at sigma 2) and such scans were rare in the earlier draws. On their own they did
    not fix that (weights/MODEL_CARD.md); they widen the range the model has seen."""
    filt = rng.choice(["hamming", "hann", "shepp-logan", "cosine", "ramp"])
    return {**acquisition(rng), "smoothing": round(rng.uniform(1.8, 4.5), 2), "filter": filt}


def near_setting(rng: random.Random) -> dict:
    """A training setting near the nominal protocol (225 views, Hamming, smoothing 0.5: the
    paper's scanner; the `near` candidate's data): the earlier draws spread evenly over a wide
    range, so settings close to the one most users scan at were no more common than extreme
    ones."""
    return {"views": rng.choice([180, 225, 225, 300]),
            "photons": float(round(10 ** rng.uniform(np.log10(8000), np.log10(40000)))),
            "smoothing": round(rng.uniform(0.2, 0.9), 2),
            "filter": rng.choice(["hamming", "hamming", "hamming", "hann"])}


N_NEAR = 2  # near-nominal training scans per training volume (the `near` candidate)

# Heavily smoothed training scans per volume kind (fourth model): most on the 1x vertebrae,
# whose fine trabeculae vanish under strong smoothing.
N_HEAVY = {"vert": 2, "vs": 1, "ph": 1}


def run(cmd: list[str]) -> str:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def scaled_mask(path: Path, zoom: float, corner: int, size: int = 296) -> np.ndarray:
    """A vertebra ROI's bone mask magnified ``zoom`` times (linear interpolation of the mask,
    threshold 0.5) and cropped to ``size``^3 at the near (0) or far (1) corner."""
    from scipy import ndimage

    from microct_sr.volume import open_volume

    with open_volume(path, spacing_um=(10.0, 10.0, 10.0)) as v:  # no spacing in the file
        m = (v.read(0, len(v)) > 0).astype(np.float32)
    big = ndimage.zoom(m, zoom, order=1) >= 0.5
    start = [0 if corner == 0 else n - size for n in big.shape]
    crop = big[tuple(slice(a, a + size) for a in start)]
    return crop.astype(np.uint8)


def hr_volumes(work: Path) -> dict[str, tuple[Path, str]]:
    """Make the HR volumes, the magnified vertebra crops of :data:`SCALED_CROPS` included;
    returns {name: (path, split)}."""
    from microct_sr.volume import open_volume, write_volume

    hr_dir = work / "hr"
    hr_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}
    crops: dict[str, tuple[Path, float, int]] = {}  # magnified crop: (source ROI, zoom, corner)
    rng = np.random.default_rng(7)
    n_vert = len(VERTEBRAE)
    for i, mask in enumerate(VERTEBRAE):
        name = f"vert{i + 1}"
        split = "test" if i == n_vert - 1 else ("val" if i == n_vert - 2 else "train")
        out[name] = (hr_dir / f"{name}.tif", split)
    for name, bvtv, th, cortex, seed in PHANTOMS:
        out[name] = (hr_dir / f"{name}.tif", SPLIT_OF_PHANTOM[name])
    for i in range(n_vert):
        split = out[f"vert{i + 1}"][1]
        for tag, zoom, corner in SCALED_CROPS[split]:
            out[f"vs{i + 1}{tag}"] = (hr_dir / f"vs{i + 1}{tag}.tif", split)
            crops[f"vs{i + 1}{tag}"] = (VERTEBRAE[i], zoom, corner)
    for name, (path, _split) in out.items():
        # A random gray window per volume: scanners and NRecon settings map bone and marrow to
        # different gray levels (the real LHDL scan has marrow near 10, the phantoms near 60).
        # Drawn for every volume, made or not, so that each volume's window stays the same.
        lo, hi = float(rng.uniform(-60, 40)), float(rng.uniform(225, 300))
        if path.exists():
            continue
        raw = hr_dir / f"{name}.raw.tif"
        if name in crops:
            mask_file = hr_dir / f"{name}.mask.tif"
            write_volume(mask_file, scaled_mask(*crops[name]), (10.0, 10.0, 10.0),
                         overwrite=True)
            run(["microct-sr", "phantom", str(raw), "--mask", str(mask_file), "--spacing-um",
                 "10", "--seed", str(100 + int(name[2:-1])), "--overwrite", "--json"])
            mask_file.unlink()
        elif name.startswith("vert"):
            mask = VERTEBRAE[int(name[4:]) - 1]
            run(["microct-sr", "phantom", str(raw), "--mask", str(mask), "--spacing-um", "10",
                 "--seed", name[4:], "--overwrite", "--json"])
        else:
            _, bvtv, th, cortex, seed = next(p for p in PHANTOMS if p[0] == name)
            run(["microct-sr", "phantom", str(raw), "--shape", "192", "320", "320",
                 "--spacing-um", "10", "--bvtv", str(bvtv), "--thickness-um", str(th),
                 "--cortex" if cortex else "--no-cortex", "--seed", str(seed), "--overwrite",
                 "--json"])
        vol = open_volume(raw)
        a = vol.read(0, vol.shape[0]).astype(np.float32)
        z, y, x = (s - s % 8 for s in a.shape)
        a = a[:z, :y, :x]
        a = (a - lo) * 255.0 / (hi - lo)
        write_volume(path, np.clip(np.rint(a), 0, 255).astype(np.uint8), (10.0, 10.0, 10.0),
                     overwrite=True)
        raw.unlink()
    lhdl = SHARED / "bone" / "lhdl_3155_D_4_bc.tif"
    out["lhdl"] = (lhdl, "test")
    return out


def simulate_all(work: Path, hrs: dict, n_train_settings: int,
                 n_wide_settings: int = 0) -> list[dict]:
    """Simulate LR scans; returns one record per scan. Training volumes get
    ``n_train_settings`` draws of :func:`random_setting` then ``n_wide_settings`` of
    :func:`wide_setting` (separate generators: adding wide ones keeps the first ones)."""
    rng, rng_wide = random.Random(11), random.Random(12)
    rng_scaled = random.Random(13)  # the magnified vertebrae draw apart: the others stay the same
    rng_heavy = random.Random(14)  # and so do the heavily smoothed scans
    rng_near = random.Random(15)  # and the near-nominal ones
    scans = []
    (work / "lr").mkdir(parents=True, exist_ok=True)
    order = {"train": 0, "val": 1, "test": 2}  # training data first
    for name, (path, split) in sorted(hrs.items(), key=lambda kv: order[kv[1][1]]):
        if split == "test":
            keep = {"lhdl": tuple(TEST_SETTINGS)}.get(
                name, VERT_TEST_SETTINGS if name.startswith("v") else ("nominal",))
            settings = {k: TEST_SETTINGS[k] for k in keep}
        elif split == "val":
            settings = {"nominal": NOMINAL,
                        "rand0": random_setting(rng_scaled if name.startswith("vs") else rng)}
        elif name.startswith("vs"):
            settings = {f"rand{k}": random_setting(rng_scaled) for k in range(2)}
            settings.update({f"wide{k}": wide_setting(rng_scaled) for k in range(2)})
        else:
            settings = {f"rand{k}": random_setting(rng) for k in range(n_train_settings)}
            settings.update({f"wide{k}": wide_setting(rng_wide) for k in range(n_wide_settings)})
        if split == "train":
            kind = next(k for k in ("vs", "vert", "ph") if name.startswith(k))
            settings.update({f"heavy{k}": heavy_setting(rng_heavy) for k in range(N_HEAVY[kind])})
            settings.update({f"near{k}": near_setting(rng_near) for k in range(N_NEAR)})
        for tag, s in settings.items():
            scan_id = f"{name}-{tag}"
            lr = work / "lr" / scan_id
            cmd = ["microct-sr", "simulate", str(path), str(lr), "--views", str(s["views"]),
                   "--smoothing", str(s["smoothing"]), "--filter", s["filter"],
                   "--quiet", "--seed", str(zlib.crc32(scan_id.encode()) % 10000)]
            if split != "test":  # held-out scans stay aligned with their HR for evaluate
                cmd.append("--random-motion")
            if s["photons"] is not None:
                cmd += ["--photons", str(s["photons"])]
            if name == "lhdl":  # the real volume is 19.5 um; we treat it as a nominal 10 um scan
                cmd += ["--spacing-um", "10"]
            if not (lr / "simulation.json").exists():
                run(cmd + ["--overwrite"])
            scans.append({"scan_id": scan_id, "hr": str(path), "lr": str(lr), "split": split,
                          "hr_name": name, "setting": tag, **s})
    (work / "scans.json").write_text(json.dumps(scans, indent=2))
    return scans


def registration_error(reg: dict, truth: dict) -> tuple[float, float]:
    """(|angle error| deg, |shift error| um) of `pair`'s registration against simulate's truth."""
    d_angle = abs(reg["angle_deg"] - truth["rotation_deg"])
    d_shift = float(np.hypot(*(np.subtract(reg["shift_um"], truth["shift_um"]))))
    return d_angle, d_shift


def pair_all(work: Path, scans: list[dict]) -> None:
    """`microct-sr pair` every training/validation scan.

    `ransac` registration first, checked against simulate's truth (1 degree, one LR pixel). When
    it fails (too few A-KAZE matches: above about 1 LR pixel of smoothing, or at low dose, thin
    trabeculae leave no keypoints at 80 um), the scan is paired with its known motion
    (`--motion-from simulation.json`, NCC screen 0.3) so that the training data still covers
    blurred and noisy scanners. A ransac fit that misses the truth drops the scan.
    """
    out = work / "pairs"
    report = []
    for s in scans:
        if s["split"] == "test":
            continue
        reg_file = out / "registration.json"
        regs = json.loads(reg_file.read_text()) if reg_file.exists() else []
        reg = next((r for r in regs if r["scan_id"] == s["scan_id"]), None)
        cmd = ["microct-sr", "pair", s["lr"], s["hr"], str(out), "--scan-id", s["scan_id"],
               "--lr-patch", "16", "--max-patches-per-slice", "6", "--slices", "48",
               "--overwrite", "--json", "--quiet"]
        truth_file = Path(s["lr"]) / "simulation.json"
        if reg is None:
            try:
                reg = json.loads(run(cmd))["registration"]
            except subprocess.CalledProcessError as e:
                print(f"ransac failed for {s['scan_id']} (exit {e.returncode}); pairing it with "
                      "its known motion", file=sys.stderr)
                reg = json.loads(run(cmd + ["--motion-from", str(truth_file), "--min-ncc",
                                            "0.3"]))["registration"]
        err = (registration_error(reg, json.loads(truth_file.read_text()))
               if reg["method"] == "ransac" else None)
        ok = err is None or (err[0] <= 1.0 and err[1] <= 80.0)
        report.append({"scan_id": s["scan_id"], "method": reg["method"],
                       "patches": reg.get("patches"),
                       "angle_error_deg": None if err is None else round(err[0], 3),
                       "shift_error_um": None if err is None else round(err[1], 1), "kept": ok})
    kept = {r["scan_id"] for r in report if r["kept"]}
    split = {k: [s["scan_id"] for s in scans if s["split"] == k and s["scan_id"] in kept]
             for k in ("train", "val")}
    split["test"] = []
    (work / "pair_report.json").write_text(json.dumps(report, indent=2))
    (work / "split_near.json").write_text(json.dumps(split, indent=2))
    split = {k: [i for i in v if "-near" not in i] for k, v in split.items()}
    (work / "split.json").write_text(json.dumps(split, indent=2))
    # Each model's data: the L1 stage (first model) trained on the first settings only, the MSE
    # fine-tuning (second model) on every setting but the magnified vertebrae (third model) and
    # the heavily smoothed scans (fourth model); split.json has them all but the near-nominal
    # scans (the `near` candidate), split_near.json all of them.
    light = {k: [i for i in v if "-heavy" not in i] for k, v in split.items()}
    unscaled = {k: [i for i in v if not i.startswith("vs")] for k, v in light.items()}
    first = {k: [i for i in v if "-wide" not in i] for k, v in unscaled.items()}
    (work / "split_l1.json").write_text(json.dumps(first, indent=2))
    (work / "split_mse.json").write_text(json.dumps(unscaled, indent=2))
    (work / "split_scaled.json").write_text(json.dumps(light, indent=2))
    n_ransac = sum(r["method"] == "ransac" for r in report)
    print(f"pair: {n_ransac} of {len(report)} scans registered by ransac, the rest by known "
          f"motion; {len(kept)} kept", file=sys.stderr)


def train(work: Path, iters: int, preset: str, *, pixel_loss: str = "l1",
          init: Path | None = None, split: str = "split_l1.json", name: str = "",
          extra: tuple[str, ...] = (), pick_best: bool = True, data: str = "pairs") -> Path:
    """The L1 stage (the first default model: from scratch, lr 2e-4, the first settings only)
    or, with ``init``, a fine-tuning stage (lr 1e-4) on the scans of ``split``; ``extra``
    options go to `microct-sr train`. Returns the best validation checkpoint as a model file,
    or with ``pick_best`` False the run's model.pt (an EMA run's final average)."""
    run_dir = work / f"run_{preset}{name}"
    cmd = ["microct-sr", "train", "--stage", "psnr", "--data", str(work / data),
           "--out", str(run_dir), "--arch", "r2rcan", "--preset", preset, "--iters", str(iters),
           "--batch-size", "16", "--lr", "2e-4" if init is None else "1e-4",
           "--pixel-loss", pixel_loss, "--val-every", "250", "--save-every", "250",
           "--split-file", str(work / split), "--workers", "1", "--seed", "0", "--json"]
    if init is not None:
        cmd += ["--init", str(init)]
    cmd += list(extra)
    if (run_dir / "checkpoints").exists() and not (run_dir / "model.pt").exists():
        cmd.append("--resume")
    if not (run_dir / "model.pt").exists():
        run(cmd)
    return export_best(run_dir) if pick_best else run_dir / "model.pt"


# The fourth model's stage: gray-level augmentation (the LHDL bone's marrow is darker than any
# training volume's), a learning rate halved every 1,500 iterations and an EMA of the weights,
# whose final average is the model (validation PSNR on the simulated scans is flat and noisy).
GRAY_OPTIONS = ("--gray-augment", "1.0", "--ema", "0.999", "--lr-step", "1500")


def export_best(run_dir: Path) -> Path:
    """The checkpoint with the best validation PSNR (kept by `train`) as a plain model file:
    validation PSNR swings by ~0.5 dB between checkpoints of this small, noisy data set."""
    from microct_sr.checkpoint import load_checkpoint, load_model, save_model
    from microct_sr.models import ModelConfig

    final = load_checkpoint(sorted((run_dir / "checkpoints").glob("iter_*.pt"))[-1])
    best = final["train_state"]["best"]
    path = run_dir / "checkpoints" / f"iter_{best['iteration']:08d}.pt"
    model, ckpt = load_model(path)
    prov = {**ckpt["provenance"], "iterations": best["iteration"],
            "selected": f"best validation PSNR {best['psnr']:.2f} dB at iteration "
                        f"{best['iteration']} of {final['train_state']['iteration']}"}
    return save_model(run_dir / "best.pt", model, ModelConfig.from_dict(ckpt["config"]),
                      intensity=ckpt["intensity"], provenance=prov)


def grow_model(src: Path, dst: Path, n_rcab_groups: int) -> Path:
    """``src`` deepened to ``n_rcab_groups`` RCAB groups, computing the same function: the
    body layout alternates RCAB and Res2 groups, so the extra RCAB groups come after the last
    Res2 group, and their closing conv starts at zero, which makes each one an identity (its
    short skip) until training moves it."""
    import dataclasses

    import torch

    from microct_sr.checkpoint import load_model, save_model
    from microct_sr.models import ModelConfig, build_model

    small, ckpt = load_model(src)
    config = ModelConfig.from_dict(ckpt["config"])
    if config.arch != "r2rcan" or n_rcab_groups < config.n_rcab_groups:
        raise ValueError(f"{src}: can only add RCAB groups to an r2rcan model")
    big_config = dataclasses.replace(config, n_rcab_groups=n_rcab_groups)
    torch.manual_seed(0)  # the new blocks' initial weights
    big = build_model(big_config)
    big.load_state_dict({**big.state_dict(), **small.state_dict()})
    for group in list(big.body)[len(small.body):]:
        torch.nn.init.zeros_(group.conv.weight)
        torch.nn.init.zeros_(group.conv.bias)
    return save_model(dst, big, big_config, intensity=ckpt["intensity"],
                      provenance={**ckpt["provenance"], "grown_from": str(src)})


def add_refinement(src: Path, dst: Path) -> Path:
    """``src`` (a "light" upsampler model) with the "refine" upsampler, computing the same
    function: the light step keeps its weights and the refinement's last conv starts at zero."""
    import dataclasses

    import torch

    from microct_sr.checkpoint import load_model, save_model
    from microct_sr.models import ModelConfig, build_model

    light, ckpt = load_model(src)
    config = ModelConfig.from_dict(ckpt["config"])
    if config.upsampler != "light":
        raise ValueError(f"{src}: upsampler is {config.upsampler!r}, not 'light'")
    refined_config = dataclasses.replace(config, upsampler="refine")
    torch.manual_seed(0)  # the refinement's initial weights
    refined = build_model(refined_config)
    state = {k.replace("tail.", "tail.light.", 1): v for k, v in light.state_dict().items()}
    refined.load_state_dict({**refined.state_dict(), **state})
    return save_model(dst, refined, refined_config, intensity=ckpt["intensity"],
                      provenance={**ckpt["provenance"], "refined_from": str(src)})


def context_pairs(work: Path, scans: list[dict], context: int) -> Path:
    """work/pairs_ctx<k>: the pair folder work/pairs with every LR patch replaced by its 2.5D
    stack (the patch's LR slice and ``context`` neighbours on each side, clamped at the
    volume's ends): what `pair --context k` cuts, here without registering every scan again
    (an LR patch is a plain crop, LR[lr_slice, lr_y - p/2 : lr_y + p/2, lr_x - p/2 : ...]).
    HR patches are hard links to work/pairs'."""
    import csv

    import tifffile

    from microct_sr.infer import context_index
    from microct_sr.volume import open_volume

    src, dst = work / "pairs", work / f"pairs_ctx{context}"
    if (dst / "pairs.csv").exists():
        return dst
    tmp = work / f".pairs_ctx{context}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    (tmp / "lr").mkdir(parents=True)
    (tmp / "hr").mkdir()
    with open(src / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lr_of = {s["scan_id"]: s["lr"] for s in scans}
    by_scan: dict[str, list[dict]] = {}
    for r in rows:
        by_scan.setdefault(r["scan_id"], []).append(r)
    for scan_id, scan_rows in by_scan.items():
        vol = open_volume(lr_of[scan_id])
        lr = np.asarray(vol.read(0, vol.shape[0]))
        for r in scan_rows:
            flat = tifffile.imread(src / "lr" / f"{r['patch_id']}.tif")
            p = flat.shape[0]
            i0, j0 = round(float(r["lr_y"]) - p / 2), round(float(r["lr_x"]) - p / 2)
            k = int(r["lr_slice"])
            stack = lr[context_index(k, k + 1, context, lr.shape[0])[0], i0:i0 + p, j0:j0 + p]
            if not np.array_equal(stack[context], flat):  # the crop is the stored patch
                raise RuntimeError(f"{r['patch_id']}: LR crop differs from the stored patch")
            tifffile.imwrite(tmp / "lr" / f"{r['patch_id']}.tif", stack, photometric="minisblack")
            (tmp / "hr" / f"{r['patch_id']}.tif").hardlink_to(src / "hr" / f"{r['patch_id']}.tif")
    regs = json.loads((src / "registration.json").read_text())
    (tmp / "registration.json").write_text(json.dumps([{**g, "context": context} for g in regs],
                                                      indent=2))
    (tmp / "pairs.csv").write_bytes((src / "pairs.csv").read_bytes())
    tmp.rename(dst)
    return dst


def widen_input(src: Path, dst: Path, context: int) -> Path:
    """``src`` (a 2D model) as a 2.5D model taking 2 * ``context`` + 1 slices, computing the
    same function: the head conv's weights for the middle slice are the old ones, those for
    the neighbours start at zero."""
    import dataclasses

    import torch

    from microct_sr.checkpoint import load_model, save_model
    from microct_sr.models import ModelConfig, build_model

    flat, ckpt = load_model(src)
    config = ModelConfig.from_dict(ckpt["config"])
    if config.in_channels != 1:
        raise ValueError(f"{src}: already takes {config.in_channels} slices")
    wide_config = dataclasses.replace(config, in_channels=2 * context + 1)
    wide = build_model(wide_config)
    state = flat.state_dict()
    weight = torch.zeros_like(wide.state_dict()["head.weight"])
    weight[:, context] = state["head.weight"][:, 0]
    wide.load_state_dict({**state, "head.weight": weight})
    return save_model(dst, wide, wide_config, intensity=ckpt["intensity"],
                      provenance={**ckpt["provenance"], "widened_from": str(src),
                                  "context": context})


def evaluate(work: Path, scans: list[dict], model: Path) -> list[dict]:
    """Upscale and score every held-out scan; SR volumes go to sr/<model's run folder>/, so a
    re-run with another stage's model never reuses the last one's output."""
    rows = []
    for s in scans:
        if s["split"] != "test":
            continue
        sr = work / "sr" / model.parent.name / f"{s['scan_id']}.tif"
        sr.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if not sr.exists():
            run(["microct-sr", "upscale", s["lr"], str(sr), "--model", str(model), "--quiet"])
        extra = ["--spacing-um", "10"] if s["hr_name"] == "lhdl" else []
        # NIQE and morphometry are slow (minutes a scan here): on the nominal setting only
        metrics = "psnr,ssim,niqe,morph" if s["setting"] == "nominal" else "psnr,ssim"
        res = json.loads(run(["microct-sr", "evaluate", "--hr", s["hr"], "--sr", f"model={sr}",
                              "--lr", s["lr"], "--bicubic", "--metrics", metrics, "--json",
                              "--iqa-weights", str(SHARED / "iqa"),
                              *extra]))
        rows.append({"scan_id": s["scan_id"], "setting": s["setting"], "hr": s["hr_name"],
                     "results": res, "upscale_seconds": round(time.time() - t0, 1)})
    (work / "evaluation.json").write_text(json.dumps(rows, indent=2))
    return rows


def _fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def summarize(work: Path, rows: list[dict]) -> str:
    """The model card's table: model vs bicubic on every held-out scan."""
    lines = ["| scan | setting (views, photons, filter, smoothing) | PSNR model | PSNR bicubic "
             "| gain dB | SSIM model / bicubic | NIQE model / bicubic | BV/TV err model / bicubic "
             "| Tb.Th err model / bicubic |", "|" + "---|" * 9]
    for r in rows:
        sim = json.loads((work / "lr" / r["scan_id"] / "simulation.json").read_text())
        m, b = r["results"][0], r["results"][1]
        setting = f"{sim['views']}, {sim['photons']:.0f}, {sim['filter']}, {sim['smoothing']}"

        def morph(res: dict, key: str) -> str:
            if not res.get("morphometry"):
                return "-"
            return f"{100 * res['morphometry'][key]['rel_error']:+.0f}%"

        niqe = (f"{_fmt(m['niqe'] and m['niqe']['mean'])} / {_fmt(b['niqe'] and b['niqe']['mean'])}"
                if m.get("niqe") else "-")
        lines.append(
            f"| {r['hr']} | {r['setting']}: {setting} | {m['psnr']['mean']:.2f} "
            f"| {b['psnr']['mean']:.2f} | {m['psnr']['mean'] - b['psnr']['mean']:+.2f} "
            f"| {m['ssim']['mean']:.3f} / {b['ssim']['mean']:.3f} | {niqe} "
            f"| {morph(m, 'bv_tv')} / {morph(b, 'bv_tv')} "
            f"| {morph(m, 'tb_th_um')} / {morph(b, 'tb_th_um')} |")
    table = "\n".join(lines) + "\n"
    (work / "summary.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--stages",
                    default="hr,simulate,pair,train,finetune,scaled,gray,context,evaluate")
    ap.add_argument("--iters", type=int, default=20000, help="L1 stage iterations")
    ap.add_argument("--finetune-iters", type=int, default=4000,
                    help="MSE fine-tuning iterations (on every training scan)")
    ap.add_argument("--scaled-iters", type=int, default=4000,
                    help="MSE fine-tuning iterations with the magnified vertebrae")
    ap.add_argument("--gray-iters", type=int, default=4500,
                    help="MSE fine-tuning iterations with gray-level augmentation")
    ap.add_argument("--near-iters", type=int, default=4500,
                    help="MSE fine-tuning iterations with the near-nominal scans added")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--train-settings", type=int, default=3,
                    help="random scanner settings per training volume")
    ap.add_argument("--wide-settings", type=int, default=3,
                    help="extra settings per training volume from the wider range "
                         "(0: the first default model's data)")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"error: {SHARED} is missing: the recipe needs the shared bone volumes")
    stages = args.stages.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    hrs = hr_volumes(args.work) if "hr" in stages or "simulate" in stages else {}
    scans = (simulate_all(args.work, hrs, args.train_settings, args.wide_settings)
             if "simulate" in stages else json.loads((args.work / "scans.json").read_text()))
    if "pair" in stages:
        pair_all(args.work, scans)
    model = args.work / f"run_{args.preset}" / "best.pt"
    if "train" in stages:
        model = train(args.work, args.iters, args.preset)
    if "finetune" in stages:
        model = train(args.work, args.finetune_iters, args.preset, pixel_loss="mse",
                      init=args.work / f"run_{args.preset}" / "best.pt", split="split_mse.json",
                      name="_mse")
    if "scaled" in stages:
        model = train(args.work, args.scaled_iters, args.preset, pixel_loss="mse",
                      init=args.work / f"run_{args.preset}_mse" / "best.pt",
                      split="split_scaled.json", name="_scaled")
    if "gray" in stages:
        model = train(args.work, args.gray_iters, args.preset, pixel_loss="mse",
                      init=args.work / f"run_{args.preset}_scaled" / "best.pt",
                      split="split.json", name="_gray", extra=GRAY_OPTIONS, pick_best=False)
    if "near" in stages:
        model = train(args.work, args.near_iters, args.preset, pixel_loss="mse",
                      init=args.work / f"run_{args.preset}_gray" / "model.pt",
                      split="split_near.json", name="_near", extra=GRAY_OPTIONS,
                      pick_best=False)
    if "context" in stages:
        data = context_pairs(args.work, scans, 1)
        init = widen_input(args.work / f"run_{args.preset}_gray" / "model.pt",
                           args.work / "context_init.pt", 1)
        model = train(args.work, args.gray_iters, args.preset, pixel_loss="mse", init=init,
                      split="split.json", name="_ctx1", extra=GRAY_OPTIONS, pick_best=False,
                      data=data.name)
    if "evaluate" in stages:
        rows = evaluate(args.work, scans, model)
        print(summarize(args.work, rows))


if __name__ == "__main__":
    main()
