"""``microct-sr info``: output, --json keys, --spacing-um, and every bad input -> exit 2 with one
line naming the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from unittest.mock import ANY

import cv2
import numpy as np
import pytest
import tifffile
from _volume_files import dicom_series, make_model, mha_with

from microct_sr.volume import write_volume

SPACING = (7.5, 2.5, 2.0)


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_info_json_keys_and_values(tmp_path, run_cli):
    a = np.arange(4 * 6 * 8, dtype=np.uint16).reshape(4, 6, 8)
    write_volume(tmp_path / "v.tif", a, SPACING)
    d = _json(run_cli("info", tmp_path / "v.tif", "--json"))
    assert set(d) == {"path", "format", "shape", "dtype", "spacing_um", "spacing_source",
                      "value_range", "non_finite_voxels"}
    assert d["format"] == "tiff" and d["shape"] == [4, 6, 8] and d["dtype"] == "uint16"
    assert d["spacing_um"] == pytest.approx(list(SPACING))
    assert d["spacing_source"] == "tiff-imagej"
    assert d["value_range"] == [0, int(a.max())]  # first, middle and last slice sampled
    assert d["non_finite_voxels"] == 0


def test_info_human_output(tmp_path, run_cli):
    write_volume(tmp_path / "scan", np.full((3, 5, 6), 9, np.uint8), SPACING)
    r = run_cli("info", tmp_path / "scan")
    assert r.exit_code == 0, r.stderr
    assert "format:            nrecon" in r.stdout
    assert "3 x 5 x 6" in r.stdout and "uint8" in r.stdout
    assert "7.5 x 2.5 x 2 um  (from nrecon-log)" in r.stdout


def test_info_spacing_override_and_unknown(tmp_path, run_cli):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((2, 4, 4), np.uint8))
    r = run_cli("info", tmp_path / "plain.tif", "--json")
    d = _json(r)
    assert d["spacing_um"] is None and d["spacing_source"] == "unknown"
    assert "plain.tif" in r.stderr and "spacing unknown" in r.stderr  # the warning
    d = _json(run_cli("info", tmp_path / "plain.tif", "--json", "--spacing-um", "80,10,10"))
    assert d["spacing_um"] == [80.0, 10.0, 10.0] and d["spacing_source"] == "user"


def test_info_real_data(shared_data, run_cli):
    d = _json(run_cli("info", shared_data / "bone" / "lhdl_3155_D_4_bc.tif", "--json"))
    assert d["shape"] == [200, 200, 200] and d["spacing_um"] == pytest.approx([19.5] * 3)


# ------------------------------------------------------------------------------- bad input

def _slices(folder: Path, arrays, ext="png", stem="s") -> None:
    folder.mkdir(exist_ok=True)
    for i, s in enumerate(arrays):
        cv2.imwrite(str(folder / f"{stem}{i:04d}.{ext}"), s)


def _bad_missing(tmp: Path) -> tuple[Path, str]:
    return tmp / "nope.tif", "nope.tif"


def _bad_empty_folder(tmp: Path):
    (tmp / "empty").mkdir()
    return tmp / "empty", "empty"


def _bad_no_slices(tmp: Path):
    (tmp / "docs").mkdir()
    (tmp / "docs" / "readme.txt").write_text("hello")
    (tmp / "docs" / "table.csv").write_text("a,b")
    return tmp / "docs", "docs"


def _bad_sizes(tmp: Path):
    z = np.zeros
    _slices(tmp / "f", [z((8, 8), np.uint8), z((8, 8), np.uint8), z((8, 9), np.uint8)])
    return tmp / "f", "s0002.png"


def _bad_dtypes(tmp: Path):
    z = np.zeros
    _slices(tmp / "f", [z((8, 8), np.uint8), z((8, 8), np.uint16), z((8, 8), np.uint8)])
    return tmp / "f", "s0001.png"


def _bad_gap(tmp: Path):
    _slices(tmp / "f", [np.zeros((8, 8), np.uint8)] * 5)
    (tmp / "f" / "s0002.png").unlink()
    return tmp / "f", "s0003.png"


def _bad_rgb(tmp: Path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 2] = 200  # red != green
    _slices(tmp / "f", [rgb, rgb, rgb])
    return tmp / "f", "s0000.png"


def _bad_corrupt_tiff(tmp: Path):
    (tmp / "junk.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    return tmp / "junk.tif", "junk.tif"


def _bad_corrupt_nifti(tmp: Path):
    (tmp / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    return tmp / "junk.nii.gz", "junk.nii.gz"


def _bad_corrupt_slice(tmp: Path):
    _slices(tmp / "f", [np.zeros((8, 8), np.uint8)] * 3, ext="bmp")
    (tmp / "f" / "s0001.bmp").write_bytes(b"BM" + b"\x07" * 10)
    return tmp / "f", "s0001.bmp"


def _bad_truncated_tiff(tmp: Path):
    write_volume(tmp / "t.tif", np.ones((10, 32, 32), np.uint16), SPACING)
    data = (tmp / "t.tif").read_bytes()
    (tmp / "t.tif").write_bytes(data[: len(data) // 2])
    return tmp / "t.tif", "t.tif"


def _bad_truncated_bmp(tmp: Path):
    _slices(tmp / "f", [np.zeros((16, 16), np.uint8)] * 3, ext="bmp")
    p = tmp / "f" / "s0002.bmp"
    p.write_bytes(p.read_bytes()[:-100])
    return tmp / "f", "s0002.bmp"


def _bad_truncated_nifti(tmp: Path):
    write_volume(tmp / "t.nii.gz", np.random.default_rng(0).random((6, 16, 16)), SPACING)
    data = (tmp / "t.nii.gz").read_bytes()
    (tmp / "t.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    return tmp / "t.nii.gz", "t.nii.gz"


def _bad_zero_size(dims: str):
    """A case maker: an MHA whose header says ``DimSize = dims`` (x y z) with a zero in it."""
    return lambda tmp: (mha_with(tmp, "e.mha", "DimSize", dims), "e.mha")


def _bad_bool_tiff(tmp: Path):
    tifffile.imwrite(tmp / "b.tif", np.zeros((4, 8, 8), bool))
    return tmp / "b.tif", "b.tif"


def _bad_dicom_sizes(tmp: Path):
    dicom_series(tmp / "d", [np.zeros((8, 8), np.int16)] * 2 + [np.zeros((6, 6), np.int16)])
    return tmp / "d", "slice002.dcm"


def _bad_dicom_truncated(tmp: Path):
    files = dicom_series(tmp / "d", [np.zeros((8, 8), np.int16)] * 4)
    files[1].write_bytes(files[1].read_bytes()[:-100])
    return tmp / "d", "slice001.dcm"


def _bad_log_binary(tmp: Path):
    write_volume(tmp / "scan", np.zeros((2, 4, 4), np.uint8), SPACING)
    (tmp / "scan" / "scan_rec.log").write_bytes(b"\x00\x01\x02garbage\xff" * 20)
    return tmp / "scan", "scan_rec.log"


def _bad_log_no_sections(tmp: Path):
    write_volume(tmp / "scan", np.zeros((2, 4, 4), np.uint8), SPACING)
    (tmp / "scan" / "scan_rec.log").write_text("just some text\nwithout sections\n")
    return tmp / "scan", "scan_rec.log"


BAD_INPUTS = {
    "missing path": (_bad_missing, "no such file"),
    "empty folder": (_bad_empty_folder, "empty folder"),
    "no recognisable slices": (_bad_no_slices, "no recognisable slices"),
    "slices of different sizes": (_bad_sizes, "size"),
    "slices of different dtypes": (_bad_dtypes, "dtype"),
    "gap in the numbering": (_bad_gap, "gap"),
    "RGB channels differ": (_bad_rgb, "channels differ"),
    "corrupt TIFF": (_bad_corrupt_tiff, "TIFF"),
    "corrupt NIfTI": (_bad_corrupt_nifti, "SimpleITK cannot read"),
    "corrupt BMP slice": (_bad_corrupt_slice, "BMP"),
    "truncated TIFF": (_bad_truncated_tiff, "truncated"),
    "truncated BMP slice": (_bad_truncated_bmp, "truncated"),
    "truncated NIfTI": (_bad_truncated_nifti, "truncated"),
    "zero-size z in the header": (_bad_zero_size("8 8 0"), "zero-size"),
    "zero-size x in the header": (_bad_zero_size("0 8 4"), "zero-size"),
    "bool TIFF": (_bad_bool_tiff, "voxel type bool"),
    "DICOM slices of different sizes": (_bad_dicom_sizes, "size 6x6"),
    "truncated DICOM slice": (_bad_dicom_truncated, "no series"),
    "binary log": (_bad_log_binary, "unreadable NRecon log"),
    "log without sections": (_bad_log_no_sections, "unreadable NRecon log"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_one_line_naming_file(tmp_path, run_cli, case):
    make, problem = BAD_INPUTS[case]
    path, name = make(tmp_path)
    r = run_cli("info", path, "--json")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2, r.stderr
    assert json.loads(r.stdout) == {"error": errors[0][len("error: "):], "exit_code": 2,
                                    "path": ANY}
    assert "Traceback" not in r.stderr
    assert len(errors) == 1, r.stderr
    assert name in errors[0] and problem in errors[0], errors[0]


@pytest.mark.parametrize("case", ["zero-size z in the header", "bool TIFF"])
def test_upscale_refuses_bad_input_before_any_work(tmp_path, run_cli, case):
    path, name = BAD_INPUTS[case][0](tmp_path)
    model = make_model(tmp_path / "m.pt")
    r = run_cli("upscale", path, tmp_path / "o.tif", "--model", model, "--quiet")
    assert r.exit_code == 2 and name in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".", "o."))]


def test_negative_spacing_same_in_info_and_upscale(tmp_path, run_cli):
    p = mha_with(tmp_path, "nsp.mha", "ElementSpacing", "-0.08 0.08 0.08")
    r = run_cli("info", p, "--json")
    assert _json(r)["spacing_um"] == [80.0, 80.0, 80.0] and "negative voxel size" in r.stderr
    model = make_model(tmp_path / "m.pt")
    for out in ("o.tif", "o.nrrd"):
        r = run_cli("upscale", p, tmp_path / out, "--model", model, "--quiet", "--json")
        assert _json(r)["spacing_um"] == [80.0, 10.0, 10.0]


def test_all_nan_volume_gives_valid_json(tmp_path, run_cli):
    a = np.full((3, 4, 4), np.nan, np.float32)
    tifffile.imwrite(tmp_path / "nan.tif", a, photometric="minisblack")
    r = run_cli("info", tmp_path / "nan.tif", "--json")
    assert "NaN" not in r.stdout
    d = _json(r)
    assert d["value_range"] is None and d["non_finite_voxels"] == a.size
    a[1, 0, 0], a[2, 1, 1] = 2.5, np.inf  # middle slice sampled: range over finite values
    tifffile.imwrite(tmp_path / "nan.tif", a, photometric="minisblack")
    d = _json(run_cli("info", tmp_path / "nan.tif", "--json"))
    assert d["value_range"] == [2.5, 2.5] and d["non_finite_voxels"] == a.size - 1
    r = run_cli("info", tmp_path / "nan.tif")
    assert "2.5 .. 2.5" in r.stdout and f"{a.size - 1} NaN/inf voxels" in r.stdout


def test_2d_nifti_z_spacing_is_not_made_up(tmp_path, run_cli):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros((6, 8), np.uint8))
    img.SetSpacing((0.08, 0.08))
    sitk.WriteImage(img, str(tmp_path / "two.nii"))
    d = _json(run_cli("info", tmp_path / "two.nii", "--json"))
    assert d["shape"] == [1, 6, 8] and d["spacing_um"] == [80.0, 80.0, 80.0]  # not 1000


def test_debug_shows_traceback_for_user_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from microct_sr.cli import main; main()",
                        "--debug", "info", str(tmp_path / "nope")], capture_output=True, text=True)
    # the same exit status as without --debug: shell loops branch on 2 for bad input
    assert r.returncode == 2 and "Traceback" in r.stderr and "nope" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_empty_path_exits_2_instead_of_reading_the_current_folder(tmp_path, run_cli,
                                                                   monkeypatch):
    """``info "$SCAN"`` with SCAN unset: one error line, not a description of the current
    folder (which here holds a numbered slice series that reads as a volume)."""
    for i in range(3):
        tifffile.imwrite(tmp_path / f"img{i}.tif", np.zeros((4, 4), np.uint8))
    monkeypatch.chdir(tmp_path)
    r = run_cli("info", "", "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["path"] is None, r.stdout
    assert r.stderr == "error: PATH is an empty path; give a scan file or folder\n"
