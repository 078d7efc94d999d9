"""SimpleITK formats: :class:`SitkVolume` (NIfTI, MHA/MHD, NRRD, single DICOM; loaded whole
on first read), NIfTI completeness checks, header spacing (mm -> um), DICOM series folders
(:class:`DicomSeriesVolume`) and :class:`SitkWriter` (buffers the whole volume until
``close()``)."""

from __future__ import annotations

import logging
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .base import SITK_SUFFIXES, Spacing, Volume, check_same_headers
from .writer import VolumeWriter, float16_as_float32

log = logging.getLogger(__name__)

# ITK picks its reader/writer from the suffix, case-sensitively for some formats (x.MHA is
# "unknown", x.NII.GZ a "bad NIfTI file name"): we name the ImageIO ourselves.
_IMAGE_IO = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".mha": "MetaImageIO",
             ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
             ".dcm": "GDCMImageIO"}
# Written compressed (their size on disk is not known up front)
_COMPRESSED = (".nii.gz", ".nrrd", ".mha")
# Header fields ITK fills with 1 mm when no spacing is set; left out for an unknown voxel size
# (NRRD's space directions carry the direction too, and its space and origin need them).
_SPACING_FIELDS = {".nrrd": (b"space:", b"space directions:", b"space origin:"),
                   ".mha": (b"ElementSpacing =",)}
# What a MetaImage writer may put beside its header when the data go to a separate file.
_COMPANIONS = (".mhd", ".raw", ".zraw")


def sitk_suffix(path: Path) -> str:
    """The SimpleITK suffix of ``path`` in lower case (``.nii.gz`` for ``X.NII.GZ``), or ""."""
    name = path.name.lower()
    return max((s for s in SITK_SUFFIXES if name.endswith(s)), key=len, default="")


@contextmanager
def _itk_name(path: Path) -> Iterator[str]:
    """A file name SimpleITK reads ``path`` by: the path itself, or for a NIfTI file whose
    suffix is not lower case (``x.Nii``, ``x.NII.GZ``) a lower-case symlink to it in a
    temporary folder, since the NIfTI library refuses such names whatever ImageIO is set."""
    suffix = sitk_suffix(path)
    if suffix not in (".nii", ".nii.gz") or path.name.endswith(suffix):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="microct-sr-") as tmp:
        link = Path(tmp) / f"volume{suffix}"
        try:
            link.symlink_to(path.resolve())
        except OSError as e:
            raise UserError(f"cannot read a NIfTI file with a mixed-case suffix here ({e}); "
                            f"rename it to end in {suffix}", path) from None
        yield str(link)


def _sitk_dtype(reader: Any, path: Path) -> np.dtype:
    import SimpleITK as sitk

    table = {sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16,
             sitk.sitkInt16: np.int16, sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32,
             sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64, sitk.sitkFloat32: np.float32,
             sitk.sitkFloat64: np.float64}
    pid = reader.GetPixelID()
    if pid not in table:
        raise UserError(f"unsupported pixel type {sitk.GetPixelIDValueAsString(pid)} "
                        "(expected a scalar grayscale image)", path)
    return np.dtype(table[pid])


class SitkVolume(Volume):
    """NIfTI / MHA / MHD / NRRD / single DICOM via SimpleITK; loaded whole on first read."""

    format = "sitk"

    def __init__(self, path: Path):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetImageIO(_IMAGE_IO.get(sitk_suffix(path), ""))
        try:
            with _itk_name(path) as name:
                reader.SetFileName(name)
                reader.ReadImageInformation()
        except RuntimeError as e:
            raise UserError(f"SimpleITK cannot read it ({_first_line(e)})", path) from None
        size = reader.GetSize()
        if reader.GetNumberOfComponents() != 1:
            raise UserError(f"{reader.GetNumberOfComponents()} components per voxel; expected "
                            "a grayscale volume", path)
        if len(size) == 2:
            size = (*size, 1)
        if len(size) != 3:
            raise UserError(f"{len(size)}D image; expected 3D", path)
        dtype = _sitk_dtype(reader, path)
        spacing = _sitk_spacing(path, reader.GetSpacing())
        if (spacing and size[2] == 1 and sitk_suffix(path) == ".dcm"
                and not reader.HasMetaDataKey("0018|0088")):
            # one DICOM slice without Spacing Between Slices: GDCM's z is a made-up 1 mm
            spacing = (spacing[2], spacing[1], spacing[2])
        self._reader = reader
        self._array: np.ndarray | None = None
        meta = {"origin_mm": reader.GetOrigin(), "direction": reader.GetDirection()}
        super().__init__(path, (size[2], size[1], size[0]), dtype, spacing, "sitk-header", meta)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self._array is None:
            import SimpleITK as sitk

            if sitk_suffix(self.path) in (".nii", ".nii.gz"):
                _check_nifti_complete(self.path, int(np.prod(self.shape)) * self.dtype.itemsize)
            try:
                with _itk_name(self.path) as name:
                    self._reader.SetFileName(name)
                    img = self._reader.Execute()
            except RuntimeError as e:
                raise UserError(f"corrupt or truncated ({_first_line(e)})", self.path) from None
            self._array = sitk.GetArrayFromImage(img).reshape(self.shape)
        return self._array[z0:z1].copy()

    def close(self) -> None:
        self._array = None


def _check_nifti_complete(path: Path, nbytes: int) -> None:
    """ITK reads truncated NIfTI files without complaint: check the size (and the gzip stream)."""
    import gzip
    import zlib

    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(540)
                size = len(head)
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        else:
            with open(path, "rb") as f:
                head = f.read(540)
            size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"corrupt or truncated NIfTI ({e})", path) from None
    offset = _nifti_vox_offset(head)
    if size < offset + nbytes:
        raise UserError(f"truncated NIfTI: {size} bytes, the header needs {offset + nbytes}",
                        path)


def _nifti_vox_offset(head: bytes) -> int:
    """Data offset from a NIfTI-1 or NIfTI-2 header (either byte order); 352 if unclear."""
    for order in "<>":
        sizeof_hdr = struct.unpack_from(order + "i", head, 0)[0] if len(head) >= 4 else 0
        if sizeof_hdr == 348 and len(head) >= 112:
            return max(348, int(struct.unpack_from(order + "f", head, 108)[0]))
        if sizeof_hdr == 540 and len(head) >= 176:
            return max(540, int(struct.unpack_from(order + "q", head, 168)[0]))
    return 352


def _drop_header_fields(path: Path, fields: tuple[bytes, ...]) -> None:
    """Rewrite the NRRD or MHA file ``path`` (header attached, as ITK writes them) in place
    without the header lines that start with one of ``fields``; the data move up unchanged."""
    end_mark = b"\n\n" if path.name.lower().endswith(".nrrd") else b"ElementDataFile = LOCAL\n"
    with open(path, "r+b") as f:
        start = f.read(65536)
        end = start.find(end_mark)
        if end < 0:
            raise OSError(f"cannot find the end of the header ITK wrote to {path}")
        end += len(end_mark)
        head = b"".join(line for line in start[:end].splitlines(keepends=True)
                        if not line.startswith(fields))
        read_at, write_at = end, len(head)
        f.seek(0)
        f.write(head)
        while True:  # the header shrank: each block is written before where it was read
            f.seek(read_at)
            block = f.read(1 << 22)
            if not block:
                break
            f.seek(write_at)
            f.write(block)
            read_at += len(block)
            write_at += len(block)
        f.truncate(write_at)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "rror" in ln or "annot" in ln), lines[0] if lines else "")
    return msg[:200]


def _sitk_spacing(path: Path, spacing_mm: tuple[float, ...]) -> Spacing | None:
    """(z, y, x) um from the header; None when the header has no spacing field (NRRD without
    ``spacings``/``space directions``, MHA without ElementSpacing) or NIfTI's 1 mm default.
    A 2D image has no z spacing: z = x, as for a TIFF or OME-TIFF without a z size (ITK's
    1 mm would be a made-up 1000 um). Negative or zero sizes: see :func:`.base.checked_spacing`."""
    sp = list(spacing_mm)
    suffix = sitk_suffix(path)
    try:
        if suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
            head = path.read_bytes()[:65536].decode("latin-1", errors="replace").lower()
            keys = ("spacings:", "space directions:") if "nrrd" in suffix or "nhdr" in suffix \
                else ("elementspacing", "elementsize")
            if not any(k in head for k in keys):
                return None
        elif suffix in (".nii", ".nii.gz") and all(abs(v - 1.0) < 1e-12 for v in sp):
            return None
    except OSError:
        return None
    if suffix in (".nii", ".nii.gz"):  # float32 in the header: drop the float noise
        sp = [float(str(np.float32(v))) for v in sp]
    if len(sp) == 2:
        sp.append(sp[0])
    return (_um(sp[2]), _um(sp[1]), _um(sp[0]))


def _um(mm: float) -> float:
    """mm -> um, rounded to 10 significant digits (no 7.000000000000001)."""
    return float(f"{mm * 1000.0:.10g}")


def _dicom_files(folder: Path) -> list[Path]:
    """Files of the largest DICOM series in ``folder`` (sorted by position), or [].

    A file that looks like DICOM (``.dcm``/``.ima`` or the ``DICM`` signature) but belongs to
    no series (GDCM skips files it cannot parse, e.g. truncated ones) is a UserError naming
    it: a slice is never dropped silently."""
    import SimpleITK as sitk

    # dot-files (macOS ``._x.dcm`` companions, .DS_Store) are no slices: GDCM skips them
    candidates = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.suffix.lower() in (".dcm", ".ima", "") or _is_dicom(p))]
    if not candidates:
        return []
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        return []
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i) for i in ids]
    _check_none_dropped(candidates, {Path(f).name for files in series for f in files})
    best = max(series, key=len)
    if len(series) > 1:
        log.warning("%s: %d DICOM series; reading the largest (%d files)", folder, len(series),
                    len(best))
    return [Path(f) for f in best]


def _check_none_dropped(candidates: list[Path], in_series: set[str]) -> None:
    """UserError naming the first DICOM-looking file that no series holds (DICOMDIR aside)."""
    for p in sorted(candidates):
        if p.name in in_series or p.name.upper() == "DICOMDIR":
            continue
        if p.suffix.lower() in (".dcm", ".ima") or _is_dicom(p):
            raise UserError("DICOM file that belongs to no series (unreadable or truncated?); "
                            "refusing to read the series without this slice", p)


def _is_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _dicom_slice_info(path: Path) -> tuple[tuple[int, int], str]:
    """(y, x) and pixel type of one DICOM slice from its header; UserError if unreadable."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UserError(f"unreadable DICOM ({_first_line(e)})", path) from None
    size = reader.GetSize()
    return (size[1], size[0]), sitk.GetPixelIDValueAsString(reader.GetPixelID())


class DicomSeriesVolume(Volume):
    """A DICOM series folder read one file per slice through SimpleITK. Every slice's header
    is checked for the first slice's size and pixel type on opening."""

    format = "sitk"

    def __init__(self, folder: Path, files: list[Path]):
        import SimpleITK as sitk

        self.files = files
        try:
            first = sitk.ReadImage(str(files[0]))
        except RuntimeError as e:
            raise UserError(f"unreadable DICOM ({_first_line(e)})", files[0]) from None
        check_same_headers(files, _dicom_slice_info)
        arr = sitk.GetArrayFromImage(first)
        sx, sy = first.GetSpacing()[:2]
        sz = first.GetSpacing()[2] if first.GetDimension() > 2 else sx
        if len(files) > 1:
            o0 = np.array(first.GetOrigin())
            o1 = np.array(sitk.ReadImage(str(files[1])).GetOrigin())
            dz = float(np.linalg.norm(o1 - o0))
            sz = dz if dz > 0 else sz
        spacing = (sz * 1000.0, sy * 1000.0, sx * 1000.0)
        meta: dict[str, Any] = {"files": len(files)}
        if first.GetDimension() == 3:
            meta.update(origin_mm=first.GetOrigin(), direction=first.GetDirection())
        super().__init__(folder, (len(files),) + arr.shape[-2:], arr.dtype, spacing,
                         "sitk-header", meta)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        import SimpleITK as sitk

        out = np.empty((z1 - z0,) + self.shape[1:], self.dtype)
        for i, f in enumerate(self.files[z0:z1]):
            try:
                arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            except RuntimeError as e:
                raise UserError(f"unreadable DICOM ({_first_line(e)})", f) from None
            if arr.size != out[i].size:
                raise UserError(f"slice has {arr.shape[-2:]} pixels, the first slice "
                                f"{self.shape[1:]}", f)
            out[i] = arr.reshape(self.shape[1:]).astype(self.dtype, copy=False)
        return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

class SitkWriter(VolumeWriter):
    """NIfTI / MHA / NRRD through SimpleITK (spacing in mm). Buffers the whole volume in memory
    until ``close()``: SimpleITK cannot write slice by slice."""

    kind = "sitk"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, overwrite: bool, *,
                 origin_mm: tuple[float, ...] | None = None,
                 direction: tuple[float, ...] | None = None):
        self._buf: np.ndarray | None = None
        self.origin_mm, self.direction = origin_mm, direction
        dt = float16_as_float32(path, dtype, "NIfTI/MHA/NRRD (SimpleITK)")
        super().__init__(path, shape, dt, spacing_um, overwrite)

    def _open(self) -> None:
        self._buf = np.empty(self.shape, self.dtype)

    def _write(self, block: np.ndarray) -> None:
        assert self._buf is not None
        self._buf[self.count:self.count + block.shape[0]] = block

    def _tmp_name(self) -> str:
        """The name with its suffix in lower case: ITK picks (and for NIfTI checks) the format
        by the suffix, so ``x.MHA`` is written as ``.microct-sr-tmp-<pid>-x.mha``."""
        suffix = sitk_suffix(self.path)
        return self.path.name[:len(self.path.name) - len(suffix)] + suffix

    def _uncompressed(self) -> bool:
        return sitk_suffix(self.path) not in _COMPRESSED

    def _finish(self) -> None:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self._buf)
        if self.spacing_um:
            img.SetSpacing([v / 1000.0 for v in self.spacing_um[::-1]])
        if self.origin_mm is not None and len(self.origin_mm) == 3:
            img.SetOrigin([float(v) for v in self.origin_mm])
        if self.direction is not None and len(self.direction) == 9:
            img.SetDirection([float(v) for v in self.direction])
        writer = sitk.ImageFileWriter()
        writer.SetImageIO(_IMAGE_IO[sitk_suffix(self.path)])
        writer.SetFileName(str(self.tmp))
        writer.SetUseCompression(sitk_suffix(self.path) in _COMPRESSED)
        try:
            writer.Execute(img)
        except RuntimeError as e:
            raise OSError(f"SimpleITK could not write {self.path}: {_first_line(e)}") from None
        self._buf = None
        if not self.spacing_um and sitk_suffix(self.path) in _SPACING_FIELDS:
            _drop_header_fields(self.tmp, _SPACING_FIELDS[sitk_suffix(self.path)])

    def _cleanup(self) -> None:
        """Drop the buffer and any data file ITK wrote beside the temporary header."""
        self._buf = None
        stem = self.tmp.name[:len(self.tmp.name) - len(sitk_suffix(self.tmp))]
        for suffix in _COMPANIONS:
            (self.tmp.parent / (stem + suffix)).unlink(missing_ok=True)
