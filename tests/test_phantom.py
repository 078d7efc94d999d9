"""`phantom`: procedural trabecular bone with the requested BV/TV and thickness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from microct_sr.metrics.morphometry import morphometry
from microct_sr.phantom import (
    GRAY,
    make_phantom,
    ridge_thickness_vox,
    trabecular_compartment,
)
from microct_sr.volume import open_volume

SP = (10.0, 10.0, 10.0)
MID = (GRAY["marrow"] + GRAY["bone"]) / 2


@pytest.mark.slow
def test_bvtv_and_local_thickness_within_20_percent_of_request():
    """Segment the gray output at mid-gray and measure it with metrics.morphometry
    (local thickness, the measure `evaluate` reports)."""
    vol, info = make_phantom((64, 128, 128), SP, bvtv=0.25, thickness_um=80, cortex=False,
                             seed=2)
    m = morphometry(vol > MID, SP)
    assert m["bv_tv"] == pytest.approx(0.25, rel=0.2)
    assert m["tb_th_um"] == pytest.approx(80, rel=0.2)
    # the reported (achieved) values agree with the independent measurement
    assert info["bvtv"] == pytest.approx(m["bv_tv"], rel=0.1)
    assert info["thickness_um"] == pytest.approx(m["tb_th_um"], rel=0.15)


@pytest.mark.parametrize("bvtv, th", [(0.15, 60.0), (0.35, 100.0)])
def test_other_requests_with_cortex(bvtv, th):
    """With a cortex the trabecular compartment gets the requested values; the cortex is
    solid bone and the tissue outside is dark."""
    vol, info = make_phantom((48, 160, 160), SP, bvtv=bvtv, thickness_um=th, cortex=True,
                             seed=5)
    assert info["bvtv"] == pytest.approx(bvtv, rel=0.2)
    assert info["thickness_um"] == pytest.approx(th, rel=0.2)
    # independent: the segmented gray values inside the compartment
    inside = trabecular_compartment(vol.shape, SP, th)
    seg = (vol > MID) & inside[None]
    assert seg[:, inside].mean() == pytest.approx(bvtv, rel=0.2)
    assert ridge_thickness_vox(seg) * SP[2] == pytest.approx(th, rel=0.2)
    assert vol[:, 80, 3].mean() < MID and vol[:, 80, 10].mean() > MID  # tissue, cortex


def test_gray_levels_noise_and_partial_volume():
    vol, _info = make_phantom((32, 128, 128), SP, cortex=False, seed=0)
    assert vol.dtype == np.uint8
    marrow = vol[vol < MID - 40]
    bone = vol[vol > MID + 40]
    assert abs(np.median(marrow) - GRAY["marrow"]) < 5 and abs(np.median(bone) - GRAY["bone"]) < 5
    # partial volume: a real fraction of voxels lies between the two levels
    between = ((vol > GRAY["marrow"] + 40) & (vol < GRAY["bone"] - 40)).mean()
    assert 0.02 < between < 0.3
    # noise: flat marrow is not constant
    assert 4 < marrow.std() < 15


def test_seed_determinism_and_uint16():
    a, _ = make_phantom((16, 64, 64), SP, cortex=False, seed=7, thickness_um=50)
    b, _ = make_phantom((16, 64, 64), SP, cortex=False, seed=7, thickness_um=50)
    c, _ = make_phantom((16, 64, 64), SP, cortex=False, seed=8, thickness_um=50)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d, info = make_phantom((16, 64, 64), SP, cortex=False, seed=7, thickness_um=50,
                           dtype="uint16")
    assert d.dtype == np.uint16 and info["gray_levels"]["bone"] == GRAY["bone"] * 257
    assert np.corrcoef(a.ravel(), d.ravel())[0, 1] > 0.97


def test_cli_json_and_file(tmp_path, run_cli):
    out = tmp_path / "ph.tif"
    r = run_cli("phantom", out, "--shape", "24", "96", "96", "--bvtv", "0.2",
                "--thickness-um", "60", "--no-cortex", "--seed", "1", "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["requested_bvtv"] == 0.2 and info["bvtv"] == pytest.approx(0.2, rel=0.05)
    with open_volume(out) as v:
        assert v.shape == (24, 96, 96) and v.spacing_um == pytest.approx(SP)
    assert run_cli("phantom", out, "--shape", "24", "96", "96").exit_code == 2  # exists


@pytest.mark.parametrize("args", [["--bvtv", "0.9"], ["--thickness-um", "5"],
                                  ["--shape", "4", "64", "64"]])
def test_cli_bad_requests_exit_2(tmp_path, run_cli, args):
    r = run_cli("phantom", tmp_path / "x.tif", *args)
    assert r.exit_code == 2 and "error" in r.stderr


def test_too_large_a_phantom_is_refused_up_front(tmp_path, run_cli, monkeypatch):
    """The memory estimate (40 bytes a voxel) against what the machine has: refused with the
    sizes before any array is allocated, nothing written."""
    from microct_sr import phantom

    avail = phantom.available_memory_bytes()
    assert avail is None or avail > 0  # read from /proc/meminfo where there is one
    monkeypatch.setattr(phantom, "available_memory_bytes", lambda: 2**30)
    r = run_cli("phantom", tmp_path / "big.tif", "--shape", "1024", "256", "256")
    assert r.exit_code == 2 and "1024 x 256 x 256 needs about 2.5 GiB" in r.stderr
    assert "1.0 GiB are available" in r.stderr and not list(tmp_path.iterdir())
    r = run_cli("phantom", tmp_path / "ok.tif", "--shape", "16", "64", "64", "--thickness-um",
                "40")
    assert r.exit_code == 0, r.stderr


def test_bad_masks_are_named_and_gray_masks_warned(tmp_path, run_cli):
    """A mask too thin to be a volume, or with no bone, is refused naming the file; a gray
    image given as a mask (nearly all voxels nonzero) works but says what it did."""
    import tifffile

    rng = np.random.default_rng(0)
    cases = {"flat.tif": (rng.random((4, 32, 32)) > 0.7, "at least 8 voxels a side"),
             "empty.tif": (np.zeros((8, 32, 32), bool), "holds no bone")}
    for name, (mask, problem) in cases.items():
        tifffile.imwrite(tmp_path / name, mask.astype(np.uint8) * 255, photometric="minisblack")
        r = run_cli("phantom", tmp_path / "o.tif", "--mask", tmp_path / name)
        assert r.exit_code == 2 and f"{name}: " in r.stderr and problem in r.stderr, r.stderr
    assert not (tmp_path / "o.tif").exists()
    gray = rng.integers(1, 255, (8, 32, 32), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "gray.tif", gray, photometric="minisblack")
    r = run_cli("phantom", tmp_path / "o.tif", "--mask", tmp_path / "gray.tif", "--json")
    assert r.exit_code == 0 and "gray.tif: the mask is not binary" in r.stderr
    assert "BV/TV 1.00" in r.stderr
    binary = (gray > 128).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "bin.tif", binary, photometric="minisblack")
    r = run_cli("phantom", tmp_path / "o2.tif", "--mask", tmp_path / "bin.tif")
    assert r.exit_code == 0 and "not binary" not in r.stderr


def test_negative_seed_exits_2(tmp_path, run_cli):
    """numpy refuses negative seeds: one error line naming --seed (was a ValueError, exit 1)."""
    r = run_cli("phantom", tmp_path / "x.tif", "--shape", "16", "64", "64", "--seed", "-1")
    assert r.exit_code == 2 and r.stderr == "error: --seed must be >= 0, got -1\n", r.stderr
    assert not list(tmp_path.iterdir())


def test_slice_too_small_for_the_cortex_exits_2(tmp_path, run_cli):
    """8 x 8 slices: the cortex (3 voxels) leaves no trabecular compartment, whose BV/TV was
    NaN, printed as a NaN token (invalid JSON); without the cortex it is a valid phantom."""
    args = ("--shape", "8", "8", "8", "--thickness-um", "20", "--json")
    r = run_cli("phantom", tmp_path / "c.tif", *args)
    assert r.exit_code == 2 and "leaves no room inside a cortex" in r.stderr, r.stderr
    assert json.loads(r.stdout)["exit_code"] == 2 and not list(tmp_path.iterdir())
    r = run_cli("phantom", tmp_path / "n.tif", *args, "--no-cortex")
    assert r.exit_code == 0, r.stderr

    def no_constant(name):
        raise AssertionError(f"{name} in the JSON")

    info = json.loads(r.stdout, parse_constant=no_constant)
    assert 0 < info["bvtv"] < 1


@pytest.mark.parametrize("out, problem", [
    ("old.tif", "already exists"), ("missing/x.tif", "parent folder does not exist"),
    ("x.xyz", "unsupported output format"), ("", "OUT is an empty path"),
])
def test_output_problems_are_found_before_the_phantom_is_made(tmp_path, run_cli, monkeypatch,
                                                              out, problem):
    """An existing output, a missing folder, an unknown suffix or an empty OUT are refused
    before the volume is built (that takes minutes at the default size), nothing written."""
    from microct_sr import phantom

    def no_work(*args, **kw):
        raise AssertionError("the phantom was made")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.tif").write_bytes(b"old")
    monkeypatch.setattr(phantom, "make_phantom", no_work)
    r = run_cli("phantom", out, "--shape", "16", "64", "64", "--thickness-um", "40")
    assert r.exit_code == 2 and problem in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.tif"]
    assert (tmp_path / "old.tif").read_bytes() == b"old"


def test_mask_values_nonzero_is_bone_and_nan_is_refused(tmp_path, run_cli):
    """A signed mask (-1 = bone) gives the same phantom as its 0/1 form (it had no bone and
    BV/TV 0); a float mask with NaN (all NaN: 'bone' to any(), marrow to > 0) is refused."""
    from microct_sr.volume import write_volume

    mask = np.zeros((16, 32, 32), np.int8)
    mask[:, 8:20, 8:20] = 1
    got = {}
    for name, m in (("pos.nii.gz", mask), ("neg.nii.gz", -mask)):
        write_volume(tmp_path / name, m, SP)
        r = run_cli("phantom", tmp_path / f"{name[:3]}.tif", "--mask", tmp_path / name, "--json")
        assert r.exit_code == 0, r.stderr
        got[name] = json.loads(r.stdout)["bvtv"]
        with open_volume(tmp_path / f"{name[:3]}.tif") as v:
            got[name, "gray"] = v.read(0, len(v))
    assert got["neg.nii.gz"] == got["pos.nii.gz"] == pytest.approx(mask.mean(), rel=0.05)
    assert np.array_equal(got["neg.nii.gz", "gray"], got["pos.nii.gz", "gray"])
    for name, value in (("nan.mha", np.nan), ("inf.mha", np.inf)):
        m = mask.astype(np.float32)
        m[:2] = value
        write_volume(tmp_path / name, m, SP)
        r = run_cli("phantom", tmp_path / "bad.tif", "--mask", tmp_path / name)
        assert r.exit_code == 2, r.stderr
        assert f"{name}: the mask holds NaN or Inf" in r.stderr
    assert not (tmp_path / "bad.tif").exists()


def test_phantom_of_a_positioned_mask_keeps_its_origin_and_direction(tmp_path, run_cli):
    """`phantom --mask` on a NIfTI placed in the scanner frame (origin, rotated axes) wrote
    its phantom at the origin with identity axes, so 3D Slicer did not overlay the two."""
    import SimpleITK as sitk

    from microct_sr.volume import write_volume

    mask = np.zeros((16, 32, 32), np.uint8)
    mask[:, 8:20, 8:20] = 1
    c, s_ = np.cos(0.3), np.sin(0.3)
    direction = (c, -s_, 0.0, s_, c, 0.0, 0.0, 0.0, -1.0)
    write_volume(tmp_path / "mask.nii.gz", mask, SP, origin_mm=(1.5, -2.0, 3.25),
                 direction=direction)
    r = run_cli("phantom", tmp_path / "ph.nrrd", "--mask", tmp_path / "mask.nii.gz")
    assert r.exit_code == 0, r.stderr
    img = sitk.ReadImage(str(tmp_path / "ph.nrrd"))
    assert img.GetOrigin() == pytest.approx((1.5, -2.0, 3.25), abs=1e-5)
    assert img.GetDirection() == pytest.approx(direction, abs=1e-5)
    r = run_cli("phantom", tmp_path / "free.nrrd", "--shape", "16", "32", "32", "--no-cortex")
    assert r.exit_code == 0, r.stderr
    assert sitk.ReadImage(str(tmp_path / "free.nrrd")).GetOrigin() == (0.0, 0.0, 0.0)


@pytest.mark.slow
def test_mask_from_real_vertebra_roi(shared_data, tmp_path, run_cli):
    """A real binary bone mask (BoneJ vertebra ROI, 300^3) gets gray values: its bone voxels
    are bright, its marrow dark, and the reported BV/TV is the mask's."""
    roi = min((shared_data / "bone" / "vertebra_rois").glob("*.nrrd"))
    out = tmp_path / "masked.tif"
    r = run_cli("phantom", out, "--mask", roi, "--spacing-um", "51.3", "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    with open_volume(roi) as m:
        mask = m.read(0, len(m)) > 0
    with open_volume(out) as v:
        gray = v.read(0, len(v))
    assert gray.shape == mask.shape and info["source"] == "mask"
    assert info["bvtv"] == pytest.approx(mask.mean(), rel=0.05)
    assert np.median(gray[mask]) > MID > np.median(gray[~mask])
    assert ((gray > MID) == mask).mean() > 0.95
