"""`microct-sr pair`: registration accuracy, patch correspondence, outputs and failure cases.

Synthetic pairs with known motion are made here (`synth_pair`): HR = a procedural trabecular
volume or the real LHDL bone volume (treated as a 10 um scan), LR = HR rotated/shifted by a known
rigid transform in our convention (docs/pair.md), area-averaged x factor in 3D from a known Z
offset, blurred, with noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _volume_files import ArrayVolume


def trabecular(shape: tuple[int, int, int], seed: int = 0, coarse: int = 4) -> np.ndarray:
    """Procedural bone: thin shells where band-passed noise crosses zero, inside a cylinder."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    cs = tuple(max(2, s // coarse) for s in shape)
    n = rng.standard_normal(cs).astype(np.float32)
    g = ndimage.gaussian_filter(n, 1.5) - ndimage.gaussian_filter(n, 3.0)
    g = ndimage.zoom(g, [s / c for s, c in zip(shape, cs)], order=1)[
        :shape[0], :shape[1], :shape[2]]
    bone = np.abs(g) < 0.12 * g.std() * 1.6
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    r = np.hypot(yy - shape[1] / 2, xx - shape[2] / 2)
    r0 = 0.46 * min(shape[1:])
    vol = np.where(bone, 200.0, 60.0) * (r < r0)[None]
    vol += 190.0 * ((r < r0) & (r > r0 - 0.04 * r0 - 4))[None]
    return np.clip(vol + 10, 0, 255).astype(np.uint8)


def synth_lr(hr: np.ndarray, factor: int, angle_deg: float, shift_hr_px: tuple[float, float],
             z_offset: int, seed: int = 0, noise: float = 3.0,
             drift_hr_px: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """LR such that LR pixel P shows HR at factor * R(angle) P + t (pairing's convention), with
    LR slice k = mean of HR slices [factor k + z_offset, ... + factor); t grows by
    ``drift_hr_px`` per LR slice (a drifting specimen)."""
    import cv2
    from scipy import ndimage

    nz = (hr.shape[0] - max(0, z_offset)) // factor
    ny, nx = hr.shape[1] // factor, hr.shape[2] // factor
    a = math.radians(angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    off = r @ [0.5, 0.5] + np.asarray(shift_hr_px) - 0.5
    m = np.hstack([r, off[:, None]])
    out = np.zeros((nz, ny, nx), np.float32)
    for k in range(nz):
        m[:, 2] = off + k * np.asarray(drift_hr_px)
        z = factor * k + z_offset
        acc = np.zeros((ny * factor, nx * factor), np.float32)
        for s in hr[max(0, z):z + factor].astype(np.float32):
            acc += cv2.warpAffine(s, m, (nx * factor, ny * factor),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=float(hr.min()))
        acc /= factor
        out[k] = acc.reshape(ny, factor, nx, factor).mean(axis=(1, 3))
    rng = np.random.default_rng(seed)
    out = ndimage.gaussian_filter(out, (0, 0.6, 0.6)) + rng.normal(0, noise, out.shape)
    info = np.iinfo(hr.dtype)
    return np.clip(np.round(out), info.min, info.max).astype(hr.dtype)


def centre_shift(shape_hr_yx, factor, angle_deg, extra=(0.0, 0.0)) -> tuple[float, float]:
    """t_hr for a rotation about the HR centre (LR centre -> HR centre) plus ``extra``."""
    a = math.radians(angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c_hr = np.array([shape_hr_yx[1], shape_hr_yx[0]]) / 2
    c_lr_in_hr = np.array([shape_hr_yx[1] // factor, shape_hr_yx[0] // factor]) * factor / 2
    t = c_hr - r @ c_lr_in_hr + np.asarray(extra)
    return float(t[0]), float(t[1])


# ----------------------------------------------------------------------------- fixtures
FACTOR = 8


@dataclass
class Pair:
    """An LR/HR pair on disk with its known motion (simulate's convention)."""

    lr: Path
    hr: Path
    angle_deg: float
    shift_um: tuple[float, float]
    z_offset: int
    lr_pixel_um: float


def _write_tif(path: Path, arr: np.ndarray, spacing_um: float) -> Path:
    import tifffile

    tifffile.imwrite(path, arr, imagej=True, resolution=(1 / spacing_um, 1 / spacing_um),
                     metadata={"spacing": spacing_um, "unit": "um", "axes": "ZYX"})
    return path


def _simulate_pair(tmp: Path, hr: np.ndarray, angle: float, shift: tuple[float, float],
                   z0: int, seed: int) -> Pair:
    """HR written as a 10 um TIFF; LR = ``simulate`` of HR[z0:] (so LR slice k covers HR slices
    [8k + z0, 8k + z0 + 8)) as an NRecon folder with simulation.json."""
    import json

    from microct_sr.simulate import SimParams, simulate_volume

    hr_path = _write_tif(tmp / "hr.tif", hr, 10.0)
    truth = simulate_volume(ArrayVolume(hr[z0:], (10.0, 10.0, 10.0), str(hr_path)),
                            tmp / "lr", SimParams(factor=FACTOR, rotation_deg=angle,
                                                  shift_um=shift, seed=seed), quiet=True)
    saved = json.loads((tmp / "lr" / "simulation.json").read_text())
    assert saved["rotation_deg"] == truth["rotation_deg"] == angle
    return Pair(tmp / "lr", hr_path, angle, tuple(saved["shift_um"]), z0, 80.0)


@pytest.fixture(scope="module")
def lhdl_pair(tmp_path_factory, shared_data) -> Pair:
    """Real LHDL bone (200^3, treated as a 10 um HR scan) -> simulated 80 um LR with motion."""
    import tifffile

    hr = tifffile.imread(shared_data / "bone" / "lhdl_3155_D_4_bc.tif")
    return _simulate_pair(tmp_path_factory.mktemp("lhdl"), hr, 7.5, (60.0, -100.0), 5, 1)


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory) -> Pair:
    """The project's procedural phantom -> simulated LR with motion and a Z offset."""
    from microct_sr.phantom import make_phantom

    hr, _ = make_phantom((56, 256, 256), seed=3)
    return _simulate_pair(tmp_path_factory.mktemp("phantom"), hr, -8.2, (-150.0, 90.0), 3, 2)


@pytest.fixture(scope="module")
def synth() -> dict:
    """Fast synthetic pair (no projection physics): 48x48 px LR of a 384^2 HR, Z offset 5."""
    hr = trabecular((112, 384, 384), seed=1)
    angle_internal, z0 = 12.3, 5
    t_hr = centre_shift(hr.shape[1:], FACTOR, angle_internal, (13.0, -21.0))
    lr = synth_lr(hr, FACTOR, angle_internal, t_hr, z0)
    return {"hr": hr, "lr": lr, "angle_internal": angle_internal, "t_hr": t_hr, "z0": z0}


def _register(pair: Pair, method: str):
    from microct_sr.pairing import PairOptions, register
    from microct_sr.volume import open_volume

    with open_volume(pair.lr) as lv, open_volume(pair.hr) as hv:
        return register(lv, hv, PairOptions(method=method, lr_patch=8)).to_json()


def _errors(reg: dict, pair: Pair) -> tuple[float, float, int]:
    """(angle error deg, shift error in LR px, Z offset error) against the truth."""
    da = abs((reg["angle_deg"] - pair.angle_deg + 180) % 360 - 180)
    ds = math.hypot(*(np.asarray(reg["shift_um"]) - pair.shift_um)) / pair.lr_pixel_um
    return da, ds, reg["z_offset_hr_slices"] - pair.z_offset


# ----------------------------------------------------------------------------- registration
@pytest.mark.parametrize("name", ["lhdl_pair", "phantom_pair"])
def test_ransac_recovers_simulated_motion(name, request):
    """ransac (with its NCC polish) recovers simulate's motion to sub-pixel accuracy: docs/
    pair.md's table gives 0.03-0.05 deg and 0.004-0.01 LR px on these pairs, so a bound of
    0.2 deg and 0.1 LR px leaves a wide margin but catches a half-pixel convention slip."""
    pair = request.getfixturevalue(name)
    reg = _register(pair, "ransac")
    da, ds, dz = _errors(reg, pair)
    print(f"{name} ransac: angle error {da:.3f} deg, shift error {ds:.3f} LR px, dz {dz}, "
          f"{reg['inliers']} inliers on {len(reg['slices_used'])} slices")
    assert da < 0.2 and ds < 0.1 and dz == 0
    assert reg["method"] == "ransac" and reg["registration_ncc"] > 0.6


def test_two_point_on_clean_synthetic_pair(synth):
    """The paper's Eq. 1 method works where the LR still has sharp structure (no projection
    physics); on the simulated scans it is reported, not required (next test)."""
    from microct_sr.pairing import PairOptions, register

    reg = register(ArrayVolume(synth["lr"], (80.0,) * 3), ArrayVolume(synth["hr"], (10.0,) * 3),
                   PairOptions(method="two-point", lr_patch=8, z_search=8))
    assert abs(reg.rigid.angle_deg - synth["angle_internal"]) < 0.5
    assert math.hypot(*(np.asarray(reg.rigid.t_hr) - synth["t_hr"])) < FACTOR
    assert reg.z_offset == synth["z0"]


@pytest.mark.parametrize("name", ["lhdl_pair", "phantom_pair"])
def test_two_point_is_fragile_on_simulated_scans(name, request):
    """two-point on simulated scans, as docs/pair.md's accuracy table documents it: the scan
    registration succeeds with the exact Z offset and a shift within 1 LR px (table: 0.1 and
    0.65 LR px); its angle error is reported, not required (table: 1.3-10 deg). And how often
    a random pair of ratio-test matches gives an Eq. 1 angle off by more than 5 degrees (the
    issue measured ~30%), which RANSAC on the same matches is not fooled by."""
    from microct_sr.pairing import (
        PairOptions,
        _Matcher,
        _Reader,
        two_point_failure_rate,
    )
    from microct_sr.volume import open_volume

    pair = request.getfixturevalue(name)
    reg = _register(pair, "two-point")  # a UserError here fails the test
    da, ds, dz = _errors(reg, pair)
    outcome = f"angle error {da:.2f} deg, shift error {ds:.2f} LR px, dz {dz}"
    assert reg["method"] == "two-point" and dz == 0 and ds < 1.0, outcome
    with open_volume(pair.lr) as lv, open_volume(pair.hr) as hv:
        mt = _Matcher(_Reader(lv, hv), PairOptions(), 8)
        fits = [mt.fit(k, pair.z_offset) for k in range(2, lv.shape[0] - 2, 3)]
    internal = -pair.angle_deg  # pairing's internal LR->HR angle is the inverse rotation
    rates = [two_point_failure_rate(f.all_src, f.all_dst, internal, n_pairs=300, seed=k)
             for k, f in enumerate(fits) if len(f.all_src) >= 5]
    ransac_err = [abs(f.angle_deg - internal) for f in fits if f.ok]
    print(f"{name} two-point: {outcome}; random match pairs off by > 5 deg: "
          f"{np.mean(rates):.0%} (per slice {min(rates):.0%}-{max(rates):.0%}); per-slice RANSAC "
          f"fits off by > 5 deg: {np.mean(np.array(ransac_err) > 5):.0%} of {len(ransac_err)}")
    assert np.mean(rates) > 0.15             # Eq. 1 on random matches is unreliable ...
    assert ransac_err and np.mean(np.array(ransac_err) > 5) < np.mean(rates)  # RANSAC less so


# ----------------------------------------------------------------------------- CLI and outputs
def _run_pair(run_cli, pair: Pair, out: Path, *extra: str):
    return run_cli("pair", pair.lr, pair.hr, out, "--lr-patch", "8", *extra)


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".microct-sr-pair.lock")}


def test_cli_outputs(run_cli, phantom_pair, tmp_path):
    import csv
    import json

    import tifffile

    from microct_sr.pairing import CSV_COLUMNS
    from microct_sr.volume import open_volume

    out = tmp_path / "pairs"
    res = _run_pair(run_cli, phantom_pair, out, "--scan-id", "ratA", "--json", "--qc-png")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    reg = doc["registration"]
    assert reg["scan_id"] == "ratA" and doc["patches"] > 0
    regs = json.loads((out / "registration.json").read_text())
    assert isinstance(regs, list) and [g["scan_id"] for g in regs] == ["ratA"]
    for key in ("scan_id", "method", "angle_deg", "shift_um", "z_offset_hr_slices", "inliers",
                "slices_used", "conventions"):
        assert key in regs[0]
    assert abs(regs[0]["angle_deg"] - phantom_pair.angle_deg) < 0.5
    with open(out / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == CSV_COLUMNS and len(rows) == doc["patches"]
    assert [r["patch_id"] for r in rows] == [f"ratA_{n:05d}" for n in range(len(rows))]
    with open_volume(phantom_pair.lr) as lv:
        lr_vol = lv.read(0, lv.shape[0])
    for r in rows:
        k, x, y = int(r["lr_slice"]), float(r["lr_x"]), float(r["lr_y"])
        assert int(r["hr_slice"]) == FACTOR * k + phantom_pair.z_offset + FACTOR // 2
        assert float(r["ncc"]) >= 0.5
        lr_p = tifffile.imread(out / "lr" / f"{r['patch_id']}.tif")
        hr_p = tifffile.imread(out / "hr" / f"{r['patch_id']}.tif")
        assert lr_p.shape == (8, 8) and hr_p.shape == (64, 64)
        assert lr_p.dtype == lr_vol.dtype and hr_p.dtype == np.uint8
        # LR patches are untouched LR pixels
        np.testing.assert_array_equal(lr_p, lr_vol[k, int(y) - 4:int(y) + 4, int(x) - 4:int(x) + 4])
    assert sorted(p.name for p in (out / "lr").iterdir()) == \
        sorted(f"{r['patch_id']}.tif" for r in rows)
    from microct_sr.data import PatchDataset  # the consumer reads it as it is

    ds = PatchDataset([out], ["ratA"])
    assert len(ds) == len(rows) and ds[0][1].shape == (1, 64, 64)
    import cv2
    qc = cv2.imread(str(out / "qc" / "ratA.png"))
    assert qc is not None and qc.shape[0] > 100
    assert not list(out.glob(".microct-sr-tmp*"))


@pytest.mark.parametrize("name", ["lhdl_pair", "phantom_pair"])
def test_patches_correspond(name, request, run_cli, tmp_path):
    """Without NCC screening (--min-ncc -1) the geometry alone must make the pairs correspond:
    the median NCC of (upsampled LR, HR) patches is far above that of shuffled pairs."""
    import tifffile

    from microct_sr.pairing import cubic_up, ncc

    pair = request.getfixturevalue(name)
    out = tmp_path / "p"
    res = _run_pair(run_cli, pair, out, "--min-ncc", "-1", "--max-patches-per-slice", "6")
    assert res.exit_code == 0, res.stderr
    ids = sorted(p.stem for p in (out / "lr").iterdir())
    lrs = [cubic_up(tifffile.imread(out / "lr" / f"{i}.tif"), FACTOR) for i in ids]
    hrs = [tifffile.imread(out / "hr" / f"{i}.tif") for i in ids]
    real = np.median([ncc(a, b) for a, b in zip(lrs, hrs)])
    rng = np.random.default_rng(0)
    perm = [(i, j) for i, j in zip(range(len(ids)), rng.permutation(len(ids))) if i != j]
    shuffled = np.median([ncc(lrs[i], hrs[j]) for i, j in perm])
    print(f"{name}: {len(ids)} pairs, median NCC {real:.3f} vs shuffled {shuffled:.3f}")
    assert len(ids) >= 10
    assert real > 0.5 and real - shuffled > 0.4


def _true_lr_to_hr(pair: Pair, x_lr_um: np.ndarray, y_lr_um: np.ndarray,
                   hr_shape_yx: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """HR position (HR px, corner origin) of LR positions (um, corner origin) under the true
    motion, by the documented convention (docs/pair.md, simulate): an HR point p_hr appears at
    p_lr = R(rotation) (p_hr - c) + c + shift, so p_hr = R(-rotation) (p_lr - c - shift) + c,
    with c the centre of the HR slice's field of view."""
    hr_um = pair.lr_pixel_um / FACTOR
    cx, cy = hr_shape_yx[1] * hr_um / 2, hr_shape_yx[0] * hr_um / 2
    a = math.radians(-pair.angle_deg)
    dx, dy = x_lr_um - cx - pair.shift_um[0], y_lr_um - cy - pair.shift_um[1]
    x_hr = math.cos(a) * dx - math.sin(a) * dy + cx
    y_hr = math.sin(a) * dx + math.cos(a) * dy + cy
    return x_hr / hr_um, y_hr / hr_um


def _true_hr_patch(hr_slice: np.ndarray, pair: Pair, lr_x: float, lr_y: float, p: int
                   ) -> np.ndarray:
    """The HR patch of the p x p LR crop centred at (lr_x, lr_y) (LR px), rebuilt from the
    truth: on the SR grid LR pixel (i, j) covers HR patch pixels [8i, 8i+8) x [8j, 8j+8), so
    patch pixel (v, u) is the HR point under the centre of its 1/8 LR pixel; HR pixel (y, x)
    has its centre at (x + 0.5, y + 0.5). Sampled with cubic splines (not the code's cv2)."""
    from scipy import ndimage

    v, u = np.mgrid[:p * FACTOR, :p * FACTOR]
    x_lr = (lr_x - p / 2 + (u + 0.5) / FACTOR) * pair.lr_pixel_um
    y_lr = (lr_y - p / 2 + (v + 0.5) / FACTOR) * pair.lr_pixel_um
    x_hr, y_hr = _true_lr_to_hr(pair, x_lr, y_lr, hr_slice.shape)
    return ndimage.map_coordinates(hr_slice.astype(np.float64), [y_hr - 0.5, x_hr - 0.5],
                                   order=3, mode="mirror")


def test_hr_patches_are_the_true_motion_crop(run_cli, phantom_pair, tmp_path):
    """Every written HR patch (no NCC screening) is the HR slice pairs.csv names, resampled at
    the LR crop's place by the *true* motion (simulation.json): NCC > 0.99 for each patch;
    hr_x/hr_y is the truth's image of the LR crop centre and angle_deg the true rotation. An
    HR crop off by half an LR pixel (4 HR px) scores NCC ~0.8, one off by 1 HR px ~0.97."""
    import csv

    import tifffile

    out = tmp_path / "p"
    res = _run_pair(run_cli, phantom_pair, out, "--min-ncc", "-1")
    assert res.exit_code == 0, res.stderr
    truth = json.loads((phantom_pair.lr / "simulation.json").read_text())
    assert truth["rotation_deg"] == phantom_pair.angle_deg
    assert tuple(truth["shift_um"]) == phantom_pair.shift_um
    hr = tifffile.imread(phantom_pair.hr)
    with open(out / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 10
    scores, centre_err = [], []
    for r in rows:
        k, z = int(r["lr_slice"]), int(r["hr_slice"])
        lr_x, lr_y = float(r["lr_x"]), float(r["lr_y"])
        assert z == FACTOR * k + phantom_pair.z_offset + FACTOR // 2
        got = tifffile.imread(out / "hr" / f"{r['patch_id']}.tif").astype(np.float64)
        want = _true_hr_patch(hr[z], phantom_pair, lr_x, lr_y, 8)
        scores.append(float(np.corrcoef(got.ravel(), want.ravel())[0, 1]))
        x_hr, y_hr = _true_lr_to_hr(phantom_pair, lr_x * phantom_pair.lr_pixel_um,
                                    lr_y * phantom_pair.lr_pixel_um, hr.shape[1:])
        centre_err.append(math.hypot(float(r["hr_x"]) - x_hr, float(r["hr_y"]) - y_hr))
        assert abs(float(r["angle_deg"]) - phantom_pair.angle_deg) < 0.2
    print(f"{len(rows)} HR patches vs the true-motion crop: NCC min {min(scores):.4f}, "
          f"median {np.median(scores):.4f}; hr_x/hr_y off by at most {max(centre_err):.3f} HR px")
    assert min(scores) > 0.99
    assert max(centre_err) < 1.0  # 1 HR px = 1/8 LR px


def test_several_scans_and_rerun(run_cli, phantom_pair, tmp_path):
    """Scans share OUT_DIR; re-running one (--overwrite) replaces only its own patches; an
    existing scan id without --overwrite is refused (exit 2) and nothing changes."""
    import csv
    import json

    out = tmp_path / "ds"
    assert _run_pair(run_cli, phantom_pair, out, "--scan-id", "a").exit_code == 0
    assert _run_pair(run_cli, phantom_pair, out, "--scan-id", "b",
                     "--max-patches-per-slice", "2").exit_code == 0
    b_files = {k: v for k, v in _listing(out).items() if "/b_" in k}
    before = _listing(out)
    refused = _run_pair(run_cli, phantom_pair, out, "--scan-id", "a")
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    assert _listing(out) == before
    res = _run_pair(run_cli, phantom_pair, out, "--scan-id", "a", "--overwrite",
                    "--max-patches-per-slice", "1", "--method", "two-point")
    assert res.exit_code == 0, res.stderr
    after = _listing(out)
    assert {k: v for k, v in after.items() if "/b_" in k} == b_files
    with open(out / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    a_rows = [r for r in rows if r["scan_id"] == "a"]
    per_slice = np.bincount([int(r["lr_slice"]) for r in a_rows])
    assert per_slice.max() == 1
    assert sorted(k for k in after if k.startswith("lr/a_")) == \
        sorted(f"lr/{r['patch_id']}.tif" for r in a_rows)
    regs = json.loads((out / "registration.json").read_text())
    assert sorted(g["scan_id"] for g in regs) == ["a", "b"]
    assert next(g for g in regs if g["scan_id"] == "a")["method"] == "two-point"


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """A good HR, an LR of a disjoint region, an LR of noise, all as TIFFs."""
    tmp = tmp_path_factory.mktemp("bad")
    big = trabecular((48, 256, 512), seed=5)
    hr, other = big[:, :, :256], big[:, :, 256:]
    rng = np.random.default_rng(0)
    return {
        "hr": _write_tif(tmp / "hr.tif", np.ascontiguousarray(hr), 10.0),
        "lr_other": _write_tif(tmp / "lr_other.tif",
                               synth_lr(np.ascontiguousarray(other), FACTOR, 3.0, (0.0, 0.0), 0),
                               80.0),
        "lr_noise": _write_tif(tmp / "lr_noise.tif",
                               rng.integers(0, 255, (6, 32, 32)).astype(np.uint8), 80.0),
    }


@pytest.mark.parametrize("lr_key,needle", [("lr_noise", "match"), ("lr_other", "overlap")])
def test_no_matches_or_no_overlap_exit_2(run_cli, bad_inputs, phantom_pair, tmp_path, lr_key,
                                        needle):
    """Exit 2 with a clear message; an existing dataset in OUT_DIR is left exactly as it was."""
    out = tmp_path / "ds"
    assert _run_pair(run_cli, phantom_pair, out, "--scan-id", "good").exit_code == 0
    before = _listing(out)
    res = run_cli("pair", bad_inputs[lr_key], bad_inputs["hr"], out, "--lr-patch", "8",
                  "--scan-id", "bad")
    print(res.stderr)
    assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.stderr
    assert _listing(out) == before
    assert not list(out.glob(".microct-sr-tmp*"))


def test_sizes_not_factor_apart_exit_2(run_cli, bad_inputs, tmp_path):
    res = run_cli("pair", bad_inputs["hr"], bad_inputs["hr"], tmp_path / "o")
    assert res.exit_code == 2 and "8x apart" in res.stderr
    assert not (tmp_path / "o").exists()
    res = run_cli("pair", bad_inputs["lr_noise"], bad_inputs["hr"], tmp_path / "o",
                  "--factor", "4", "--lr-patch", "8")
    assert res.exit_code == 2 and "--factor" in res.stderr


def test_bad_scan_id_and_patch_size_exit_2(run_cli, bad_inputs, tmp_path):
    res = run_cli("pair", bad_inputs["lr_noise"], bad_inputs["hr"], tmp_path / "o",
                  "--scan-id", "../x")
    assert res.exit_code == 2 and "scan-id" in res.stderr
    res = run_cli("pair", bad_inputs["lr_noise"], bad_inputs["hr"], tmp_path / "o",
                  "--lr-patch", "40")
    assert res.exit_code == 2 and "--lr-patch" in res.stderr
    assert not (tmp_path / "o").exists()


def test_missing_akaze_is_a_clear_error(monkeypatch, synth, tmp_path):
    import cv2

    from microct_sr.errors import UserError
    from microct_sr.pairing import pair_scans

    monkeypatch.delattr(cv2, "AKAZE_create")
    with pytest.raises(UserError, match="A-KAZE"):
        pair_scans(ArrayVolume(synth["lr"], (80.0,) * 3), ArrayVolume(synth["hr"], (10.0,) * 3),
                   tmp_path / "o", scan_id="x", lr_patch=8)
    assert not (tmp_path / "o").exists()


def test_no_patch_passing_ncc_exit_2(run_cli, phantom_pair, tmp_path):
    res = _run_pair(run_cli, phantom_pair, tmp_path / "o", "--min-ncc", "0.999")
    assert res.exit_code == 2 and "--min-ncc" in res.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_voxel_size_reports_pixels(synth):
    """Without any voxel size the shift is still reported, in HR pixels (shift_um null)."""
    from microct_sr.pairing import PairOptions, register

    reg = register(ArrayVolume(synth["lr"], None), ArrayVolume(synth["hr"], None),
                   PairOptions(lr_patch=8, z_search=8)).to_json()
    assert reg["shift_um"] is None and len(reg["shift_hr_px"]) == 2
    assert abs(reg["angle_deg"] + synth["angle_internal"]) < 0.5   # simulate's sign
    # truth in simulate's frame: the LR origin (p_lr = 0) sits at p_hr = t_hr, so
    # 0 = R(a) (t_hr - c) + c + s with a = -angle_internal
    a = math.radians(-synth["angle_internal"])
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.array(synth["hr"].shape[1:][::-1]) / 2
    s_true = -(r @ (np.asarray(synth["t_hr"]) - c)) - c
    assert math.hypot(*(np.asarray(reg["shift_hr_px"]) - s_true)) < FACTOR
    assert reg["z_offset_hr_slices"] == synth["z0"]


def test_refine_per_slice_follows_a_drift():
    """A specimen drifting 1 HR px per LR slice: the scan-level transform is off by up to
    ~0.75 LR px at the ends; --refine-per-slice brings each slice back to the truth."""
    from microct_sr.pairing import PairOptions, iter_patches, register

    hr = trabecular((112, 256, 256), seed=4)
    angle, z0, drift = -6.0, 2, np.array([1.0, -0.5])
    t0 = np.asarray(centre_shift(hr.shape[1:], FACTOR, angle))
    lr = synth_lr(hr, FACTOR, angle, tuple(t0), z0, drift_hr_px=tuple(drift))
    lv, hv = ArrayVolume(lr, (80.0,) * 3), ArrayVolume(hr, (10.0,) * 3)
    errs = {}
    for per_slice in (False, True):
        opts = PairOptions(lr_patch=8, z_search=4, min_ncc=-1, refine_per_slice=per_slice)
        reg = register(lv, hv, opts)
        errs[per_slice] = [np.hypot(*(np.asarray(p.rigid.t_hr) - t0 - p.lr_slice * drift))
                           / FACTOR for ps, _ in iter_patches(lv, hv, reg, opts) for p in ps]
    worst, refined = max(errs[False]), np.median(errs[True])
    print(f"drift: scan-level worst {worst:.2f} LR px, per-slice median {refined:.2f} LR px")
    assert worst > 0.4 and refined < 0.25 and max(errs[True]) < worst


def test_rigid_from_motion_inverts_motion_of():
    from microct_sr.pairing import motion_of, rigid_from_motion

    for angle, shift, shape in [(7.5, (12.0, -30.5), (256, 320)), (-170.0, (0.0, 4.0), (64, 64))]:
        rigid = rigid_from_motion(angle, shift, 8, shape)
        back_angle, back_shift = motion_of(rigid, shape)
        assert back_angle == pytest.approx(angle)
        assert np.allclose(back_shift, shift)


def test_motion_from_simulation_json_cuts_aligned_patches(run_cli, tmp_path):
    """A blurred simulated scan (smoothing 1 LR px) paired with simulate's own truth."""
    from microct_sr.phantom import make_phantom

    hr, _ = make_phantom((24, 192, 192), seed=5)
    hr_path = _write_tif(tmp_path / "hr.tif", hr, 10.0)
    lr_path = tmp_path / "lr"
    sim = run_cli("simulate", hr_path, lr_path, "--rotation", "6", "--shift-um", "40", "-24",
                  "--smoothing", "1", "--seed", "1", "--quiet")
    assert sim.exit_code == 0, sim.stderr
    truth = json.loads((lr_path / "simulation.json").read_text())
    wrong = tmp_path / "wrong.json"  # the same motion off by 3 LR pixels
    wrong.write_text(json.dumps({**truth, "shift_um": [280.0, -24.0]}))
    medians = {}
    for name, motion in (("truth", lr_path / "simulation.json"), ("wrong", wrong)):
        res = run_cli("pair", lr_path, hr_path, tmp_path / name, "--lr-patch", "8", "--min-ncc",
                      "-1", "--motion-from", motion, "--json", "--quiet")
        assert res.exit_code == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["registration"]["method"] == "known-motion" and out["patches"] > 0
        medians[name] = out["median_ncc"]
        ncc = out["registration"]["registration_ncc"]
        assert -1.0 <= ncc <= 1.0 and out["registration"]["slices_sampled"] > 0
        medians[name + " registration"] = ncc
        if name == "truth":
            assert out["registration"]["angle_deg"] == pytest.approx(6.0)
            assert out["registration"]["shift_um"] == pytest.approx([40.0, -24.0], abs=1e-3)
    assert medians["truth"] > medians["wrong"] + 0.2, medians
    # measured, not a placeholder: the true motion correlates, the wrong one much less
    assert medians["truth registration"] > 0.5
    assert medians["truth registration"] > medians["wrong registration"] + 0.2, medians
    bad = run_cli("pair", lr_path, hr_path, tmp_path / "out2", "--motion-from",
                  tmp_path / "missing.json")
    assert bad.exit_code == 2 and "missing.json" in bad.stderr
    assert not (tmp_path / "out2").exists()


def test_hr_shorter_than_lr_pairs_the_covered_slices(run_cli, phantom_pair, tmp_path):
    """An HR covering only the first LR slices once crashed the Z search (empty HR slab list):
    the covered LR slices are paired, with a warning naming how many."""
    import csv

    import tifffile

    short = _write_tif(tmp_path / "hr_short.tif", tifffile.imread(phantom_pair.hr)[:20], 10.0)
    res = run_cli("pair", phantom_pair.lr, short, tmp_path / "o", "--lr-patch", "8", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["registration"]["z_offset_hr_slices"] == phantom_pair.z_offset
    covered = (20 - phantom_pair.z_offset) // FACTOR  # LR slices whose 8-slice HR slab exists
    assert doc["slices"] == covered and doc["patches"] > 0
    assert f"covers only {covered} of the 7 LR slices" in res.stderr
    with open(tmp_path / "o" / "pairs.csv", newline="") as fh:
        assert {int(r["lr_slice"]) for r in csv.DictReader(fh)} <= set(range(covered))


def test_a_failed_run_never_removes_an_out_dir_another_scan_merged_into(run_cli, phantom_pair,
                                                                       tmp_path, monkeypatch):
    """Run C creates OUT_DIR; another scan merges into it; then C fails (Ctrl-C, SIGTERM, bad
    data). C removes the folder it made only while it is empty: the other scan's patches
    stay (the whole folder used to be deleted)."""
    import microct_sr.pairing as pairing_mod

    out = tmp_path / "shared"

    def other_scan_merges_then_we_fail(out_dir, *args, **kwargs):
        (out_dir / "pairs.csv").write_text("patch_id,scan_id\nA_00000,A\n")  # scan A's merge
        raise KeyboardInterrupt

    monkeypatch.setattr(pairing_mod, "_commit", other_scan_merges_then_we_fail)
    r = _run_pair(run_cli, phantom_pair, out)
    assert r.exit_code == 130
    assert (out / "pairs.csv").read_text().startswith("patch_id,scan_id\nA_00000")
    monkeypatch.undo()
    bad = run_cli("pair", phantom_pair.lr, phantom_pair.hr, tmp_path / "fresh", "--lr-patch",
                  "1000")
    assert bad.exit_code == 2 and not (tmp_path / "fresh").exists()  # empty: still removed


def test_patch_folders_of_killed_runs_are_removed_live_ones_kept(run_cli, phantom_pair,
                                                                  tmp_path):
    """A SIGKILLed run leaves its whole patch folder in OUT_DIR; the next run removes it
    (its process is gone) but never a folder of a run still going (this process's)."""
    import os

    out = tmp_path / "p"
    out.mkdir()
    dead = out / ".microct-sr-tmp-pair-999999999-ratX-abc123"  # above any pid_max
    live = out / f".microct-sr-tmp-pair-{os.getpid()}-ratY-def456"
    for d in (dead, live):
        (d / "lr").mkdir(parents=True)
        (d / "lr" / "x.tif").write_bytes(b"partial")
    r = _run_pair(run_cli, phantom_pair, out)
    assert r.exit_code == 0, r.stderr
    assert not dead.exists() and live.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".microct-sr-tmp-pair-")
                and p != live]  # the run's own folder is gone too


def test_scan_of_another_dtype_is_refused_by_a_shared_pair_folder(run_cli, tmp_path):
    """`pair` put 8- and 16-bit scans into one folder without a word (train then needed two
    intensity windows). A scan whose dtype differs from the folder's patches is refused before
    any work, naming the scan; re-pairing the folder's only scan is still allowed."""
    import csv

    from microct_sr.phantom import make_phantom
    from microct_sr.volume import open_volume

    hr, _ = make_phantom((16, 128, 128), seed=3)
    hr8 = _write_tif(tmp_path / "hr8.tif", hr, 10.0)
    hr16 = _write_tif(tmp_path / "hr16.tif", hr.astype(np.uint16) * 200, 10.0)
    lr8 = tmp_path / "lr8"
    assert run_cli("simulate", hr8, lr8, "--seed", "1", "--quiet").exit_code == 0
    with open_volume(lr8) as v:
        lr16 = _write_tif(tmp_path / "lr16.tif", v.read(0, len(v)).astype(np.uint16) * 200,
                          80.0)
    motion = lr8 / "simulation.json"
    out = tmp_path / "pairs"
    args = ["--lr-patch", "4", "--min-ncc", "-1", "--motion-from", motion, "--quiet"]
    r = run_cli("pair", lr8, hr8, out, "--scan-id", "rat1", *args)
    assert r.exit_code == 0, r.stderr
    before = sorted(p.name for p in (out / "lr").iterdir())
    r = run_cli("pair", lr8, hr16, out, "--scan-id", "rat2", *args)
    assert r.exit_code == 2 and "hr16.tif: is uint16" in r.stderr and "uint8" in r.stderr, \
        r.stderr
    r = run_cli("pair", lr16, hr16, out, "--scan-id", "rat2", *args)
    assert r.exit_code == 2 and "lr16.tif: is uint16" in r.stderr, r.stderr
    assert sorted(p.name for p in (out / "lr").iterdir()) == before
    with open(out / "pairs.csv", newline="") as fh:
        assert {row["scan_id"] for row in csv.DictReader(fh)} == {"rat1"}
    r = run_cli("pair", lr8, hr8, out, "--scan-id", "rat1", "--overwrite", *args)
    assert r.exit_code == 0, r.stderr


# ----------------------------------------------------------------------------- 2.5D context
def _rows(out: Path) -> list[dict]:
    import csv

    with open(out / "pairs.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_context_pages_are_the_neighbour_slices(run_cli, phantom_pair, tmp_path):
    """--context 1: every LR patch is (3, p, p), page 1 is byte for byte the --context 0 patch
    of the same run, pages 0..2 are the same window of LR slices k-1, k, k+1 (clamped at the
    first slice); HR patches and pairs.csv are unchanged; registration.json records the
    context. --context 0 writes exactly what the default does (2D LR patches)."""
    import tifffile

    from microct_sr.volume import open_volume

    p, dirs = 8, {}
    for name, extra in (("default", ()), ("c0", ("--context", "0")), ("c1", ("--context", "1"))):
        dirs[name] = tmp_path / name
        res = _run_pair(run_cli, phantom_pair, dirs[name], "--min-ncc", "-1", "--json",
                        "--scan-id", "rat", *extra)
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["registration"]["context"] == int(name == "c1")
    assert _listing(dirs["c0"]) == _listing(dirs["default"])      # (4) unchanged output
    rows = _rows(dirs["c1"])
    assert rows == _rows(dirs["c0"]) and len(rows) >= 10
    for name, n in (("c0", 0), ("c1", 1)):
        regs = json.loads((dirs[name] / "registration.json").read_text())
        assert [g["context"] for g in regs] == [n]
    with open_volume(phantom_pair.lr) as lv:
        lr_vol = lv.read(0, lv.shape[0])
    assert 0 in {int(r["lr_slice"]) for r in rows}   # a patch on the first slice: clamping
    for r in rows:
        pid, k = r["patch_id"], int(r["lr_slice"])
        j0, i0 = round(float(r["lr_x"]) - p / 2), round(float(r["lr_y"]) - p / 2)
        flat = tifffile.imread(dirs["c0"] / "lr" / f"{pid}.tif")
        with tifffile.TiffFile(dirs["c1"] / "lr" / f"{pid}.tif") as tif:
            assert len(tif.pages) == 3
            stack = tif.asarray()
        assert flat.shape == (p, p) and stack.shape == (3, p, p) and stack.dtype == flat.dtype
        np.testing.assert_array_equal(stack[1], flat)
        want = [lr_vol[min(max(z, 0), len(lr_vol) - 1), i0:i0 + p, j0:j0 + p]
                for z in (k - 1, k, k + 1)]
        np.testing.assert_array_equal(stack, np.stack(want))
        assert (dirs["c1"] / "hr" / f"{pid}.tif").read_bytes() == \
            (dirs["c0"] / "hr" / f"{pid}.tif").read_bytes()


def test_lr_stack_clamps_and_reads_each_slice_once():
    """The reader's neighbour stack repeats the edge slices and, walking the slices in order,
    reads each LR slice from the volume once (its small LR cache)."""
    from microct_sr.pairing import _Reader
    from microct_sr.volume.base import context_index

    def clamped_slices(k, n, nz):
        return context_index(k, k + 1, n, nz)[0].tolist()

    assert clamped_slices(0, 2, 5) == [0, 0, 0, 1, 2]
    assert clamped_slices(4, 2, 5) == [2, 3, 4, 4, 4]
    assert clamped_slices(0, 1, 1) == [0, 0, 0]
    vol = np.arange(5 * 3 * 4, dtype=np.uint16).reshape(5, 3, 4)
    lv = ArrayVolume(vol)
    reader = _Reader(lv, ArrayVolume(vol), lr_cache_slices=2 * 5 + 2)
    for k in range(5):
        np.testing.assert_array_equal(reader.lr_stack(k, 2), vol[clamped_slices(k, 2, 5)])
    assert sorted(z for z0, z1 in lv.reads for z in range(z0, z1)) == list(range(5))
    uncached = _Reader(ArrayVolume(vol), ArrayVolume(vol))
    np.testing.assert_array_equal(uncached.lr_stack(4, 1), vol[[3, 4, 4]])


def test_mixing_contexts_in_one_folder_is_refused(run_cli, phantom_pair, tmp_path):
    """train reads the LR page count as the model's input channels: a scan paired with another
    --context than the folder's other scans is refused (exit 2, naming registration.json)
    before any work; an entry without "context" (older folders) counts as 0; re-pairing the
    folder's only scan with another context is allowed."""
    out = tmp_path / "ds"
    motion = ("--min-ncc", "-1", "--motion-from", phantom_pair.lr / "simulation.json", "--quiet")
    assert _run_pair(run_cli, phantom_pair, out, "--scan-id", "a", "--context", "1",
                     *motion).exit_code == 0
    before = _listing(out)
    for n in ("0", "2"):
        r = _run_pair(run_cli, phantom_pair, out, "--scan-id", "b", "--context", n, *motion)
        assert r.exit_code == 2, r.stderr
        assert f"{out / 'registration.json'}:" in r.stderr and "--context 1" in r.stderr
        assert "Traceback" not in r.stderr and "give --context 1" in r.stderr
    assert _listing(out) == before
    assert _run_pair(run_cli, phantom_pair, out, "--scan-id", "b", "--context", "1",
                     *motion).exit_code == 0
    # without registration.json the page count of another scan's LR patch decides
    (out / "registration.json").unlink()
    r = _run_pair(run_cli, phantom_pair, out, "--scan-id", "c", *motion)
    assert r.exit_code == 2 and f"{out / 'lr' / 'a_00000.tif'}: " in r.stderr, r.stderr
    assert "3 page(s)" in r.stderr and not list((out / "lr").glob("c_*"))
    # an older folder: no "context" key means 0
    old = tmp_path / "old"
    assert _run_pair(run_cli, phantom_pair, old, "--scan-id", "a", *motion).exit_code == 0
    regs = json.loads((old / "registration.json").read_text())
    (old / "registration.json").write_text(json.dumps([{k: v for k, v in g.items()
                                                        if k != "context"} for g in regs]))
    r = _run_pair(run_cli, phantom_pair, old, "--scan-id", "b", "--context", "1", *motion)
    assert r.exit_code == 2 and "--context 0" in r.stderr, r.stderr
    assert _run_pair(run_cli, phantom_pair, old, "--scan-id", "a", "--overwrite", "--context",
                     "1", *motion).exit_code == 0
