"""Volume readers and writers: round trips with spacing read back by tifffile and SimpleITK,
lazy reading, atomic output, overwrite protection, dtype clipping, memory."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import click
import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from _volume_files import dicom_series, mha_with

from microct_sr import volume
from microct_sr.errors import UserError
from microct_sr.volume import create_volume_writer, open_volume, to_dtype, write_volume

SPACING = (7.5, 2.5, 2.0)  # (z, y, x) um, all different so axis mix-ups show


def _vol(dtype=np.uint16, shape=(6, 20, 30), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(volume.TMP_PREFIX))


# ---------------------------------------------------------------------------------- to_dtype

def test_to_dtype_clips_and_rounds_never_wraps():
    x = np.array([-5.0, 0.4, 0.6, 254.5, 300.0, np.nan])
    np.testing.assert_array_equal(to_dtype(x, np.uint8), [0, 0, 1, 254, 255, 0])
    np.testing.assert_array_equal(to_dtype(np.array([-1, 70000]), np.uint16), [0, 65535])
    np.testing.assert_array_equal(to_dtype(np.array([40000], np.uint16), np.int16), [32767])
    assert to_dtype(np.array([1.5]), np.float32).dtype == np.float32


# ---------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_imagej_tiff_round_trip(tmp_path, dtype):
    a = _vol(dtype)
    p = write_volume(tmp_path / "v.tif", a, SPACING)
    with tifffile.TiffFile(p) as tf:
        assert tf.is_imagej and not tf.is_bigtiff
        ij = tf.imagej_metadata
        assert ij["unit"] == "um" and ij["spacing"] == pytest.approx(7.5)
        assert ij["slices"] == 6
        xr = tf.pages[0].tags["XResolution"].value
        yr = tf.pages[0].tags["YResolution"].value
        assert xr[1] / xr[0] == pytest.approx(2.0) and yr[1] / yr[0] == pytest.approx(2.5)
        np.testing.assert_array_equal(tf.asarray(), a)
    v = open_volume(p)
    assert (v.format, v.spacing_source, v.dtype) == ("tiff", "tiff-imagej", np.dtype(dtype))
    assert v.spacing_um == pytest.approx(SPACING)
    np.testing.assert_array_equal(v.read(2, 5), a[2:5])
    assert v._raw is not None  # uncompressed stack: slices read by offset, not whole


def _ome_pixels(tf) -> dict:
    root = ET.fromstring(tf.ome_metadata)
    return next(el for el in root.iter() if el.tag.endswith("Pixels")).attrib


def test_ome_tiff_round_trip_tifffile_and_sitk(tmp_path):
    a = _vol(np.uint16)
    p = write_volume(tmp_path / "v.ome.tif", a, SPACING)
    with tifffile.TiffFile(p) as tf:
        assert tf.is_ome
        px = _ome_pixels(tf)
        got = [float(px[f"PhysicalSize{k}"]) for k in "ZYX"]
        assert got == pytest.approx(SPACING) and px["PhysicalSizeXUnit"] == "µm"
    img = sitk.ReadImage(str(p))  # SimpleITK reads x/y from the cm resolution tags
    assert img.GetSpacing()[:2] == pytest.approx((0.002, 0.0025))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), a)
    v = open_volume(p)
    assert v.format == "ome-tiff" and v.spacing_source == "tiff-ome"
    assert v.spacing_um == pytest.approx(SPACING)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "v.mha", "v.nrrd"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_sitk_round_trip(tmp_path, name, dtype):
    a = _vol(dtype)
    p = write_volume(tmp_path / name, a, SPACING)
    img = sitk.ReadImage(str(p))
    assert img.GetSpacing() == pytest.approx((0.002, 0.0025, 0.0075))  # mm, (x, y, z)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), a)
    v = open_volume(p)
    assert v.format == "sitk" and v.spacing_source == "sitk-header" and v.dtype == dtype
    assert v.spacing_um == pytest.approx(SPACING, rel=1e-6)
    np.testing.assert_array_equal(v.read(1, 3), a[1:3])


def test_nrecon_round_trip(tmp_path):
    a = _vol(np.uint8)
    write_volume(tmp_path / "scan", a, SPACING)
    v = open_volume(tmp_path / "scan")
    assert v.format == "nrecon" and v.spacing_um == SPACING
    np.testing.assert_array_equal(v.read(0, 6), a)
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scan" / "scan_rec00000003.bmp")))
    for c in range(img.shape[-1]):  # ITK expands the gray palette to RGB
        np.testing.assert_array_equal(img[..., c], a[3])


def test_float32_tiff_and_unsupported_imagej_dtype(tmp_path, caplog):
    f = _vol(np.float32)
    v = open_volume(write_volume(tmp_path / "f.tif", f, SPACING))
    assert v.dtype == np.float32 and v.spacing_source == "tiff-imagej"
    i32 = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4)
    with caplog.at_level(logging.WARNING):
        v = open_volume(write_volume(tmp_path / "i.tif", i32, SPACING))
    assert "OME-TIFF" in caplog.text and v.format == "ome-tiff"
    np.testing.assert_array_equal(v.read(0, 2), i32)


def test_bigtiff_ome_above_threshold(tmp_path, monkeypatch, caplog):
    a = _vol(np.uint16)
    monkeypatch.setattr(volume.tiff, "BIGTIFF_THRESHOLD", a.nbytes - 1)
    with caplog.at_level(logging.WARNING):
        p = write_volume(tmp_path / "big.tif", a, SPACING)
    assert "BigTIFF" in caplog.text
    with tifffile.TiffFile(p) as tf:
        assert tf.is_bigtiff and tf.is_ome and not tf.is_imagej
        px = _ome_pixels(tf)
        assert [float(px[f"PhysicalSize{k}"]) for k in "ZYX"] == pytest.approx(SPACING)
        np.testing.assert_array_equal(tf.asarray(), a)
    monkeypatch.setattr(volume.tiff, "BIGTIFF_THRESHOLD", a.nbytes)
    with tifffile.TiffFile(write_volume(tmp_path / "small.tif", a, SPACING)) as tf:
        assert tf.is_imagej and not tf.is_bigtiff


def test_slice_by_slice_and_blocks(tmp_path):
    a = _vol(np.uint16, shape=(7, 9, 11))
    with create_volume_writer(tmp_path / "v.tif", a.shape, a.dtype, SPACING) as w:
        w.write(a[0])
        w.write(a[1:4])
        for s in a[4:]:
            w.write(s)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "v.tif"), a)


def test_writer_clips_foreign_dtype(tmp_path):
    x = np.array([[[-3.0, 12.4, 300.0]]])
    with create_volume_writer(tmp_path / "w.tif", x.shape, np.uint8, None) as w:
        w.write(x)  # float into a uint8 writer: clipped and rounded
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "w.tif"), [[0, 12, 255]])


def test_compressed_tiff_read_by_pages(tmp_path):
    a = _vol(np.uint8, shape=(5, 16, 16))
    tifffile.imwrite(tmp_path / "z.tif", a, compression="zlib")
    v = open_volume(tmp_path / "z.tif")
    assert v._raw is None and v.spacing_um is None and v.spacing_source == "unknown"
    np.testing.assert_array_equal(v.read(1, 4), a[1:4])


def test_tiff_resolution_cm_spacing(tmp_path):
    a = _vol(np.uint8, shape=(3, 8, 8))
    tifffile.imwrite(tmp_path / "r.tif", a, resolution=(1e4 / 5.0, 1e4 / 5.0),
                     resolutionunit="CENTIMETER", photometric="minisblack")
    v = open_volume(tmp_path / "r.tif")
    assert v.spacing_source == "tiff-resolution" and v.spacing_um == pytest.approx((5.0,) * 3)


# ---------------------------------------------------------------------------------- folders

def test_numbered_png_folder_natural_order(tmp_path):
    a = _vol(np.uint16, shape=(12, 10, 14))
    for i, s in enumerate(a):
        cv2.imwrite(str(tmp_path / f"img{i + 1}.png"), s)  # img1..img12, no zero padding
    v = open_volume(tmp_path)
    assert v.format == "slices" and v.dtype == np.uint16 and v.spacing_um is None
    np.testing.assert_array_equal(v.read(0, 12), a)


def test_rgb_slices_with_equal_channels_are_gray(tmp_path):
    a = _vol(np.uint8, shape=(3, 6, 7))
    for i, s in enumerate(a):
        cv2.imwrite(str(tmp_path / f"s_{i:03d}.png"), np.dstack([s, s, s]))
    np.testing.assert_array_equal(open_volume(tmp_path).read(0, 3), a)


def test_spacing_override_and_unknown_warning(tmp_path, caplog):
    a = _vol(np.uint8, shape=(2, 6, 7))
    tifffile.imwrite(tmp_path / "plain.tif", a)
    with caplog.at_level(logging.WARNING):
        v = open_volume(tmp_path / "plain.tif")
    assert v.spacing_um is None and "plain.tif" in caplog.text and "unknown" in caplog.text
    v = open_volume(tmp_path / "plain.tif", spacing_um=(3.0, 1.0, 1.0))
    assert v.spacing_um == (3.0, 1.0, 1.0) and v.spacing_source == "user"


def test_dicom_series_folder(tmp_path):
    a = _vol(np.int16, shape=(4, 8, 9)) // 4
    dicom_series(tmp_path, list(a))
    v = open_volume(tmp_path)
    assert v.format == "sitk" and v.shape == (4, 8, 9)
    assert v.metadata["files"] == 4
    assert v.spacing_um == pytest.approx((50.0, 30.0, 20.0))
    assert v.metadata["origin_mm"] == pytest.approx((0.0, 0.0, 0.0))  # the first slice's
    assert len(v.metadata["direction"]) == 9
    np.testing.assert_array_equal(v.read(0, 4), a)


def test_macos_appledouble_files_beside_a_dicom_series_are_ignored(tmp_path):
    """A DICOM folder copied through a Mac carries a binary ``._slice000.dcm`` per slice;
    they were taken for truncated slices ("belongs to no series") and the folder refused."""
    a = _vol(np.int16, shape=(3, 8, 9)) // 4
    for f in dicom_series(tmp_path, list(a)):
        (tmp_path / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(200))
    (tmp_path / ".DS_Store").write_bytes(bytes(64))
    v = open_volume(tmp_path)
    assert v.shape == (3, 8, 9) and v.metadata["files"] == 3
    np.testing.assert_array_equal(v.read(0, 3), a)


@pytest.mark.parametrize("tag", [None, "0.08"])
def test_single_dicom_file_z_spacing_only_from_its_header(tmp_path, tag):
    """GDCM gives a lone slice without Spacing Between Slices (0018,0088) a made-up 1 mm z;
    such a file gets z = x (as a 2D TIFF does), one with the tag keeps its value."""
    a = _vol(np.int16, shape=(1, 8, 9)) // 4
    np.save(tmp_path / "a.npy", a)
    # A fresh process: once GDCM has written a CT series (other tests), its writer adds the
    # tag (1 mm) to every later file, which would make a tagless file impossible here.
    subprocess.run([sys.executable, "-c", f"""if True:
        import numpy as np, SimpleITK as sitk
        img = sitk.GetImageFromArray(np.load({str(tmp_path / "a.npy")!r})[0])
        img.SetSpacing((0.02, 0.03))
        if {tag!r}:
            img.SetMetaData("0018|0088", {tag!r})
        sitk.WriteImage(img, {str(tmp_path / "one.dcm")!r})"""], check=True)
    v = open_volume(tmp_path / "one.dcm")
    assert v.shape == (1, 8, 9)
    assert v.spacing_um == pytest.approx((80.0 if tag else 20.0, 30.0, 20.0))
    np.testing.assert_array_equal(v.read(0, 1), a)


def test_dicom_slices_of_different_sizes_are_refused_by_name(tmp_path):
    z = np.zeros
    dicom_series(tmp_path, [z((8, 8), np.int16), z((8, 8), np.int16), z((6, 6), np.int16)])
    with pytest.raises(UserError, match=r"slice002\.dcm: slice size 6x6 differs"):
        open_volume(tmp_path)


@pytest.mark.parametrize("keep", [200, -100])  # header cut / pixel data cut
def test_truncated_dicom_slice_is_refused_not_dropped(tmp_path, keep):
    files = dicom_series(tmp_path, list(_vol(np.int16, shape=(4, 8, 9)) // 4))
    files[2].write_bytes(files[2].read_bytes()[:keep])
    with pytest.raises(UserError, match=r"slice002\.dcm: DICOM file that belongs to no series"):
        open_volume(tmp_path)


# ---------------------------------------------------------------------------------- atomicity

@pytest.mark.parametrize("name", ["v.tif", "v.ome.tif", "v.nii.gz", "scan"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(tmp_path, name, exc):
    a = _vol(np.uint8)
    with pytest.raises(exc):
        with create_volume_writer(tmp_path / name, a.shape, a.dtype, SPACING) as w:
            w.write(a[:3])
            if not name.endswith(".nii.gz"):  # SimpleITK writers buffer until close()
                assert _leftovers(tmp_path)  # the temporary output exists while writing
            raise exc()
    assert sorted(os.listdir(tmp_path)) == []


def test_short_write_is_an_error_and_leaves_nothing(tmp_path):
    w = create_volume_writer(tmp_path / "v.tif", (4, 5, 6), np.uint8, None)
    w.write(np.zeros((3, 5, 6), np.uint8))
    with pytest.raises(ValueError, match="wrote 3 of 4"):
        w.close()
    assert os.listdir(tmp_path) == []


def test_sigterm_leaves_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from microct_sr.volume import create_volume_writer
        with create_volume_writer({str(tmp_path / 'v.tif')!r}, (1000, 8, 8), np.uint8, None) as w:
            print("started", flush=True)
            for i in range(1000):
                w.write(np.zeros((8, 8), np.uint8)); time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch, run_cli):
    """An uncompressed output larger than the free space fails up front, naming the output and
    both sizes, and leaves nothing; compressed SimpleITK outputs (size unknown) are not held
    to it."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4000, 4000))
    for name in ("big.tif", "big.ome.tif", "big_dir", "big.nii"):
        with pytest.raises(UserError, match=rf"{name}: the output needs 0\.00 GiB but only"):
            create_volume_writer(tmp_path / name, (2, 64, 64), np.uint8, None)
    assert list(tmp_path.iterdir()) == []
    write_volume(tmp_path / "small.tif", np.zeros((2, 32, 32), np.uint8), None)  # 2 KiB fits
    write_volume(tmp_path / "big.nii.gz", np.zeros((2, 64, 64), np.uint8), None)
    r = run_cli("phantom", tmp_path / "ph.tif", "--shape", "16", "64", "64")
    assert r.exit_code == 2 and "ph.tif: the output needs" in r.stderr
    assert not (tmp_path / "ph.tif").exists()


def test_overwrite_protection(tmp_path):
    a = _vol(np.uint8)
    p = write_volume(tmp_path / "v.tif", a, SPACING)
    with pytest.raises(UserError, match=r"v\.tif: already exists; pass --overwrite"):
        write_volume(p, a[::-1], SPACING)
    np.testing.assert_array_equal(tifffile.imread(p), a)
    write_volume(p, a[::-1], SPACING, overwrite=True)
    np.testing.assert_array_equal(tifffile.imread(p), a[::-1])
    assert _leftovers(tmp_path) == []


def test_overwrite_nrecon_folder_and_refuse_foreign(tmp_path):
    a = _vol(np.uint8)
    write_volume(tmp_path / "scan", a, SPACING)
    write_volume(tmp_path / "scan", a[:2], SPACING, overwrite=True)
    assert len(open_volume(tmp_path / "scan")) == 2
    assert sorted(os.listdir(tmp_path)) == ["scan"]
    (tmp_path / "scan" / "notes.docx").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace"):
        write_volume(tmp_path / "scan", a, SPACING, overwrite=True)
    assert (tmp_path / "scan" / "notes.docx").exists()


def test_unsupported_output_suffix(tmp_path):
    with pytest.raises(UserError, match=r"out\.xyz.*unsupported output format"):
        create_volume_writer(tmp_path / "out.xyz", (1, 2, 2), np.uint8, None)


@pytest.mark.parametrize("name", ["x.MHA", "x.NII.GZ", "y.Nii", "z.NRRD", "v.TIF",
                                  "v.OME.TIF"])
def test_upper_and_mixed_case_suffixes(tmp_path, name):
    a = _vol(np.uint16, shape=(3, 8, 9))
    write_volume(tmp_path / name, a, SPACING)
    assert os.listdir(tmp_path) == [name]  # no .mhd/.zraw or temporary file beside it
    v = open_volume(tmp_path / name)
    assert v.spacing_um == pytest.approx(SPACING, rel=1e-6)
    np.testing.assert_array_equal(v.read(0, 3), a)


def test_failed_sitk_write_leaves_no_companion_files(tmp_path, monkeypatch):
    def half_write(self, img):  # what ITK leaves when it fails half way through a MetaImage
        tmp = Path(self.GetFileName())
        for suffix in (".mha", ".mhd", ".zraw"):
            tmp.with_suffix(suffix).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", half_write)
    with pytest.raises(OSError, match=r"x\.MHA"):
        write_volume(tmp_path / "x.MHA", np.zeros((2, 4, 4), np.uint8), None)
    assert os.listdir(tmp_path) == []


def test_stale_temp_with_lower_case_suffix_is_removed(tmp_path):
    dead = tmp_path / f"{volume.TMP_PREFIX}999999999-x.mha"
    dead.write_bytes(b"junk")
    write_volume(tmp_path / "x.MHA", np.zeros((2, 4, 4), np.uint8), None)
    assert os.listdir(tmp_path) == ["x.MHA"]


def test_negative_header_spacing_is_its_absolute_value(tmp_path, caplog):
    p = mha_with(tmp_path, "nsp.mha", "ElementSpacing", "-0.08 0.08 0.08")
    with caplog.at_level(logging.WARNING):
        v = open_volume(p)
    assert v.spacing_um == pytest.approx((80.0, 80.0, 80.0))
    assert "nsp.mha" in caplog.text and "negative voxel size" in caplog.text
    for out in ("o.tif", "o.nrrd"):  # writers accept it
        assert open_volume(write_volume(tmp_path / out, v[:], v.spacing_um)).spacing_um == \
            pytest.approx((80.0, 80.0, 80.0))


def test_zero_header_spacing_is_unknown(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        v = open_volume(mha_with(tmp_path, "zsp.mha", "ElementSpacing", "0 0.08 0.08"))
    assert v.spacing_um is None and v.spacing_source == "unknown" and "zsp.mha" in caplog.text


@pytest.mark.parametrize("dims", ["8 8 0", "0 8 4"])
def test_zero_size_dimension_is_a_user_error(tmp_path, dims):
    with pytest.raises(UserError, match=r"e\.mha: empty volume.*zero-size"):
        open_volume(mha_with(tmp_path, "e.mha", "DimSize", dims))


def test_bool_tiff_is_refused_on_opening(tmp_path):
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((4, 8, 8), bool))
    with pytest.raises(UserError, match=r"b\.tif: unsupported voxel type bool"):
        open_volume(tmp_path / "b.tif")


@pytest.mark.parametrize("name", ["two.nii", "two.mha"])
def test_2d_sitk_image_has_no_made_up_z_spacing(tmp_path, name):
    img = sitk.GetImageFromArray(np.zeros((8, 9), np.uint8))
    img.SetSpacing((0.02, 0.03))  # x, y in mm
    sitk.WriteImage(img, str(tmp_path / name))
    v = open_volume(tmp_path / name)
    assert v.shape == (1, 8, 9)
    assert v.spacing_um == pytest.approx((20.0, 30.0, 20.0))  # z = x, as for a 2D TIFF


# ---------------------------------------------------------------------------------- real data

def test_real_lhdl_tiff(shared_data):
    v = open_volume(shared_data / "bone" / "lhdl_3155_D_4_bc.tif")
    assert v.shape == (200, 200, 200) and v.dtype == np.uint8
    assert v.spacing_um == pytest.approx((19.5, 19.5, 19.5)) and v.spacing_source == "tiff-imagej"
    s = v.read(100, 102)
    assert s.shape == (2, 200, 200) and s.std() > 10  # real bone, not blank


def test_real_nrrd_without_spacing(shared_data, caplog):
    files = sorted((shared_data / "bone" / "vertebra_rois").glob("*.nrrd"))
    assert files, "vertebra ROIs missing from shared data"
    with caplog.at_level(logging.WARNING):
        v = open_volume(files[0])
    assert v.shape == (300, 300, 300) and v.spacing_um is None
    assert files[0].name in caplog.text
    shrew = open_volume(shared_data / "bone" / "bonejh_shrew_trab_4p1um_binary.nrrd")
    assert shrew.spacing_um == pytest.approx((4.1, 4.1, 4.1))


# ---------------------------------------------------------------------------------- memory

_MEM_SCRIPT = """
import resource, sys, tracemalloc, numpy as np
from microct_sr.volume import open_volume

def hwm():  # peak RSS of this process image (VmHWM resets at exec; ru_maxrss does not)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

v = open_volume(sys.argv[1])
v[0]  # imports and first-read buffers are the baseline
base = hwm()
tracemalloc.start()  # numpy reports its array buffers to tracemalloc
if sys.argv[2] == "whole":  # control: what reading it all at once costs
    total = int(v.read(0, len(v)).sum(dtype=np.int64))
else:
    total = sum(int(v[z].sum(dtype=np.int64)) for z in range(len(v)))
print(tracemalloc.get_traced_memory()[1], hwm() - base, total)
"""


def _peak_bytes(path: Path, mode: str = "slices") -> tuple[int, int]:
    """(peak traced allocation, growth of peak RSS) while reading ``path``, in bytes, measured
    in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(path), mode], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.parametrize("kind", ["nrecon", "tif"])
def test_memory_does_not_grow_with_slice_count(tmp_path, kind):
    """Reading 400 slices one by one costs what 40 do, for a folder of slices and for one TIFF
    file; the whole volume (400 x 384 x 384 x 2 B = 113 MiB) would show, as the control proves."""
    rng = np.random.default_rng(0)
    s = rng.integers(0, 65535, (384, 384), dtype=np.uint16)
    paths = {}
    for n in (40, 400):
        paths[n] = tmp_path / (f"s{n}" if kind == "nrecon" else f"s{n}.tif")
        with create_volume_writer(paths[n], (n, 384, 384), np.uint16, SPACING) as w:
            for _ in range(n):
                w.write(s)
    small, rss_small = _peak_bytes(paths[40])
    large, rss_large = _peak_bytes(paths[400])
    whole, rss_whole = _peak_bytes(paths[400], "whole")
    mib = 1 / 2**20
    print(f"\n{kind}: peak allocation while reading 40 slices {small * mib:.2f} MiB, 400 slices "
          f"{large * mib:.2f} MiB, control (400 at once) {whole * mib:.1f} MiB; peak RSS growth "
          f"{rss_small * mib:.1f} / {rss_large * mib:.1f} / {rss_whole * mib:.1f} MiB")
    assert whole > 100 * 2**20 and rss_whole > 100 * 2**20  # the measurements see a whole read
    assert large < small + 2 * 2**20  # one slice is 0.28 MiB
    assert rss_large < rss_small + 8 * 2**20


# ---------------------------------------------------------------------------------- more TIFF

@pytest.mark.parametrize("unit, factor", [("micron", 1.0), ("\\u00B5m", 1.0), ("um", 1.0),
                                          ("mm", 1000.0), ("nm", 0.001)])
def test_imagej_units(tmp_path, unit, factor):
    a = _vol(np.uint8, shape=(3, 8, 8))
    tifffile.imwrite(tmp_path / "u.tif", a, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"spacing": 2.0, "unit": unit, "axes": "ZYX"})
    v = open_volume(tmp_path / "u.tif")
    assert v.spacing_source == "tiff-imagej"
    assert v.spacing_um == pytest.approx((2.0 * factor, 0.25 * factor, 0.5 * factor))


def test_imagej_without_unit_is_unknown(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", _vol(np.uint8, shape=(3, 8, 8)), imagej=True,
                     metadata={"axes": "ZYX"})
    v = open_volume(tmp_path / "p.tif")
    assert v.spacing_um is None and v.spacing_source == "unknown"


def test_multichannel_tiff_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((3, 2, 8, 8), np.uint8), imagej=True,
                     metadata={"axes": "ZCYX"})
    with pytest.raises(UserError, match=r"c\.tif.*more than one non-spatial"):
        open_volume(tmp_path / "c.tif")


def test_stale_temp_from_killed_run_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"{volume.TMP_PREFIX}{dead}-v.tif"
    stale.write_bytes(b"partial")
    alive = tmp_path / f"{volume.TMP_PREFIX}{os.getppid()}-v.tif"  # a live process's: kept
    alive.write_bytes(b"partial")
    write_volume(tmp_path / "v.tif", _vol(np.uint8), SPACING)
    assert not stale.exists() and alive.exists()


def test_nrecon_log_with_renamed_slices_falls_back(tmp_path, caplog):
    a = _vol(np.uint8, shape=(3, 6, 7))
    write_volume(tmp_path / "scan", a, SPACING)
    for p in (tmp_path / "scan").glob("*.bmp"):
        p.rename(p.with_name(p.name.replace("scan_rec", "renamed_")))
    with caplog.at_level(logging.WARNING):
        v = open_volume(tmp_path / "scan")
    assert v.format == "nrecon" and v.spacing_um == SPACING and "renamed_" in caplog.text
    np.testing.assert_array_equal(v.read(0, 3), a)


def test_only_folder_writers_take_extra_files(tmp_path):
    a = _vol(np.uint8, shape=(2, 4, 4))
    with create_volume_writer(tmp_path / "scan", a.shape, a.dtype, SPACING) as w:
        w.write(a)
        w.add_file("simulation.json", '{"factor": 8}\n')
        assert not (tmp_path / "scan").exists()  # appears only with the rename
    assert json.loads((tmp_path / "scan" / "simulation.json").read_text()) == {"factor": 8}
    single = create_volume_writer(tmp_path / "v.tif", a.shape, a.dtype, SPACING)
    assert not hasattr(single, "add_file")  # callers test for it (simulate.py)
    single.abort()


def test_sigterm_handler_restored_after_writers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    w1 = create_volume_writer(tmp_path / "a.tif", (1, 2, 2), np.uint8, None)
    w2 = create_volume_writer(tmp_path / "b.tif", (1, 2, 2), np.uint8, None)
    assert signal.getsignal(signal.SIGTERM) is volume._on_sigterm
    w1.abort()
    assert signal.getsignal(signal.SIGTERM) is volume._on_sigterm  # w2 still open
    w2.write(np.zeros((2, 2), np.uint8))
    w2.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_jpeg_folder_sizes_from_headers(tmp_path):
    a = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))  # 20 x 30, smooth: JPEG-friendly
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"j{i}.jpg"), a)
    assert volume.probe_slice_file(tmp_path / "j0.jpg") == ((20, 30), "uint8")
    v = open_volume(tmp_path)
    assert v.shape == (3, 20, 30) and v.dtype == np.uint8
    assert np.abs(v[1].astype(int) - a).max() <= 8  # lossy, but the same picture
    cv2.imwrite(str(tmp_path / "j3.jpg"), np.zeros((21, 30), np.uint8))
    with pytest.raises(UserError, match=r"j3\.jpg: slice size 30x21 differs"):
        open_volume(tmp_path)


def test_single_2d_files(tmp_path):
    a = _vol(np.uint16, shape=(1, 9, 11))
    tifffile.imwrite(tmp_path / "one.tif", a[0])
    cv2.imwrite(str(tmp_path / "one.png"), a[0])
    for name in ("one.tif", "one.png"):
        v = open_volume(tmp_path / name)
        assert v.shape == (1, 9, 11)
        np.testing.assert_array_equal(v.read(0, 1), a)


def test_mhd_with_separate_raw(tmp_path):
    a = _vol(np.int16, shape=(3, 5, 6))
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.004, 0.004, 0.012))
    sitk.WriteImage(img, str(tmp_path / "v.mhd"))
    v = open_volume(tmp_path / "v.mhd")
    assert v.spacing_um == pytest.approx((12.0, 4.0, 4.0)) and v.dtype == np.int16
    np.testing.assert_array_equal(v.read(0, 3), a)


def test_multipage_tiff_with_odd_page_is_rejected(tmp_path):
    with tifffile.TiffWriter(tmp_path / "m.tif") as tw:
        tw.write(np.zeros((8, 8), np.uint8))
        tw.write(np.zeros((8, 8), np.uint8))
        tw.write(np.zeros((8, 9), np.uint8))
    with pytest.raises(UserError, match=r"m\.tif: pages of different sizes"):
        open_volume(tmp_path / "m.tif")


def test_plain_multipage_tiff_and_slicing(tmp_path):
    a = _vol(np.uint16, shape=(5, 8, 8))
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        for s in a:
            tw.write(s, photometric="minisblack")  # one series per write, like many scanners
    v = open_volume(tmp_path / "p.tif")
    assert v.shape == (5, 8, 8)
    np.testing.assert_array_equal(v[1:4], a[1:4])
    np.testing.assert_array_equal(v[-1], a[-1])


def test_failed_writer_creation_leaves_nothing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises((MemoryError, ValueError)):  # SimpleITK writers buffer: too big
        # compressed, so the free-space check (a UserError) does not come first
        create_volume_writer(tmp_path / "huge.nii.gz", (10**6, 10**6, 10**6), np.uint8, None)
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is before


def test_big_endian_tiff_and_writable_slices(tmp_path):
    a = _vol(np.uint16, shape=(4, 6, 7))
    tifffile.imwrite(tmp_path / "be.tif", a, byteorder=">", photometric="minisblack")
    v = open_volume(tmp_path / "be.tif")
    s = v.read(1, 3)
    assert v._raw is not None and s.dtype == np.dtype("uint16") and s.dtype.isnative
    np.testing.assert_array_equal(s, a[1:3])
    le = open_volume(write_volume(tmp_path / "le.tif", a, None))[2]
    le[0, 0] = 1  # slices are ordinary writable arrays


@pytest.mark.parametrize("name", ["v.tif", "v.ome.tif", "v.nrrd", "v.nii.gz"])
def test_float16_is_written_as_float32_with_the_same_values(tmp_path, caplog, name):
    """No TIFF flavour Fiji reads, nor SimpleITK, holds float16: float32 keeps every value."""
    a = (np.random.default_rng(0).standard_normal((2, 8, 8)) * 1000).astype(np.float16)
    with caplog.at_level(logging.WARNING):
        path = write_volume(tmp_path / name, a, (80.0, 10.0, 10.0))
    assert name in caplog.text and "float16" in caplog.text
    with open_volume(path) as v:
        assert v.dtype == np.float32 and v.spacing_um == pytest.approx((80.0, 10.0, 10.0))
        np.testing.assert_array_equal(v.read(0, 2), a.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_64_bit_integers_in_tiff_are_refused_naming_formats_that_hold_them(tmp_path, dtype):
    a = np.arange(128, dtype=dtype).reshape(2, 8, 8)
    with pytest.raises(UserError, match=r"v\.tif: TIFF .* cannot hold u?int64.*\.nrrd"):
        write_volume(tmp_path / "v.tif", a, (80.0, 10.0, 10.0))
    assert list(tmp_path.iterdir()) == []
    with open_volume(write_volume(tmp_path / "v.nrrd", a, (80.0, 10.0, 10.0))) as v:
        np.testing.assert_array_equal(v.read(0, 2), a)


def test_absurd_header_voxel_size_counts_as_unknown(tmp_path, caplog):
    """1e-40 mm (a unit mix-up or garbage) is no voxel size: unknown, with a warning, and
    --spacing-um outside 1 pm - 1 km is refused."""
    from microct_sr.cli._common import parse_spacing

    path = mha_with(tmp_path, "tiny.mha", "ElementSpacing", "1e-40 1e-40 1e-40")
    with caplog.at_level(logging.WARNING):
        v = open_volume(path)
    assert v.spacing_um is None and "tiny.mha" in caplog.text and "outside" in caplog.text
    assert parse_spacing("1e-3") == (1e-3, 1e-3, 1e-3)
    for bad in ("1e-30", "80,10,1e12"):
        with pytest.raises(click.BadParameter, match=r"must lie in 1e-06-1e\+09 um"):
            parse_spacing(bad)


@pytest.mark.parametrize("name", ["v.tif", "v.ome.tif"])
def test_voxel_size_beyond_tiff_rationals_still_writes(tmp_path, caplog, name):
    """8x below a 1 pm input: pixels per cm exceed a TIFF rational; the file is written
    without resolution tags (it used to crash in tifffile) and reads as spacing unknown."""
    a = _vol(np.uint8, shape=(2, 8, 8))
    with caplog.at_level(logging.WARNING):
        path = write_volume(tmp_path / name, a, (1.25e-7, 1.25e-7, 1.25e-7))
    with open_volume(path) as v:
        np.testing.assert_array_equal(v.read(0, 2), a)
        assert v.spacing_um is None
    assert name in caplog.text


def test_macos_appledouble_files_beside_numbered_slices_are_ignored(tmp_path):
    """A slice folder copied through a Mac: one binary ``._img000.png`` per slice, an equally
    long series that used to win the tie and fail as 'not a PNG file'."""
    a = _vol(np.uint8, shape=(3, 6, 7))
    for i, s in enumerate(a):
        cv2.imwrite(str(tmp_path / f"img{i:03d}.png"), s)
        (tmp_path / f"._img{i:03d}.png").write_bytes(b"\x00\x05\x16\x07" + bytes(4000))
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    v = open_volume(tmp_path)
    assert v.format == "slices" and [f.name for f in v.files] == ["img000.png", "img001.png",
                                                                   "img002.png"]
    np.testing.assert_array_equal(v.read(0, 3), a)


# ---------------------------------------------------------------------------------- viewers

@pytest.mark.parametrize("dtype, shift", [(np.uint16, 0), (np.float32, 0), (np.int16, 32768)])
def test_imagej_tiff_display_range_is_the_whole_volume(tmp_path, dtype, shift):
    """Fiji sets a 16-bit or float stack's display range from the description's min/max, and
    without them from the first slice alone: a dim first slice saturated the rest of the
    scan. The whole volume's range is written (ImageJ shifts int16 by 32768)."""
    a = np.zeros((4, 8, 8), dtype)
    a[0] = 100  # dim first slice, as at the end of a scan
    a[0, 0, 0] = 110
    a[2, 3, 3] = 3000
    a[3, 1, 1] = -5 if dtype != np.uint16 else 50
    p = write_volume(tmp_path / "v.tif", a, SPACING)
    with tifffile.TiffFile(p) as tf:
        ij = tf.imagej_metadata
        assert ij["min"] == pytest.approx(float(a.min()) + shift)
        assert ij["max"] == pytest.approx(float(a.max()) + shift)
        assert ij["spacing"] == pytest.approx(7.5) and ij["unit"] == "um"
        assert ij["slices"] == 4
        np.testing.assert_array_equal(tf.asarray(), a)
    with open_volume(p) as v:
        assert v.spacing_um == pytest.approx(SPACING)
        np.testing.assert_array_equal(v.read(0, 4), a)


def test_imagej_tiff_8bit_keeps_fijis_0_255_display(tmp_path):
    """8-bit stacks open at 0-255 in Fiji, as on the scanner; no min/max that would stretch
    them."""
    p = write_volume(tmp_path / "v.tif", np.full((2, 4, 4), 7, np.uint8), SPACING)
    with tifffile.TiffFile(p) as tf:
        assert "min" not in tf.imagej_metadata and "max" not in tf.imagej_metadata


@pytest.mark.parametrize("name", ["v.mha", "v.nrrd"])
def test_unknown_spacing_is_not_written_as_1_mm(tmp_path, caplog, name):
    """ITK writes 1 mm when no spacing is set; an MHA/NRRD of a scan of unknown voxel size
    then read as 1000 um voxels (info, evaluate). The field is left out, as in a TIFF."""
    a = _vol(np.uint16, shape=(3, 5, 6))
    p = write_volume(tmp_path / name, a, None)
    with caplog.at_level(logging.WARNING), open_volume(p) as v:
        assert v.spacing_um is None and v.spacing_source == "unknown"
        np.testing.assert_array_equal(v.read(0, 3), a)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(p))), a)
