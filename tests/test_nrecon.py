"""NRecon folders: log parsing (latin-1, undersampling, First Section, prefix) and slice reading."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from microct_sr import nrecon
from microct_sr.errors import UserError
from microct_sr.volume import open_volume, write_volume

# Modelled on a real NRecon 1.7.4 log of a SkyScan 1272 scan: undersampling 2 makes the
# reconstructed pixel (9.919978) twice the projection pixel (4.959989); the paths carry a
# latin-1 'ü' (byte 0xFC, invalid UTF-8); an unknown [User] section must be tolerated.
NRECON_17_LOG = """[System]
Scanner=Skyscan1272
Instrument S/N=16J04081
Hardware version=A
Software=Version 1. 1. 19
Home directory=C:\\SkyScan1272
Source Type=Hamamatsu L11871-20
Camera=XIMEA xiRAY16
Camera Pixel Size (um)=    7.4000
CameraXYRatio=1.0000
Incl.in lifting (um/mm)=-0.1185
[User]
User Name=USER
Computer Name=SKYSCAN-PC
[Acquisition]
Data directory=D:\\Results\\Müller\\tibia_4
Filename Prefix=tibia_4_
Number Of Files= 1002
Source Voltage (kV)=  60
Source Current (uA)= 166
Number of Rows= 1092
Number of Columns= 1632
Camera binning=2x2
Image Rotation=0.0800
Image Pixel Size (um)=4.959989
Object to Source (mm)=57.700
Camera to Source (mm)=259.93280
Filter=Al 0.5mm
Image Format=TIFF
Depth (bits)=16
Exposure (ms)=  850
Rotation Step (deg)=0.200
Frame Averaging=ON (4)
Random Movement=ON (10)
Use 360 Rotation=NO
Study Date and Time=05 Mar 2019  14h:02m:36s
[Reconstruction]
Reconstruction Program=NRecon
Program Version=Version: 1.7.4.2
Reconstruction engine=InstaRecon
Engine version=Version: 2.0.4.0
Dataset Origin=Skyscan1272
Dataset Prefix=tibia_4_
Dataset Directory=D:\\Results\\Müller\\tibia_4
Output Directory=D:\\Results\\Müller\\tibia_4\\Rec
Time and Date=Mar 05, 2019  16:10:27
First Section={first}
Last Section={last}
Reconstruction duration per slice (seconds)=0.041
Total reconstruction time ({n} slices) in seconds=1.64
Postalignment=-2.50
Section to Section Step=1
Sections Count={n}
Result File Type={ftype}
Result File Header Length (bytes)=1134
Result Image Width (pixels)={w}
Result Image Height (pixels)={h}
Pixel Size (um)=9.919978
Reconstruction Angular Range (deg)=200.40
Use 180+=OFF
Angular Step (deg)=0.2000
Smoothing=2
Ring Artifact Correction=10
Filter cutoff relative to Nyquist frequency=100
Filter type description=Hamming (Alpha=0.54)
Undersampling factor=2
Beam Hardening Correction (%)=30
Minimum for CS to Image Conversion=0.000000
Maximum for CS to Image Conversion=0.075000
BMP LUT=0
Cone-beam Angle Horiz.(deg)=11.287
[File name convention]
Filename Index Length=8
Filename Prefix=tibia_4__rec
"""


def make_nrecon_folder(folder: Path, n: int = 12, first: int = 20, dtype=np.uint8,
                       h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """Write a NRecon-like folder (8-bit palette BMP or 16-bit TIFF slices, latin-1 CRLF log,
    one ``_spr`` preview) and return the volume it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vol = rng.integers(0, np.iinfo(dtype).max, (n, h, w), dtype=dtype)
    ext = "bmp" if dtype == np.uint8 else "tif"
    for i, s in enumerate(vol):
        name = folder / f"tibia_4__rec{first + i:08d}.{ext}"
        if ext == "bmp":
            ok, buf = cv2.imencode(".bmp", s)
            assert ok
            buf.tofile(name)
        else:
            tifffile.imwrite(name, s)
    cv2.imwrite(str(folder / "tibia_4__rec_spr.bmp"), np.zeros((9, 7), np.uint8))
    text = NRECON_17_LOG.format(first=first, last=first + n - 1, n=n, ftype=ext.upper(), w=w,
                                h=h)
    (folder / "tibia_4__rec.log").write_bytes(text.replace("\n", "\r\n").encode("latin-1"))
    return vol


def test_log_is_latin1_and_tolerant(tmp_path):
    make_nrecon_folder(tmp_path / "rec", n=3)
    raw = (tmp_path / "rec" / "tibia_4__rec.log").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # the fixture really is non-UTF-8, like real logs
    s = nrecon.parse_log(tmp_path / "rec" / "tibia_4__rec.log")
    assert s["Acquisition"]["Data directory"] == "D:\\Results\\Müller\\tibia_4"
    assert s["User"]["Computer Name"] == "SKYSCAN-PC"
    assert s["Reconstruction"]["Filter type description"] == "Hamming (Alpha=0.54)"


def test_log_pixel_size_is_reconstruction_not_projection(tmp_path):
    make_nrecon_folder(tmp_path / "rec", n=3)
    info = nrecon.read_log(tmp_path / "rec" / "tibia_4__rec.log")
    assert info.undersampling == 2
    assert info.projection_pixel_um == pytest.approx(4.959989)
    assert info.pixel_size_um == pytest.approx(9.919978)
    assert info.spacing_um == pytest.approx((9.919978,) * 3)
    assert info.first_section == 20
    assert info.prefix == "tibia_4__rec"


def test_read_bmp_nrecon_folder(tmp_path):
    vol = make_nrecon_folder(tmp_path / "rec", n=12, first=20)
    bmp = tmp_path / "rec" / "tibia_4__rec00000020.bmp"
    assert struct.unpack_from("<H", bmp.read_bytes(), 28)[0] == 8  # 8-bit palette BMP
    v = open_volume(tmp_path / "rec")
    assert v.format == "nrecon" and v.spacing_source == "nrecon-log"
    assert v.shape == (12, 40, 48) and v.dtype == np.uint8
    assert v.spacing_um == pytest.approx((9.919978,) * 3)
    assert v.metadata["first_index"] == 20 and v.metadata["undersampling"] == 2
    np.testing.assert_array_equal(v.read(0, 12), vol)  # the _spr preview was skipped
    np.testing.assert_array_equal(v[-1], vol[-1])


def test_read_16bit_tiff_nrecon_folder(tmp_path):
    vol = make_nrecon_folder(tmp_path / "rec", n=5, dtype=np.uint16)
    v = open_volume(tmp_path / "rec")
    assert v.dtype == np.uint16 and v.shape == (5, 40, 48)
    np.testing.assert_array_equal(v.read(1, 4), vol[1:4])
    assert vol.max() > 255  # 16 bits really survive


def test_open_via_log_file(tmp_path):
    make_nrecon_folder(tmp_path / "rec", n=3)
    v = open_volume(tmp_path / "rec" / "tibia_4__rec.log")
    assert v.format == "nrecon" and len(v) == 3


def test_first_section_mismatch_warns(tmp_path, caplog):
    make_nrecon_folder(tmp_path / "rec", n=4, first=20)
    (tmp_path / "rec" / "tibia_4__rec00000020.bmp").unlink()
    with caplog.at_level(logging.WARNING):
        v = open_volume(tmp_path / "rec")
    assert len(v) == 3
    assert "First Section=20" in caplog.text


def test_gap_in_numbering_names_file(tmp_path):
    make_nrecon_folder(tmp_path / "rec", n=6)
    (tmp_path / "rec" / "tibia_4__rec00000023.bmp").unlink()
    with pytest.raises(UserError, match=r"tibia_4__rec00000024\.bmp.*gap"):
        open_volume(tmp_path / "rec")


def test_undersampling_fallback_without_reconstruction_pixel(tmp_path):
    make_nrecon_folder(tmp_path / "rec", n=2)
    p = tmp_path / "rec" / "tibia_4__rec.log"
    text = p.read_bytes().decode("latin-1").replace("Pixel Size (um)=9.919978\r\n", "")
    p.write_bytes(text.encode("latin-1"))
    info = nrecon.read_log(p)
    assert info.spacing_um == pytest.approx((4.959989 * 2,) * 3)
    assert info.notes


def test_bad_number_in_log(tmp_path):
    make_nrecon_folder(tmp_path / "rec", n=2)
    p = tmp_path / "rec" / "tibia_4__rec.log"
    text = p.read_bytes().decode("latin-1").replace("Pixel Size (um)=9.919978", "Pixel Size (um)=n/a")
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=r"tibia_4__rec\.log.*Pixel Size.*not a number"):
        open_volume(tmp_path / "rec")


def test_writer_log_round_trip(tmp_path):
    a = np.arange(3 * 8 * 9, dtype=np.uint8).reshape(3, 8, 9)
    write_volume(tmp_path / "lr", a, (80.0, 10.0, 10.0),
                 nrecon_log={"Acquisition": {"Image Pixel Size (um)": "5.0"}})
    names = sorted(p.name for p in (tmp_path / "lr").iterdir())
    # 80 um slices of a 10 um grid: every 8th section, numbered by section as NRecon does
    assert names == ["lr_rec.log", "lr_rec00000000.bmp", "lr_rec00000008.bmp",
                     "lr_rec00000016.bmp"]
    s = nrecon.parse_log(tmp_path / "lr" / "lr_rec.log")
    assert float(s["Reconstruction"]["Pixel Size (um)"]) == 10.0
    assert s["Reconstruction"]["Section to Section Step"] == "8"
    assert s["Reconstruction"]["Last Section"] == "16"
    assert s["File name convention"]["Filename Prefix"] == "lr_rec"
    assert s["Acquisition"]["Image Pixel Size (um)"] == "5.0"
    v = open_volume(tmp_path / "lr")
    assert v.spacing_um == (80.0, 10.0, 10.0)  # anisotropic z kept exactly
    np.testing.assert_array_equal(v.read(0, 3), a)
    # a reader of the standard entries alone (our [microct-sr] section removed) gets it too
    log = tmp_path / "lr" / "lr_rec.log"
    text = log.read_bytes().decode("latin-1")
    log.write_bytes(text[:text.index(f"[{nrecon.OWN_SECTION}]")].encode("latin-1")
                    + text[text.index("[File name convention]"):].encode("latin-1"))
    assert nrecon.OWN_SECTION not in nrecon.parse_log(log)
    v = open_volume(tmp_path / "lr")
    assert v.spacing_um == (80.0, 10.0, 10.0) and v.spacing_source == "nrecon-log"
    np.testing.assert_array_equal(v.read(0, 3), a)


@pytest.mark.parametrize("spacing,step", [((80.0, 10.0, 10.0), 8), ((10.0, 10.0, 10.0), 1),
                                          ((25.0, 10.0, 10.0), 1), ((80.0, 10.0, 12.0), 1),
                                          (None, 1)])
def test_section_step_of_a_voxel_size(spacing, step):
    assert nrecon.section_step(spacing) == step


def test_writer_custom_prefix_and_16bit(tmp_path):
    a = (np.arange(2 * 5 * 6, dtype=np.uint16) * 1000).reshape(2, 5, 6)
    write_volume(tmp_path / "out", a, (3.0, 3.0, 3.0), nrecon_prefix="scan1_")
    assert (tmp_path / "out" / "scan1_rec00000001.tif").is_file()
    assert (tmp_path / "out" / "scan1_rec.log").is_file()
    np.testing.assert_array_equal(open_volume(tmp_path / "out").read(0, 2), a)


def test_section_step_two(tmp_path):
    folder = tmp_path / "rec"
    vol = make_nrecon_folder(folder, n=6, first=20)
    p = folder / "tibia_4__rec.log"
    text = p.read_bytes().decode("latin-1").replace("Section to Section Step=1",
                                                   "Section to Section Step=2")
    p.write_bytes(text.encode("latin-1"))
    for i in range(6):  # NRecon numbers the files by section: 20, 22, 24, ...
        (folder / f"tibia_4__rec{20 + i:08d}.bmp").rename(folder / f"x{i}.tmp")
    for i in range(6):
        (folder / f"x{i}.tmp").rename(folder / f"tibia_4__rec{20 + 2 * i:08d}.bmp")
    v = open_volume(folder)
    assert v.spacing_um == pytest.approx((2 * 9.919978, 9.919978, 9.919978))
    np.testing.assert_array_equal(v.read(0, 6), vol)


def test_log_found_by_content_when_not_named_rec(tmp_path):
    folder = tmp_path / "rec"
    make_nrecon_folder(folder, n=3)
    (folder / "tibia_4__rec.log").rename(folder / "reconstruction.log")
    (folder / "notes.log").write_text("unrelated\n")
    assert nrecon.find_log(folder) == folder / "reconstruction.log"
    v = open_volume(folder)
    assert v.format == "nrecon" and v.spacing_um == pytest.approx((9.919978,) * 3)


def test_upscale_of_an_nrecon_scan_keeps_its_scanner_and_settings(tmp_path, run_cli):
    """An 8x upscale written as an NRecon folder carries the scan's [System], [Acquisition],
    [User] entries and its reconstruction settings, with the grid (pixel size, sections,
    image size, file names) its own, plus where it came from; readers get 80 x 10 x 10 um."""
    from _volume_files import make_model

    make_nrecon_folder(tmp_path / "rec", n=3, h=6, w=5)
    model = make_model(tmp_path / "tiny.pt")
    out = tmp_path / "sr"
    r = run_cli("upscale", tmp_path / "rec", out, "--model", model, "--quiet")
    assert r.exit_code == 0, r.stderr
    s = nrecon.parse_log(nrecon.find_log(out))
    assert s["System"]["Scanner"] == "Skyscan1272"
    assert s["Acquisition"]["Source Voltage (kV)"].strip() == "60"
    assert s["Acquisition"]["Data directory"] == "D:\\Results\\Müller\\tibia_4"
    assert s["User"]["User Name"] == "USER"
    rec = s["Reconstruction"]
    assert rec["Filter type description"] == "Hamming (Alpha=0.54)" and rec["Smoothing"] == "2"
    assert rec["Reconstruction Program"] == "microct-sr" and "Undersampling factor" not in rec
    assert float(rec["Pixel Size (um)"]) == pytest.approx(9.919978 / 8)
    assert rec["Result Image Width (pixels)"] == "40" and rec["Sections Count"] == "3"
    assert rec["Section to Section Step"] == "8"
    assert s["File name convention"]["Filename Prefix"] != "tibia_4__rec"
    assert s[nrecon.OWN_SECTION]["Upscaled from"] == str(tmp_path / "rec")
    assert s[nrecon.OWN_SECTION]["Scale"] == "8"
    with open_volume(out) as v:
        assert v.shape == (3, 48, 40)
        assert v.spacing_um == pytest.approx((9.919978, 9.919978 / 8, 9.919978 / 8))


def _acquisition_log() -> bytes:
    """The scanner's acquisition log of the fixture scan: no [Reconstruction] section."""
    return NRECON_17_LOG.split("[Reconstruction]")[0].replace("\n", "\r\n").encode("latin-1")


def test_macos_and_windows_companion_files_are_ignored(tmp_path):
    """A folder copied through a Mac carries a binary ``._name`` beside every file (the log
    too) and ``.DS_Store``; one from Windows ``Thumbs.db`` and ``desktop.ini``."""
    folder = tmp_path / "rec"
    vol = make_nrecon_folder(folder, n=4)
    for p in list(folder.iterdir()):
        (folder / f"._{p.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"
                                             + bytes(4000))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100))
    (folder / "desktop.ini").write_bytes(b"[.ShellClassInfo]\r\nIconResource=x\r\n")
    assert nrecon.find_log(folder) == folder / "tibia_4__rec.log"
    v = open_volume(folder)
    assert v.format == "nrecon" and v.spacing_um == pytest.approx((9.919978,) * 3)
    np.testing.assert_array_equal(v.read(0, 4), vol)


@pytest.mark.parametrize("ftype,dtype", [("BMP", np.uint8), ("TIF", np.uint16)])
def test_slices_in_two_formats_follow_the_logs_result_file_type(tmp_path, caplog, ftype,
                                                                dtype):
    """BMP slices and a 16-bit TIFF copy of each side by side: the log's Result File Type
    decides, the same on every run (it used to depend on Python's string hashing)."""
    folder = tmp_path / "rec"
    vol8 = make_nrecon_folder(folder, n=3)
    vol16 = (vol8.astype(np.uint16) * 257)
    for i, s in enumerate(vol16):
        tifffile.imwrite(folder / f"tibia_4__rec{20 + i:08d}.tif", s)
    p = folder / "tibia_4__rec.log"
    p.write_bytes(p.read_bytes().replace(b"Result File Type=BMP", f"Result File Type={ftype}"
                                         .encode()))
    with caplog.at_level(logging.WARNING):
        v = open_volume(folder)
    assert v.dtype == dtype and "several formats" in caplog.text
    np.testing.assert_array_equal(v.read(0, 3), vol8 if dtype == np.uint8 else vol16)


def test_projection_folder_is_refused_naming_the_reconstruction(tmp_path, run_cli):
    """The scan folder holds the projections (``tibia_4_00000000.tif``...) and the acquisition
    log, with NRecon's output in ``tibia_4_Rec``: reading the projections as slices would
    upscale radiographs. The error names the reconstruction folder instead."""
    scan = tmp_path / "tibia_4"
    scan.mkdir()
    (scan / "tibia_4_.log").write_bytes(_acquisition_log())
    for i in range(5):
        tifffile.imwrite(scan / f"tibia_4_{i:08d}.tif", np.full((20, 30), 1000 + i, np.uint16))
    with pytest.raises(UserError, match=r"tibia_4: .*projection.*tibia_4_\.log.*open the "
                                        r"folder NRecon wrote"):
        open_volume(scan)
    make_nrecon_folder(scan / "tibia_4_Rec", n=3)
    r = run_cli("info", scan)
    assert r.exit_code == 2 and "projection" in r.stderr and "open tibia_4_Rec" in r.stderr
    with pytest.raises(UserError, match=r"tibia_4_\.log: an acquisition log"):
        open_volume(scan / "tibia_4_.log")
    # NRecon told to write into the scan folder itself: the reconstruction is read
    make_nrecon_folder(scan, n=3)
    assert open_volume(scan).format == "nrecon"


def test_scan_folder_above_the_reconstruction_names_it(tmp_path):
    make_nrecon_folder(tmp_path / "tibia_4" / "tibia_4_Rec", n=3)
    (tmp_path / "tibia_4" / "notes.txt").write_text("rat 4\n")
    with pytest.raises(UserError, match=r"no recognisable slices.*in tibia_4_Rec"):
        open_volume(tmp_path / "tibia_4")


@pytest.mark.parametrize("bom,codec", [(b"\xef\xbb\xbf", "utf-8"), (b"", "utf-16")])
def test_log_resaved_by_an_editor_as_unicode(tmp_path, bom, codec):
    """A log opened and saved again in Notepad as UTF-8 (with BOM) or "Unicode" (UTF-16)."""
    folder = tmp_path / "rec"
    make_nrecon_folder(folder, n=3)
    p = folder / "tibia_4__rec.log"
    p.write_bytes(bom + p.read_bytes().decode("latin-1").encode(codec))
    s = nrecon.parse_log(p)
    assert s["System"]["Scanner"] == "Skyscan1272"
    assert s["Acquisition"]["Data directory"] == "D:\\Results\\Müller\\tibia_4"
    v = open_volume(folder)
    assert v.spacing_um == pytest.approx((9.919978,) * 3) and len(v) == 3


def test_missing_last_slices_warn(tmp_path, caplog):
    """A copy from the scanner PC stopped early: the numbering has no gap, but the log's Last
    Section says slices are missing."""
    folder = tmp_path / "rec"
    make_nrecon_folder(folder, n=6, first=20)
    for i in (24, 25):
        (folder / f"tibia_4__rec{i:08d}.bmp").unlink()
    with caplog.at_level(logging.WARNING):
        v = open_volume(folder)
    assert len(v) == 4 and "Last Section=25" in caplog.text and "00000023" in caplog.text


def test_several_reconstruction_logs_warn(tmp_path, caplog):
    folder = tmp_path / "rec"
    make_nrecon_folder(folder, n=3)
    (folder / "tibia_4__rec.log").rename(folder / "a__rec.log")
    make_nrecon_folder(folder, n=3)
    with caplog.at_level(logging.WARNING):
        assert nrecon.find_log(folder) == folder / "a__rec.log"
    assert "2 reconstruction logs" in caplog.text


def test_unicode_log_not_named_rec_is_found_by_its_content(tmp_path):
    """The content search for a [Reconstruction] section decodes as parse_log does: a log
    re-saved as UTF-16 under a name not ending in 'rec' is still the folder's log."""
    folder = tmp_path / "rec"
    make_nrecon_folder(folder, n=3)
    log_path = folder / "reconstruction.log"
    (folder / "tibia_4__rec.log").rename(log_path)
    log_path.write_bytes(log_path.read_bytes().decode("latin-1").encode("utf-16"))
    assert nrecon.find_log(folder) == log_path
    v = open_volume(folder)
    assert v.format == "nrecon" and v.spacing_um == pytest.approx((9.919978,) * 3)


def test_utf8_byte_order_mark_before_latin1_text_falls_back_to_latin1(tmp_path):
    """A BOM, but bytes that are no UTF-8 (an editor that added the mark and kept the
    Windows code page): read as latin-1 after the mark, not an error."""
    folder = tmp_path / "rec"
    make_nrecon_folder(folder, n=3)
    p = folder / "tibia_4__rec.log"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    s = nrecon.parse_log(p)
    assert s["System"]["Scanner"] == "Skyscan1272"
    assert s["Acquisition"]["Data directory"] == "D:\\Results\\Müller\\tibia_4"


def test_a_log_of_neither_kind_is_not_called_an_acquisition_log(tmp_path):
    p = tmp_path / "scan.log"
    p.write_text("[System]\nScanner=Skyscan1272\n")
    with pytest.raises(UserError, match=r"scan\.log: not an NRecon reconstruction log \(no "
                                        r"\[Reconstruction\] section\)"):
        nrecon.read_log(p)


def test_a_stale_temporary_log_beside_the_log_is_not_read(tmp_path, caplog):
    """Our own temporaries (``.microct-sr-tmp-...``) are dot-files as well: a killed run's
    half-written ``*_rec.log`` is neither read nor counted as a second reconstruction log."""
    folder = tmp_path / "rec"
    vol = make_nrecon_folder(folder, n=3)
    (folder / ".microct-sr-tmp-99999-abcd-tibia_4__rec.log").write_bytes(
        b"[Reconstruction]\r\nPixel Size (um)=1")
    with caplog.at_level(logging.WARNING):
        assert nrecon.find_log(folder) == folder / "tibia_4__rec.log"
        v = open_volume(folder)
    assert "reconstruction logs" not in caplog.text
    assert v.spacing_um == pytest.approx((9.919978,) * 3)
    np.testing.assert_array_equal(v.read(0, 3), vol)


@pytest.mark.parametrize("ftype, suffix", [("TIF", ".tiff"), ("JPEG", ".jpg")])
def test_result_file_type_matches_tiff_and_jpeg_spellings(tmp_path, caplog, ftype, suffix):
    """Result File Type TIF picks ``.tiff`` slices and JPEG picks ``.jpg`` ones (the log's
    type and the file suffix may each use either spelling), not the BMP copies beside them."""
    folder = tmp_path / "rec"
    vol8 = make_nrecon_folder(folder, n=3)
    for i, s in enumerate(vol8):
        name = folder / f"tibia_4__rec{20 + i:08d}{suffix}"
        if suffix == ".tiff":
            tifffile.imwrite(name, s.astype(np.uint16) * 257)
        else:
            assert cv2.imwrite(str(name), s)
    p = folder / "tibia_4__rec.log"
    p.write_bytes(p.read_bytes().replace(b"Result File Type=BMP",
                                         f"Result File Type={ftype}".encode()))
    with caplog.at_level(logging.WARNING):
        v = open_volume(folder)
    want = {".tiff": ".tif", ".jpg": ".jpg"}[suffix]
    assert f"reading the {want} slices (the log's Result File Type)" in caplog.text
    assert len(v) == 3
    if suffix == ".tiff":
        np.testing.assert_array_equal(v.read(0, 3), vol8.astype(np.uint16) * 257)


def test_slices_beside_an_acquisition_log_but_not_named_as_projections_are_read(tmp_path):
    """Only a series named ``<acquisition Filename Prefix><number>`` is taken for the
    projections: reconstructed slices (``tibia_4_rec0000NNNN``) with the acquisition log
    copied beside them, their own log missing, are read as numbered slices."""
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "tibia_4_.log").write_bytes(_acquisition_log())
    vol = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    for i, s in enumerate(vol):
        tifffile.imwrite(folder / f"tibia_4_rec{20 + i:08d}.tif", s)
    v = open_volume(folder)
    assert v.format == "slices"
    np.testing.assert_array_equal(v.read(0, 3), vol)


def test_scan_folder_names_every_reconstruction_and_no_temporary_folder(tmp_path):
    """Two reconstructions below the scan folder are both named; a hidden folder (another
    run's temporary NRecon output, a ``._`` companion) is not offered."""
    scan = tmp_path / "tibia_4"
    make_nrecon_folder(scan / "tibia_4_Rec", n=3)
    make_nrecon_folder(scan / "tibia_4_Rec2", n=3)
    make_nrecon_folder(scan / ".microct-sr-tmp-99999-tibia_4_Rec3", n=3)
    (scan / "notes.txt").write_text("rat 4\n")
    with pytest.raises(UserError) as e:
        open_volume(scan)
    assert str(e.value).endswith("; the NRecon reconstruction is in tibia_4_Rec or tibia_4_Rec2")


def test_slices_not_named_after_the_log_warn_naming_the_logs_stem(tmp_path, caplog):
    """A log without a Filename Prefix is matched by its stem; slices named otherwise are read
    as the folder's numbered series, and the warning names the stem that was looked for."""
    folder = tmp_path / "rec"
    vol = make_nrecon_folder(folder, n=3)
    log_path = folder / "scan_rec.log"
    (folder / "tibia_4__rec.log").rename(log_path)
    text = log_path.read_bytes()
    assert b"Filename Prefix=tibia_4__rec\r\n" in text
    log_path.write_bytes(text.replace(b"Filename Prefix=tibia_4__rec\r\n", b""))
    with caplog.at_level(logging.WARNING):
        v = open_volume(folder)
    assert "no slices named after the log's prefix 'scan_rec'" in caplog.text
    np.testing.assert_array_equal(v.read(0, 3), vol)
