"""`simulate`: LR scans of real (LHDL) and phantom HR volumes with a known answer."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from microct_sr.phantom import make_phantom
from microct_sr.simulate import SimParams, simulate_slab
from microct_sr.volume import open_volume, write_volume

SP = (10.0, 10.0, 10.0)
WINDOW = (0.0, 255.0)


@pytest.fixture(scope="module")
def phantom_slab() -> np.ndarray:
    """8 HR slices (one LR slice) of a 256 x 256 phantom with cortex, uint8."""
    vol, _ = make_phantom((8, 256, 256), SP, bvtv=0.25, thickness_um=80, seed=3)
    return vol


@pytest.fixture(scope="module")
def phantom_tif(tmp_path_factory) -> str:
    """A small HR phantom on disk: 20 slices (not a multiple of 8) of 64 x 64 at 10 um."""
    vol, _ = make_phantom((20, 64, 64), SP, bvtv=0.3, thickness_um=60, cortex=False, seed=1)
    path = tmp_path_factory.mktemp("hr") / "hr.tif"
    tifffile.imwrite(path, vol, imagej=True, resolution=(0.1, 0.1),
                     metadata={"spacing": 10.0, "unit": "um"})
    return str(path)


def area(slab: np.ndarray, f: int = 8) -> np.ndarray:
    """The area-downsampled slab (mean over f x f pixels of the mean of the slices)."""
    m = slab.astype(np.float64).mean(axis=0)
    return m.reshape(m.shape[0] // f, f, m.shape[1] // f, f).mean(axis=(1, 3))


def sim(slab: np.ndarray, seed: int = 0, **kw) -> np.ndarray:
    params = SimParams(window=WINDOW, **kw)
    return simulate_slab(slab, params, SP, np.random.default_rng(seed))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)))


# ----------------------------------------------------------------------------- CLI, files

@pytest.mark.slow
def test_lhdl_real_volume_shape_spacing_and_truth(shared_data, tmp_path, run_cli):
    """The real LHDL scan (treated as 10 um nominal) -> 25^3 NRecon folder at 80 um."""
    hr = shared_data / "bone" / "lhdl_3155_D_4_bc.tif"
    out = tmp_path / "lhdl_lr"
    r = run_cli("simulate", hr, out, "--spacing-um", "10", "--rotation", "5",
                "--shift-um", "40", "-20", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    truth = json.loads(r.stdout)
    assert truth["lr_shape"] == [25, 25, 25] and truth["lr_spacing_um"] == [80.0] * 3
    log = (out / "lhdl_lr_rec.log").read_text(encoding="latin-1")
    assert "Pixel Size (um)=80" in log and "Hamming" in log and "Filename Prefix=lhdl_lr_rec" in log
    assert min(p.name for p in out.glob("*.bmp")) == "lhdl_lr_rec00000000.bmp"
    on_disk = json.loads((out / "simulation.json").read_text())
    assert on_disk["rotation_deg"] == 5.0 and on_disk["shift_um"] == [40.0, -20.0]
    for key in ("factor", "views", "photons", "smoothing", "filter", "seed", "hr_spacing_um",
                "hr_shape", "conventions"):
        assert key in on_disk
    with open_volume(out) as lr:
        assert lr.shape == (25, 25, 25) and lr.spacing_um == (80.0, 80.0, 80.0)
        lr_mid = lr[12].astype(float)
    # the LR still shows the bone: it correlates with the area-downsampled HR
    with open_volume(hr) as h:
        ref = area(h.read(96, 104))
    moved_back = _undo(lr_mid, 5.0, (40.0, -20.0), 80.0)
    c = np.corrcoef(moved_back[4:-4, 4:-4].ravel(), ref[4:-4, 4:-4].ravel())[0, 1]
    assert c > 0.8


def test_phantom_lr_shape_is_ceil_and_seed_determinism(phantom_tif, tmp_path, run_cli):
    """20 x 64 x 64 -> ceil(20/8) x 8 x 8; same seed -> same bytes; other seed differs."""
    outs = []
    for i, seed in enumerate((4, 4, 5)):
        out = tmp_path / f"lr{i}"
        r = run_cli("simulate", phantom_tif, out, "--format", "tif", "--seed", str(seed),
                    "--random-motion", "--quiet", "--json")
        assert r.exit_code == 0, r.stderr
        truth = json.loads(r.stdout)
        assert truth["lr_shape"] == [3, 8, 8]
        assert (out / "simulation.json").is_file()
        with open_volume(out / f"lr{i}.tif") as v:
            assert v.shape == (3, 8, 8) and v.dtype == np.uint8
            assert v.spacing_um == pytest.approx((80.0, 80.0, 80.0))
            outs.append((v.read(0, 3), truth["rotation_deg"], truth["shift_um"]))
    assert np.array_equal(outs[0][0], outs[1][0]) and outs[0][1:] == outs[1][1:]
    assert not np.array_equal(outs[0][0], outs[2][0]) and outs[0][1] != outs[2][1]


def test_process_pool_gives_the_same_scan(tmp_path, run_cli):
    """2 worker processes write exactly what 1 process writes (per-slice noise streams)."""
    vol, _ = make_phantom((32, 64, 64), SP, bvtv=0.3, thickness_um=60, cortex=False, seed=2)
    hr = tmp_path / "hr.tif"
    tifffile.imwrite(hr, vol, imagej=True, metadata={"spacing": 10.0, "unit": "um"},
                     resolution=(0.1, 0.1))
    got = []
    for w in (1, 2):
        r = run_cli("simulate", hr, tmp_path / f"w{w}", "--workers", str(w), "--rotation", "3",
                    "--quiet", "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["workers"] == w
        with open_volume(tmp_path / f"w{w}") as v:
            got.append(v.read(0, 4))
    assert np.array_equal(got[0], got[1])


@pytest.mark.parametrize("args, message", [
    (["--photons", "0"], "photons"),
    (["--photons", "-10"], "photons"),
    (["--factor", "6"], "not divisible"),
])
def test_bad_options_exit_2(phantom_tif, tmp_path, run_cli, args, message):
    r = run_cli("simulate", phantom_tif, tmp_path / "out", *args)
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_2d_input_exits_2(tmp_path, run_cli):
    path = tmp_path / "one_slice.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
    r = run_cli("simulate", path, tmp_path / "out", "--spacing-um", "10")
    assert r.exit_code == 2 and "2D" in r.stderr and "one_slice.tif" in r.stderr


def test_name_window_and_motion_options(phantom_tif, tmp_path, run_cli):
    out = tmp_path / "scan"
    r = run_cli("simulate", phantom_tif, out, "--name", "rat1", "--window", "0", "200",
                "--rotation", "-7.5", "--shift-um", "0", "80", "--quiet", "--json")
    assert r.exit_code == 0, r.stderr
    truth = json.loads(r.stdout)
    assert truth["window"] == [0.0, 200.0] and truth["rotation_deg"] == -7.5
    assert truth["shift_um"] == [0.0, 80.0] and not truth["random_motion"]
    assert (out / "rat1_rec.log").is_file() and (out / "rat1_rec00000002.bmp").is_file()
    r = run_cli("simulate", phantom_tif, tmp_path / "x", "--random-motion", "--rotation", "3")
    assert r.exit_code == 2 and "random-motion" in r.stderr


def test_unknown_voxel_size_exits_2(tmp_path, run_cli):
    path = tmp_path / "nospacing.tif"
    tifffile.imwrite(path, np.zeros((16, 64, 64), np.uint8))
    r = run_cli("simulate", path, tmp_path / "out")
    assert r.exit_code == 2 and "--spacing-um" in r.stderr


def test_existing_output_needs_overwrite(phantom_tif, tmp_path, run_cli):
    out = tmp_path / "lr"
    assert run_cli("simulate", phantom_tif, out, "--quiet").exit_code == 0
    r = run_cli("simulate", phantom_tif, out, "--quiet")
    assert r.exit_code == 2
    assert run_cli("simulate", phantom_tif, out, "--quiet", "--overwrite").exit_code == 0


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name", ["a/b", "..", "/abs"])
def test_name_with_a_folder_exits_2(phantom_tif, tmp_path, run_cli, name):
    r = run_cli("simulate", phantom_tif, tmp_path / "out", "--name", name, "--quiet")
    assert r.exit_code == 2, r.stderr
    assert "--name" in r.stderr and repr(name) in r.stderr and "Traceback" not in r.stderr
    assert _names(tmp_path) == []


@pytest.mark.parametrize("fmt", ["nrecon", "tif"])
def test_non_finite_input_exits_2_naming_the_file(tmp_path, run_cli, fmt):
    """A float HR volume with one NaN voxel (in a slice the window sample skips)."""
    hr = np.ones((16, 32, 32), np.float32)
    hr[3, 4, 5] = np.nan
    path = tmp_path / "in" / "nan.tif"
    path.parent.mkdir()
    write_volume(path, hr, SP)
    r = run_cli("simulate", path, tmp_path / "out", "--format", fmt, "--window", "0", "2",
                "--workers", "1", "--quiet")
    assert r.exit_code == 2, r.stderr
    assert str(path) in r.stderr and "slice 3" in r.stderr and "NaN" in r.stderr
    assert _names(tmp_path) == ["in"] and _names(path.parent) == ["nan.tif"]


def test_failed_tif_run_leaves_no_output_folder(phantom_tif, tmp_path, run_cli, monkeypatch):
    """--format tif: a crash after the first slice leaves neither LR_OUT nor a temporary."""
    from microct_sr import simulate

    def crash(*args, **kw):
        yield np.zeros((8, 8), np.float32)
        raise RuntimeError("boom")

    monkeypatch.setattr(simulate, "_lr_slices", crash)
    r = run_cli("simulate", phantom_tif, tmp_path / "out", "--format", "tif", "--quiet")
    assert r.exit_code == 1 and "boom" in r.stderr
    assert _names(tmp_path) == []


def test_tif_format_makes_the_folder_and_fills_an_existing_one(phantom_tif, tmp_path,
                                                                run_cli):
    out = tmp_path / "out"
    r = run_cli("simulate", phantom_tif, out, "--format", "tif", "--quiet", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["output"] == str(out / "out.tif")
    assert _names(out) == ["out.tif", "simulation.json"] and _names(tmp_path) == ["out"]
    r = run_cli("simulate", phantom_tif, out, "--format", "tif", "--name", "b", "--quiet",
                "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert _names(out) == ["b.tif", "out.tif", "simulation.json"]


def test_output_over_the_input_is_refused_even_with_overwrite(phantom_tif, tmp_path, run_cli):
    """LR_OUT = the HR folder (nrecon replaces it), or --format tif onto the HR file: exit 2.
    --format tif into the HR's folder under another name only adds files: allowed."""
    hr_dir = tmp_path / "hr_scan"
    r = run_cli("simulate", phantom_tif, hr_dir, "--factor", "4", "--quiet")
    assert r.exit_code == 0, r.stderr
    before = {p.name: p.read_bytes() for p in hr_dir.iterdir()}
    original = Path(phantom_tif).read_bytes()
    hr_file = tmp_path / "hr.tif"
    hr_file.write_bytes(original)
    for hr, args in ((hr_dir, [hr_dir]), (hr_file, [tmp_path, "--format", "tif", "--name", "hr"]),
                     (hr_file, [tmp_path])):
        r = run_cli("simulate", hr, *args, "--factor", "4", "--overwrite", "--quiet")
        assert r.exit_code == 2, r.stderr
        assert "LR_OUT" in r.stderr and "input" in r.stderr
    assert {p.name: p.read_bytes() for p in hr_dir.iterdir()} == before
    assert hr_file.read_bytes() == original
    r = run_cli("simulate", hr_file, tmp_path, "--format", "tif", "--name", "lr", "--quiet",
                "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "lr.tif").is_file() and hr_file.read_bytes() == original


# ----------------------------------------------------------------------------- extreme input

@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--seed", "-1", "--random-motion"], "--seed must be >= 0"),
    (["--photons", "1e300"], "--photons must be <= 1e+15"),
    (["--smoothing", "1e300"], "--smoothing must be in [0, 100]"),
    (["--attenuation", "1e300"], "--attenuation must be > 0 and <= 10000"),
    (["--window", "-1e308", "1e308"], "its width is not a finite number"),
    (["--shift-um", "1e300", "0"], "--shift-um x = 1e+300 um moves the object out"),
    (["--shift-um", "0", "1e7"], "--shift-um y = 1e+07 um moves the object out"),
    (["--edge-pad", "100000"], "GiB of memory"),
], ids=["seed", "seed-random-motion", "photons", "smoothing", "attenuation", "window",
        "shift-x", "shift-y", "edge-pad"])
def test_extreme_option_values_exit_2_naming_the_option(phantom_tif, tmp_path, run_cli, args,
                                                        message):
    """Values the option types accept but no run can use (numpy's Poisson limit, a Gaussian
    kernel or detector larger than memory, a negative seed numpy refuses): one error line,
    exit 2, nothing written; they used to end in a ValueError/MemoryError (exit 1)."""
    r = run_cli("simulate", phantom_tif, tmp_path / "out", *args, "--workers", "1", "--quiet")
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert _names(tmp_path) == []


def test_a_run_larger_than_the_memory_is_refused_up_front(phantom_tif, tmp_path, run_cli,
                                                         monkeypatch):
    """The memory estimate against what the machine has: refused before any slice is
    simulated (e.g. a huge --views or slice size), naming the input; fits: runs."""
    from microct_sr import phantom, simulate

    need = simulate.estimate_memory_bytes((20, 64, 64), 1, SimParams(views=100_000_000),
                                          10.0, 1)
    assert need > 100 * 2**30                # 1e8 views: the sinograms alone are ~60 GB
    monkeypatch.setattr(phantom, "available_memory_bytes", lambda: 2**20)
    r = run_cli("simulate", phantom_tif, tmp_path / "out", "--workers", "1", "--quiet")
    assert r.exit_code == 2, r.stderr
    assert f"{phantom_tif}: simulating it needs about" in r.stderr
    assert "0.0 GiB are available" in r.stderr and _names(tmp_path) == []
    monkeypatch.setattr(phantom, "available_memory_bytes", lambda: 2**30)
    r = run_cli("simulate", phantom_tif, tmp_path / "out", "--workers", "1", "--quiet")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("fmt", ["nrecon", "tif"])
def test_existing_output_is_refused_before_the_window_sample(phantom_tif, tmp_path, run_cli,
                                                             monkeypatch, fmt):
    """The output is checked before the default window reads its 16 sample slices (a whole
    NIfTI/MHA/NRRD input is loaded for them): no work for a run that cannot write."""
    from microct_sr import simulate

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.json").write_text("{}")

    def no_sample(*args, **kw):
        raise AssertionError("the default window was sampled")

    monkeypatch.setattr(simulate, "default_window", no_sample)
    r = run_cli("simulate", phantom_tif, out, "--format", fmt, "--quiet")
    assert r.exit_code == 2, r.stderr
    assert str(out) in r.stderr and ("already exists" in r.stderr or "not empty" in r.stderr)
    assert _names(out) == ["old.json"]


def test_float_volumes_of_any_magnitude_simulate(tmp_path, run_cli):
    """float32 gray values near the top of the float32 range (1e36 x a phantom), a constant
    1e30 volume: the slab mean, attenuation and window no longer overflow (exit 1 before);
    the LR is the same scan scaled."""
    vol, _ = make_phantom((16, 64, 64), SP, bvtv=0.3, thickness_um=60, cortex=False, seed=1)
    inputs = {"ref.tif": vol.astype(np.float32), "big.tif": vol.astype(np.float32) * 1e36,
              "const.tif": np.full((16, 64, 64), 1e30, np.float32)}
    got = {}
    for name, array in inputs.items():
        write_volume(tmp_path / name, array, SP)
        out = tmp_path / name.replace(".tif", "_lr")
        r = run_cli("simulate", tmp_path / name, out, "--format", "tif", "--workers", "1",
                    "--quiet", "--json")
        assert r.exit_code == 0, r.stderr
        assert all(math.isfinite(w) for w in json.loads(r.stdout)["window"])
        with open_volume(out / f"{out.name}.tif") as v:
            got[name] = v.read(0, len(v)).astype(np.float64)
        assert np.isfinite(got[name]).all()
    scale = np.ptp(got["ref.tif"])
    assert np.abs(got["big.tif"] / 1e36 - got["ref.tif"]).max() < 1e-3 * scale
    assert np.abs(got["const.tif"] / 1e30 - 1).max() < 1e-3


def test_float16_input_gives_a_finite_lr(tmp_path, run_cli):
    """float16 HR near its top (65504) with strong noise: the LR is clipped to the float16
    range instead of cast to inf; a tiny --window gives opaque, finite attenuation."""
    hr = np.zeros((16, 64, 64), np.float16)
    hr[:, 16:48, 16:48] = 65000
    tifffile.imwrite(tmp_path / "f16.tif", hr)
    for i, args in enumerate((["--window", "0", "60000", "--photons", "50"],
                              ["--window", "0", "1e-300"])):
        out = tmp_path / f"lr{i}"
        r = run_cli("simulate", tmp_path / "f16.tif", out, "--spacing-um", "10", "--smoothing",
                    "0", "--filter", "ramp", "--workers", "1", "--quiet", *args)
        assert r.exit_code == 0, r.stderr
        with open_volume(out) as v:
            lr = v.read(0, len(v))
        assert lr.dtype == np.float16 and np.isfinite(lr).all()


def test_tif_output_into_the_input_scan_folder_is_refused(tmp_path, run_cli):
    """--format tif with LR_OUT = the input slice folder (with --overwrite) added img17.tif
    and simulation.json to the scan: a numbered name extends the series (which then reads
    as broken or longer). Refused; a TIFF input's folder still takes the LR beside it."""
    scan = tmp_path / "scan"
    scan.mkdir()
    for i in range(1, 17):
        tifffile.imwrite(scan / f"img{i}.tif", np.full((64, 64), i, np.uint8))
    before = _names(scan)
    r = run_cli("simulate", scan, scan, "--format", "tif", "--name", "img17", "--spacing-um",
                "10", "--overwrite", "--quiet")
    assert r.exit_code == 2 and "LR_OUT is the input scan folder" in r.stderr, r.stderr
    assert _names(scan) == before
    with open_volume(scan) as v:
        assert v.shape == (16, 64, 64)


def test_empty_output_path_exits_2(phantom_tif, tmp_path, run_cli, monkeypatch):
    """LR_OUT "" (an unset shell variable) is not the current folder."""
    monkeypatch.chdir(tmp_path)
    r = run_cli("simulate", phantom_tif, "", "--format", "tif", "--quiet")
    assert r.exit_code == 2 and "LR_OUT is an empty path" in r.stderr, r.stderr
    assert _names(tmp_path) == []


# ----------------------------------------------------------------------------- physics

def test_noise_falls_like_one_over_sqrt_photons():
    """Flat object: the std of (noisy - noiseless) in the central region scales as
    1/sqrt(photons) (x10 photons -> /3.16)."""
    flat = np.full((8, 256, 256), 120, np.uint8)
    clean = sim(flat, photons=None, smoothing=0.0)
    stds = []
    for photons in (2e3, 2e4, 2e5):
        lr = sim(flat, photons=photons, smoothing=0.0)
        stds.append((lr - clean)[4:28, 4:28].std())
    for a, b in itertools.pairwise(stds):
        assert a / b == pytest.approx(math.sqrt(10), rel=0.2)
    # and the mean gray value is unbiased
    assert sim(flat, photons=2e5, smoothing=0.0)[4:28, 4:28].mean() == pytest.approx(120, abs=1)


def test_every_filter_keeps_the_gray_scale_and_windows_order_the_noise():
    """All filters reconstruct a flat object at its gray value (unit DC gain); the smoother
    windows give less noise than the bare ramp (ramp > shepp-logan > hamming > hann)."""
    flat = np.full((8, 128, 128), 100, np.uint8)
    std = {}
    for name in ("ramp", "shepp-logan", "cosine", "hamming", "hann"):
        lr = sim(flat, photons=5e3, smoothing=0.0, filter=name)[4:12, 4:12]
        assert lr.mean() == pytest.approx(100, abs=3)
        std[name] = lr.std()
    assert std["ramp"] > std["shepp-logan"] > std["hamming"] > std["hann"]


def test_noiseless_motionless_approaches_area_downsampling(phantom_slab):
    """Without noise, motion or smoothing the LR is close to the area-downsampled slab, and
    closer than the default (noisy, smoothed) simulation; full-pitch projection likewise."""
    ref = area(phantom_slab)
    clean = sim(phantom_slab, photons=None, smoothing=0.0, filter="ramp")
    noisy = sim(phantom_slab)
    assert rmse(clean, ref) < 0.1 * (ref.max() - ref.min())
    assert np.corrcoef(clean.ravel(), ref.ravel())[0, 1] > 0.93
    assert rmse(clean, ref) < rmse(noisy, ref)


def test_edge_padding_keeps_the_field_border_gray():
    """The HR field is a crop of a larger object: padding it (edge values) before projection
    keeps the LR border ring at the area-downsampled gray on average; with edge_pad=0 (air
    outside the field) the ring reads dark."""
    slab, _ = make_phantom((8, 256, 256), SP, bvtv=0.25, thickness_um=80, cortex=False, seed=3)
    ref = area(slab)
    ring = np.ones_like(ref, bool)
    ring[1:-1, 1:-1] = False

    def border_bias(lr: np.ndarray) -> float:
        return float((lr - ref)[ring].mean())

    assert abs(border_bias(sim(slab, photons=None))) < 4
    assert border_bias(sim(slab, photons=None, edge_pad=0)) < -10


def test_half_resolution_projection_matches_full_within_noise(phantom_slab):
    """proj_pitch 2 (the default) vs 1: the difference is well below the noise std."""
    full = sim(phantom_slab, photons=None, proj_pitch=1)
    half = sim(phantom_slab, photons=None, proj_pitch=2)
    noise = sim(phantom_slab, seed=1) - sim(phantom_slab, photons=None)
    assert rmse(full, half) < 0.35 * noise.std()


def test_lr_is_not_bicubic_or_area_downsampling(phantom_slab):
    """Power spectrum and noise differ from area/bicubic downsampling of the same slab."""
    import torch
    import torch.nn.functional as F

    ref = area(phantom_slab)
    t = torch.from_numpy(phantom_slab.astype(np.float32).mean(0))[None, None]
    bic = F.interpolate(t, scale_factor=1 / 8, mode="bicubic", antialias=True,
                        align_corners=False)[0, 0].numpy()
    lr = sim(phantom_slab)

    def hf_fraction(img: np.ndarray) -> float:
        p = np.abs(np.fft.fft2(img - img.mean())) ** 2
        k = np.hypot(*np.meshgrid(np.fft.fftfreq(img.shape[0]), np.fft.fftfreq(img.shape[1]),
                                  indexing="ij"))
        return float(p[k > 0.25].sum() / p.sum())

    # the scanner's filter/smoothing removes high frequencies that area/bicubic keep
    assert hf_fraction(lr) < 0.7 * hf_fraction(ref)
    assert hf_fraction(lr) < 0.7 * hf_fraction(bic)
    # and the residual is not small: several gray levels
    assert rmse(lr, ref) > 5 and rmse(lr, bic) > 5
    # noise: the simulated LR's flat-region noise differs from the downsampled HR noise
    flat = np.full((8, 128, 128), 60, np.uint8) + np.random.default_rng(0).normal(
        0, 7, (8, 128, 128)).clip(-50, 50).astype(np.int8)
    flat = flat.astype(np.uint8)
    assert sim(flat)[3:13, 3:13].std() > 2 * area(flat)[3:13, 3:13].std()


def _undo(lr: np.ndarray, rotation_deg: float, shift_um: tuple[float, float],
          lr_um: float) -> np.ndarray:
    """Resample the moved LR back to the HR frame with simulation.json's conventions:
    p_hr = R(-a) (p_lr - c - shift) + c, p = (x, y) from the field centre c."""
    a = math.radians(rotation_deg)
    n = lr.shape[0]
    c = np.array([(n - 1) / 2, (n - 1) / 2])                   # (row, col) of the centre
    # output pixel o = p_hr (row y, col x); input = p_lr = R(a) (p_hr - c) + c + shift
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # R(a) on (y, x)
    shift = np.array([shift_um[1], shift_um[0]]) / lr_um
    return ndimage.affine_transform(lr, rot, offset=c - rot @ c + shift, order=1,
                                    mode="nearest")


def test_motion_truth_undone_matches_motionless_run(phantom_slab):
    """Undo the recorded rotation/shift on the moved LR: it matches the motionless LR much
    better than undoing with the opposite rotation sign or not undoing at all."""
    rot, shift = 12.0, (160.0, -80.0)            # 2 and -1 LR pixels
    still = sim(phantom_slab, photons=None)
    moved = sim(phantom_slab, photons=None, rotation_deg=rot, shift_um=shift)
    inner = (slice(6, -6), slice(6, -6))
    good = rmse(_undo(moved, rot, shift, 80.0)[inner], still[inner])
    wrong_sign = rmse(_undo(moved, -rot, shift, 80.0)[inner], still[inner])
    wrong_shift = rmse(_undo(moved, rot, (-shift[0], -shift[1]), 80.0)[inner], still[inner])
    none = rmse(moved[inner], still[inner])
    assert good < 0.5 * min(wrong_sign, wrong_shift, none)
    assert good < 12


def test_demo_script_makes_an_hr_and_an_lr_scan(tmp_path):
    """examples/make_demo_scan.sh (the README's first run), at a small size."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "make_demo_scan.sh"
    if shutil.which("microct-sr") is None or shutil.which("bash") is None:
        pytest.skip("needs bash and the installed microct-sr command")
    env = dict(os.environ, DEMO_SHAPE="24 64 64")
    r = subprocess.run(["bash", str(script), str(tmp_path / "demo"), "3"], env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "microct-sr upscale" in r.stderr and "lr_scan" in r.stderr
    with open_volume(tmp_path / "demo" / "hr_scan") as hr, \
            open_volume(tmp_path / "demo" / "lr_scan") as lr:
        assert hr.shape == (24, 64, 64) and hr.spacing_um == (10.0, 10.0, 10.0)
        assert lr.shape == (3, 8, 8) and lr.spacing_um == (80.0, 80.0, 80.0)
    truth = json.loads((tmp_path / "demo" / "lr_scan" / "simulation.json").read_text())
    assert truth["random_motion"] and truth["seed"] == 3 and truth["rotation_deg"] != 0


def test_workers_exit_when_the_main_process_is_killed_outright(tmp_path):
    """SIGKILL gives the main process no chance to stop its pool: the workers notice their
    parent is gone and exit (they used to sit orphaned and idle for ever)."""
    import os
    import shutil
    import signal
    import subprocess
    import time

    psutil = pytest.importorskip("psutil", reason="psutil (the [dev] extra) lists the workers")
    if shutil.which("microct-sr") is None:
        pytest.skip("needs the installed microct-sr command")
    vol, _ = make_phantom((64, 256, 256), SP, bvtv=0.3, thickness_um=60, cortex=False, seed=2)
    hr = tmp_path / "hr.tif"
    tifffile.imwrite(hr, vol, imagej=True, resolution=(0.1, 0.1),
                     metadata={"spacing": 10.0, "unit": "um"})
    proc = subprocess.Popen(["microct-sr", "simulate", str(hr), str(tmp_path / "lr"),
                             "--workers", "2", "--views", "600", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if "resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert proc.poll() is None and workers, "the run ended before its workers were seen"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:  # never leave processes behind, whatever failed
        for p in workers:
            try:
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()
