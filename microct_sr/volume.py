"""Volume I/O: lazy readers for every scanner output we accept, and atomic slice-by-slice writers.

Arrays are (z, y, x); ``spacing_um`` is (z, y, x) in micrometres (mm only at SimpleITK).
Readers never load more than the slices asked for, except the SimpleITK file formats
(NIfTI, MHA/MHD, NRRD), which are loaded whole on first access. Writers write under a temporary
name in the target folder (``.microct-sr-tmp-<pid>-<name>``) and rename on success; the
SimpleITK writers buffer the whole volume in memory until ``close()``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import struct
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import nrecon
from .errors import UserError

log = logging.getLogger(__name__)

Spacing = tuple[float, float, float]

SITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
SITK_WRITE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.btf")
IMAGE_SUFFIXES = nrecon.SLICE_EXTENSIONS
# Above this many bytes an ImageJ (classic) TIFF cannot hold the data: write BigTIFF + OME.
# Module constant so tests can lower it instead of writing 4 GiB.
BIGTIFF_THRESHOLD = 2**32 - 2**25
TMP_PREFIX = ".microct-sr-tmp-"
IMAGEJ_DTYPES = ("uint8", "uint16", "int16", "float32")
# Length of one unit in micrometres (ImageJ 'unit', OME PhysicalSizeUnit).
_UNIT_UM = {"um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0,
            "micrometer": 1.0, "micrometre": 1.0, "\\u00b5m": 1.0, "nm": 1e-3,
            "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
            "m": 1e6, "meter": 1e6, "inch": 25400.0, "in": 25400.0}


# --------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------

def to_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
    """``x`` converted to ``dtype``: integers are rounded and clipped to the range (never
    wrapped), NaN becomes 0; floats are cast."""
    dtype = np.dtype(dtype)
    x = np.asarray(x)
    if x.dtype == dtype:
        return x
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if x.dtype.kind == "f":
            x = np.nan_to_num(np.rint(x), nan=0.0, posinf=info.max, neginf=info.min)
            return np.clip(x, info.min, info.max).astype(dtype)
        if x.dtype.kind in "ui":
            lo, hi = np.iinfo(x.dtype).min, np.iinfo(x.dtype).max
            if lo >= info.min and hi <= info.max:
                return x.astype(dtype)
            return np.clip(x, max(lo, info.min), min(hi, info.max)).astype(dtype)
        if x.dtype.kind == "b":
            return x.astype(dtype)
    return x.astype(dtype)


def _unit_um(unit: Any) -> float | None:
    """Micrometres per ``unit`` (ImageJ/OME spelling), None when unknown."""
    if unit is None:
        return None
    u = str(unit).strip().lower().replace("\\u00b5", "µ")
    return _UNIT_UM.get(u)


# --------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------

class Volume:
    """A lazy (z, y, x) volume: metadata up front, slices read on demand."""

    format: str = "unknown"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, spacing_source: str,
                 metadata: dict | None = None):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.spacing_um = None if spacing_um is None else tuple(float(s) for s in spacing_um)
        self.spacing_source = spacing_source if spacing_um is not None else "unknown"
        self.metadata = metadata or {}

    # subclasses implement _read(z0, z1) -> (z1 - z0, y, x)
    def _read(self, z0: int, z1: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0 <= z < z1`` as a (z1 - z0, y, x) array in the native dtype."""
        n = self.shape[0]
        z0, z1 = int(z0), int(z1)
        if not 0 <= z0 <= z1 <= n:
            raise IndexError(f"slice range [{z0}, {z1}) outside [0, {n}) of {self.path}")
        if z0 == z1:
            return np.empty((0,) + self.shape[1:], self.dtype)
        out = self._read(z0, z1)
        if out.shape != (z1 - z0,) + self.shape[1:]:
            raise UserError(f"slices {z0}..{z1 - 1} have shape {out.shape[1:]}, expected "
                            f"{self.shape[1:]}", self.path)
        return out

    def __getitem__(self, z: int | slice) -> np.ndarray:
        """``vol[z]`` -> one (y, x) slice; ``vol[a:b]`` -> ``read(a, b)`` (step 1 only)."""
        n = self.shape[0]
        if isinstance(z, slice):
            z0, z1, step = z.indices(n)
            if step != 1:
                raise IndexError("only contiguous slice ranges can be read")
            return self.read(z0, max(z0, z1))
        z = int(z)
        if z < 0:
            z += n
        if not 0 <= z < n:
            raise IndexError(f"slice {z} outside [0, {n}) of {self.path}")
        return self.read(z, z + 1)[0]

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        for z in range(len(self)):
            yield self[z]

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Volume {self.format} {self.path} shape={self.shape} dtype={self.dtype} "
                f"spacing_um={self.spacing_um} ({self.spacing_source})>")


# --------------------------------------------------------------------------------------------
# 2D slice files (NRecon and numbered folders)
# --------------------------------------------------------------------------------------------

def _gray(arr: np.ndarray, path: Path) -> np.ndarray:
    """A 2D grayscale slice from what the decoder returned; RGB only when channels agree."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        c = arr[..., :3]
        if not (np.array_equal(c[..., 0], c[..., 1]) and np.array_equal(c[..., 0], c[..., 2])):
            raise UserError("RGB slice whose colour channels differ; expected grayscale", path)
        return np.ascontiguousarray(c[..., 0])
    if arr.ndim == 3 and arr.shape[0] == 1:
        return arr[0]
    raise UserError(f"expected one 2D grayscale slice, found an array of shape {arr.shape}", path)


def read_slice_file(path: Path) -> np.ndarray:
    """One 2D slice (TIFF via tifffile; BMP/PNG/JPEG via OpenCV, unchanged bit depth)."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            arr = tifffile.imread(path, key=0)
        else:
            import cv2

            arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise UserError("cannot decode the image (corrupt or truncated?)", path)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or e})", path) from None
    except Exception as e:  # noqa: BLE001 - decoder errors on corrupt files vary by library
        raise UserError(f"corrupt or truncated image ({type(e).__name__}: {e})", path) from None
    return _gray(arr, path)


def _probe_bmp(path: Path, head: bytes) -> tuple[tuple[int, int], str]:
    if len(head) < 54:
        raise UserError("truncated BMP header", path)
    offset = struct.unpack_from("<I", head, 10)[0]
    w, h = struct.unpack_from("<ii", head, 18)
    bpp, comp = struct.unpack_from("<H", head, 28)[0], struct.unpack_from("<I", head, 30)[0]
    if comp == 0 and w > 0:
        stride = ((w * bpp + 31) // 32) * 4
        if path.stat().st_size < offset + stride * abs(h):
            raise UserError("truncated BMP (file shorter than its header says)", path)
    return (abs(h), w), "uint8"


def _probe_png(path: Path, head: bytes) -> tuple[tuple[int, int], str]:
    if len(head) < 26 or head[12:16] != b"IHDR":
        raise UserError("corrupt PNG header", path)
    w, h = struct.unpack_from(">II", head, 16)
    return (h, w), ("uint16" if head[24] == 16 else "uint8")


def _probe_jpeg(path: Path) -> tuple[tuple[int, int], str]:
    """Size from the first SOF marker (no decoding); 8-bit unless the precision says 12/16."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if data[:2] != b"\xff\xd8":
        raise UserError("not a JPEG file (bad signature)", path)
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = struct.unpack_from(">H", data, i + 2)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            bits, h, w = struct.unpack_from(">BHH", data, i + 4)
            return (h, w), ("uint8" if bits <= 8 else "uint16")
        i += 2 + length
    raise UserError("corrupt JPEG (no frame header)", path)


def _probe_tiff(path: Path) -> tuple[tuple[int, int], str]:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        if len(tf.pages) > 1:
            raise UserError(f"holds {len(tf.pages)} pages; expected one 2D slice per file", path)
        size = path.stat().st_size
        ends = [o + b for o, b in zip(page.dataoffsets, page.databytecounts) if b]
        if ends and max(ends) > size:
            raise UserError("truncated TIFF (image data past the end of the file)", path)
        shape = page.shape
        return (shape[0], shape[1]), str(page.dtype)


def probe_slice_file(path: Path) -> tuple[tuple[int, int], str]:
    """(y, x) and dtype name of a slice from its header only (cheap); UserError if corrupt."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            return _probe_tiff(path)
        with open(path, "rb") as f:
            head = f.read(64)
        if suffix == ".bmp":
            if head[:2] != b"BM":
                raise UserError("not a BMP file (bad signature)", path)
            return _probe_bmp(path, head)
        if suffix == ".png":
            if head[:8] != b"\x89PNG\r\n\x1a\n":
                raise UserError("not a PNG file (bad signature)", path)
            return _probe_png(path, head)
        if suffix in (".jpg", ".jpeg"):
            return _probe_jpeg(path)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or e})", path) from None
    except Exception as e:  # noqa: BLE001 - corrupt headers raise assorted errors
        raise UserError(f"corrupt image header ({type(e).__name__}: {e})", path) from None
    arr = read_slice_file(path)  # anything else: decode
    return arr.shape, str(arr.dtype)


class SliceFolderVolume(Volume):
    """A folder of 2D slice files read one file per slice (NRecon or numbered slices)."""

    def __init__(self, path: Path, files: list[Path], fmt: str, spacing_um: Spacing | None,
                 spacing_source: str, metadata: dict | None = None):
        shape2d, dtype = _check_slices(files)
        self.format = fmt
        self.files = files
        super().__init__(path, (len(files),) + shape2d, dtype, spacing_um, spacing_source,
                         metadata)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0,) + self.shape[1:], self.dtype)
        for i, f in enumerate(self.files[z0:z1]):
            arr = read_slice_file(f)
            if arr.shape != self.shape[1:]:
                raise UserError(f"slice has size {arr.shape}, the first slice {self.shape[1:]}",
                                f)
            if arr.dtype != self.dtype:
                raise UserError(f"slice is {arr.dtype}, the first slice {self.dtype}", f)
            out[i] = arr
        return out


def _check_slices(files: list[Path]) -> tuple[tuple[int, int], str]:
    """All slice headers agree on size and dtype; returns them. UserError names the odd file."""
    first_shape, first_dtype = probe_slice_file(files[0])
    for f in files[1:]:
        shape, dtype = probe_slice_file(f)
        if shape != first_shape:
            raise UserError(f"slice size {shape[1]}x{shape[0]} differs from the first slice "
                            f"{files[0].name} ({first_shape[1]}x{first_shape[0]})", f)
        if dtype != first_dtype:
            raise UserError(f"slice dtype {dtype} differs from the first slice {files[0].name} "
                            f"({first_dtype})", f)
    return tuple(first_shape), first_dtype  # type: ignore[return-value]


def _check_numbering(indexed: list[tuple[int, Path]], step: int = 1) -> None:
    """Indices must run without gaps or duplicates; UserError names the file after a gap."""
    for (i0, p0), (i1, p1) in zip(indexed, indexed[1:]):
        if i1 == i0:
            raise UserError(f"two slices share number {i1} (also {p0.name})", p1)
        if i1 - i0 != step:
            missing = i0 + step
            raise UserError(f"gap in the slice numbering: number {missing} is missing "
                            f"(previous slice {p0.name})", p1)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def numbered_slices(folder: Path) -> list[tuple[int, Path]]:
    """The largest group of ``<stem><number>.<ext>`` image files in ``folder`` (natural order).
    ``*_spr.*`` previews are skipped."""
    groups: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES or nrecon.is_preview(p.name) or \
                p.name.startswith(TMP_PREFIX) or not p.is_file():
            continue
        m = _NUMBERED.match(p.stem)
        if m:
            groups.setdefault((m.group(1), p.suffix.lower()), []).append((int(m.group(2)), p))
    if not groups:
        return []
    best = max((groups[k] for k in sorted(groups)), key=len)  # ties: first stem in order
    others = sum(len(g) for g in groups.values()) - len(best)
    if others:
        log.warning("%s: %d image files do not belong to the main numbered series; ignored",
                    folder, others)
    return sorted(best, key=lambda t: (t[0], t[1].name))


def _open_nrecon(folder: Path, log_path: Path) -> Volume:
    info = nrecon.read_log(log_path)
    indexed = nrecon.find_slices(folder, info)
    if not indexed:
        indexed = numbered_slices(folder)
        if not indexed:
            raise UserError(f"NRecon log {log_path.name} found but no slices named "
                            f"'{info.prefix or log_path.stem}{'#' * info.index_length}"
                            ".bmp/tif/png'", folder)
        log.warning("%s: no slices named after the log's prefix %r; reading the numbered "
                    "series %s... instead", folder, info.prefix, indexed[0][1].name)
    _check_numbering(indexed, 1 if _steps_are_unit(indexed) else info.section_step)
    if info.first_section is not None and indexed[0][0] != info.first_section:
        log.warning("%s: first slice %s is number %d but the log says First Section=%d",
                    folder, indexed[0][1].name, indexed[0][0], info.first_section)
    for note in info.notes:
        log.warning("%s: %s", log_path, note)
    if info.spacing_um is None:
        log.warning("%s: no pixel size in the NRecon log; voxel size unknown (use --spacing-um)",
                    log_path)
    vol = SliceFolderVolume(folder, [p for _, p in indexed], "nrecon", info.spacing_um,
                            "nrecon-log", _nrecon_meta(info, indexed))
    rec = info.sections.get("Reconstruction", {})
    logged = (rec.get("Result Image Height (pixels)"), rec.get("Result Image Width (pixels)"))
    if all(v and v.strip().isdigit() for v in logged) and \
            tuple(int(v) for v in logged) != vol.shape[1:]:  # type: ignore[union-attr]
        log.warning("%s: slices are %dx%d but the log says %sx%s", folder, vol.shape[2],
                    vol.shape[1], logged[1], logged[0])
    return vol


def _nrecon_meta(info: nrecon.NReconLog, indexed: list[tuple[int, Path]]) -> dict:
    return {"nrecon_log": str(info.path), "log": info.sections,
            "first_index": indexed[0][0], "prefix": info.prefix,
            "undersampling": info.undersampling, "projection_pixel_um": info.projection_pixel_um}


def _steps_are_unit(indexed: list[tuple[int, Path]]) -> bool:
    return len(indexed) < 2 or indexed[1][0] - indexed[0][0] == 1


def _open_folder(folder: Path) -> Volume:
    entries = [p for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)]
    if not entries:
        raise UserError("empty folder", folder)
    log_path = nrecon.find_log(folder)
    if log_path is not None:
        return _open_nrecon(folder, log_path)
    indexed = numbered_slices(folder)
    if indexed:
        _check_numbering(indexed)
        return SliceFolderVolume(folder, [p for _, p in indexed], "slices", None, "unknown",
                                 {"first_index": indexed[0][0]})
    dicom = _dicom_files(folder)
    if dicom:
        return DicomSeriesVolume(folder, dicom)
    raise UserError("no recognisable slices (expected an NRecon folder, numbered "
                    "TIFF/PNG/BMP slices or a DICOM series)", folder)


# --------------------------------------------------------------------------------------------
# TIFF stacks
# --------------------------------------------------------------------------------------------

class TiffVolume(Volume):
    """A multi-page, ImageJ or OME TIFF; contiguous uncompressed data is read by offset."""

    def __init__(self, path: Path):
        import tifffile

        try:
            with _TifffileErrors() as errors:
                self._tf = tifffile.TiffFile(path)
                series = self._tf.series[0]
        except Exception as e:  # noqa: BLE001
            raise UserError(f"not a readable TIFF ({type(e).__name__}: {e})", path) from None
        self._raw = None
        try:
            if errors.messages:
                raise UserError(f"corrupt or truncated TIFF ({errors.messages[0]})", path)
            self._page_stack = self._series_are_pages(self._tf, path)
            self.format = "ome-tiff" if self._tf.is_ome else "tiff"
            self._series = series
            shape, self._rgb = self._shape(series, path)
            if self._page_stack:
                shape = (len(self._tf.series),) + shape[1:]
            self._open_raw(series, path)
            spacing, source = _tiff_spacing(self._tf, path)
            meta = {"axes": series.axes, "imagej": self._tf.imagej_metadata or {},
                    "bigtiff": self._tf.is_bigtiff}
            super().__init__(path, shape, series.dtype, spacing, source, meta)
            self._check_truncated(path)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _series_are_pages(tf: Any, path: Path) -> bool:
        """True when tifffile split a plain multi-page TIFF into one-page series of equal shape
        (one write per page): read them as one stack. Pages that differ in size or type are
        not one volume: UserError."""
        if len(tf.series) < 2 or tf.is_ome or tf.is_imagej:
            return False
        first = tf.series[0]
        for odd in tf.series[1:]:
            if odd.shape != first.shape or odd.dtype != first.dtype or len(odd.pages) != 1:
                raise UserError(f"pages of different sizes or types: {first.shape} "
                                f"{first.dtype} then {odd.shape} {odd.dtype}; expected one "
                                "stack", path)
        return len(first.pages) == 1

    @staticmethod
    def _shape(series: Any, path: Path) -> tuple[tuple[int, int, int], bool]:
        axes, shape = series.axes, series.shape
        if "S" in axes[:-1] and shape[axes.index("S")] != 1:
            raise UserError(f"planar colour TIFF (axes {axes}); expected grayscale", path)
        rgb = axes.endswith("S") and shape[-1] in (3, 4)
        core = shape[:-1] if axes.endswith("S") else shape
        if axes.endswith("S") and not rgb and shape[-1] != 1:
            raise UserError(f"{shape[-1]} samples per pixel; expected grayscale", path)
        lead = [n for n in core[:-2] if n != 1]
        if len(lead) > 1:
            raise UserError(f"TIFF has axes {axes} {shape}: more than one non-spatial "
                            "dimension (channels/time); expected one 3D grayscale stack", path)
        z = lead[0] if lead else 1
        return (z, core[-2], core[-1]), rgb

    def _open_raw(self, series: Any, path: Path) -> None:
        """Uncompressed contiguous data: read slices straight from the file by offset (no
        memory map, so the resident set does not grow with the pages read)."""
        self._raw = None
        if self._page_stack or self._rgb or series.dataoffset is None:
            return
        self._raw_dtype = np.dtype(series.dtype).newbyteorder(self._tf.byteorder)
        self._raw_offset = int(series.dataoffset)
        self._raw_lock = threading.Lock()
        self._raw = open(path, "rb")

    def _read_raw(self, z0: int, z1: int) -> np.ndarray:
        ny, nx = self.shape[1:]
        nbytes = (z1 - z0) * ny * nx * self._raw_dtype.itemsize
        buf = bytearray(nbytes)  # writable: callers may modify what they get
        with self._raw_lock:
            self._raw.seek(self._raw_offset + z0 * ny * nx * self._raw_dtype.itemsize)
            got = self._raw.readinto(buf)
        if got != nbytes:
            raise UserError(f"truncated TIFF (slices {z0}..{z1 - 1} past the end)", self.path)
        data = np.frombuffer(buf, self._raw_dtype).reshape((z1 - z0, ny, nx))
        return data if data.dtype.isnative else data.astype(self.dtype.newbyteorder("="))

    def _check_truncated(self, path: Path) -> None:
        size = path.stat().st_size
        if self._raw is not None:
            end = self._raw_offset + int(np.prod(self.shape)) * self.dtype.itemsize
        else:
            pages = self._tf.pages if self._page_stack else self._series.pages
            page = pages[len(pages) - 1] if len(pages) else None
            offs = getattr(page, "dataoffsets", ()) or ()
            cnts = getattr(page, "databytecounts", ()) or ()
            end = max((o + c for o, c in zip(offs, cnts)), default=0)
        if end > size:
            raise UserError("truncated TIFF (image data past the end of the file)", path)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        ny, nx = self.shape[1:]
        if self._raw is not None:
            return self._read_raw(z0, z1)
        try:
            with _TifffileErrors() as errors:
                if self._page_stack:
                    data = self._tf.asarray(key=range(z0, z1))
                else:
                    data = self._tf.asarray(key=range(z0, z1), series=0)
        except Exception as e:  # noqa: BLE001 - corrupt strips
            raise UserError(f"cannot read pages {z0}..{z1 - 1} ({type(e).__name__}: {e})",
                            self.path) from None
        if errors.messages:
            raise UserError(f"corrupt pages {z0}..{z1 - 1} ({errors.messages[0]})", self.path)
        if self._rgb:
            data = data.reshape((-1, ny, nx, data.shape[-1]))
            return np.stack([_gray(s, self.path) for s in data])
        return np.asarray(data).reshape((z1 - z0, ny, nx))

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self._tf.close()


class _TifffileErrors(logging.Handler):
    """Collects what tifffile logs at ERROR level (it logs, rather than raises, on corrupt or
    truncated files) and keeps it off the console while active."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []
        self._logger = logging.getLogger("tifffile")

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.messages.append(msg.split("> ", 1)[-1].strip() if "> " in msg else msg.strip())

    def __enter__(self) -> "_TifffileErrors":
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


def _tiff_spacing(tf: Any, path: Path) -> tuple[Spacing | None, str]:
    """Spacing from OME PhysicalSize, ImageJ spacing/unit + resolution, or the resolution tags."""
    if tf.is_ome and tf.ome_metadata:
        sp = _ome_spacing(tf.ome_metadata)
        if sp is not None:
            return sp, "tiff-ome"
    page = tf.pages.first
    xy = _resolution_um(page, per_unit_um=None)
    ij = tf.imagej_metadata
    if ij:
        unit_um = _unit_um(ij.get("unit"))
        xy_px = _resolution_um(page, per_unit_um=1.0)
        if unit_um is not None and xy_px is not None:
            x, y = xy_px[0] * unit_um, xy_px[1] * unit_um
            z = float(ij["spacing"]) * unit_um if ij.get("spacing") else x
            return (z, y, x), "tiff-imagej"
    if xy is not None:
        return (xy[0], xy[1], xy[0]), "tiff-resolution"
    return None, "unknown"


def _resolution_um(page: Any, per_unit_um: float | None) -> tuple[float, float] | None:
    """(x, y) pixel size from X/YResolution. With ``per_unit_um`` the unit is given (ImageJ);
    otherwise the ResolutionUnit tag must be inch or cm and the value not a screen-DPI default."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    xr, yr = (_rational(tags[k].value) for k in ("XResolution", "YResolution"))
    if not xr or not yr:
        return None
    if per_unit_um is None:
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        if unit == 3:
            per_unit_um = 1e4
        elif unit == 2 and xr not in (1, 72, 96, 150, 300, 600, 1200):
            per_unit_um = 25400.0
        else:
            return None
    return per_unit_um / xr, per_unit_um / yr


def _rational(v: Any) -> float:
    if isinstance(v, tuple):
        return v[0] / v[1] if v[1] else 0.0
    return float(v)


def _ome_spacing(xml: str) -> Spacing | None:
    """PhysicalSizeZ/Y/X of the first OME Pixels element, in um (default unit um)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    out = []
    for axis in "ZYX":
        v = pixels.get(f"PhysicalSize{axis}")
        scale = _unit_um(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if v is None or scale is None:
            out.append(None)
        else:
            out.append(float(v) * scale)
    if out[1] is None or out[2] is None:
        return None
    return (out[0] if out[0] is not None else out[2], out[1], out[2])


# --------------------------------------------------------------------------------------------
# SimpleITK formats
# --------------------------------------------------------------------------------------------

def _sitk_dtype(reader: Any) -> np.dtype:
    import SimpleITK as sitk

    table = {sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16,
             sitk.sitkInt16: np.int16, sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32,
             sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64, sitk.sitkFloat32: np.float32,
             sitk.sitkFloat64: np.float64}
    pid = reader.GetPixelID()
    if pid not in table:
        raise UserError(f"unsupported pixel type {reader.GetPixelIDTypeAsString()} "
                        "(expected a scalar grayscale image)", reader.GetFileName())
    return np.dtype(table[pid])


class SitkVolume(Volume):
    """NIfTI / MHA / MHD / NRRD / single DICOM via SimpleITK; loaded whole on first read."""

    format = "sitk"

    def __init__(self, path: Path):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
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
        dtype = _sitk_dtype(reader)
        spacing = _sitk_spacing(path, reader.GetSpacing())
        self._reader = reader
        self._array: np.ndarray | None = None
        meta = {"origin_mm": reader.GetOrigin(), "direction": reader.GetDirection()}
        super().__init__(path, (size[2], size[1], size[0]), dtype, spacing, "sitk-header", meta)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self._array is None:
            import SimpleITK as sitk

            if self.path.name.lower().endswith((".nii", ".nii.gz")):
                _check_nifti_complete(self.path, int(np.prod(self.shape)) * self.dtype.itemsize)
            try:
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


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "rror" in ln or "annot" in ln), lines[0] if lines else "")
    return msg[:200]


def _sitk_spacing(path: Path, spacing_mm: tuple[float, ...]) -> Spacing | None:
    """(z, y, x) um from the header; None when the header has no spacing field (NRRD without
    ``spacings``/``space directions``, MHA without ElementSpacing) or NIfTI's 1 mm default."""
    sp = list(spacing_mm) + [1.0] * (3 - len(spacing_mm))
    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
            head = path.read_bytes()[:65536].decode("latin-1", errors="replace").lower()
            keys = ("spacings:", "space directions:") if "nrrd" in name or "nhdr" in name \
                else ("elementspacing", "elementsize")
            if not any(k in head for k in keys):
                return None
        elif name.endswith((".nii", ".nii.gz")) and all(abs(v - 1.0) < 1e-12 for v in sp):
            return None
    except OSError:
        return None
    if name.endswith((".nii", ".nii.gz")):  # float32 in the header: drop the float noise
        sp = [float(str(np.float32(v))) for v in sp]
    return (_um(sp[2]), _um(sp[1]), _um(sp[0]))


def _um(mm: float) -> float:
    """mm -> um, rounded to 10 significant digits (no 7.000000000000001)."""
    return float(f"{mm * 1000.0:.10g}")


def _dicom_files(folder: Path) -> list[Path]:
    """Files of the largest DICOM series in ``folder`` (sorted by position), or []."""
    import SimpleITK as sitk

    candidates = [p for p in folder.iterdir() if p.is_file() and
                  (p.suffix.lower() in (".dcm", ".ima", "") or _is_dicom(p))]
    if not candidates:
        return []
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        return []
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i) for i in ids]
    best = max(series, key=len)
    if len(series) > 1:
        log.warning("%s: %d DICOM series; reading the largest (%d files)", folder, len(series),
                    len(best))
    return [Path(f) for f in best]


def _is_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


class DicomSeriesVolume(Volume):
    """A DICOM series folder read one file per slice through SimpleITK."""

    format = "sitk"

    def __init__(self, folder: Path, files: list[Path]):
        import SimpleITK as sitk

        self.files = files
        try:
            first = sitk.ReadImage(str(files[0]))
        except RuntimeError as e:
            raise UserError(f"unreadable DICOM ({_first_line(e)})", files[0]) from None
        arr = sitk.GetArrayFromImage(first)
        sx, sy = first.GetSpacing()[:2]
        sz = first.GetSpacing()[2] if first.GetDimension() > 2 else sx
        if len(files) > 1:
            o0 = np.array(first.GetOrigin())
            o1 = np.array(sitk.ReadImage(str(files[1])).GetOrigin())
            dz = float(np.linalg.norm(o1 - o0))
            sz = dz if dz > 0 else sz
        spacing = (sz * 1000.0, sy * 1000.0, sx * 1000.0)
        super().__init__(folder, (len(files),) + arr.shape[-2:], arr.dtype, spacing,
                         "sitk-header", {"files": len(files)})

    def _read(self, z0: int, z1: int) -> np.ndarray:
        import SimpleITK as sitk

        out = np.empty((z1 - z0,) + self.shape[1:], self.dtype)
        for i, f in enumerate(self.files[z0:z1]):
            try:
                arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            except RuntimeError as e:
                raise UserError(f"unreadable DICOM ({_first_line(e)})", f) from None
            out[i] = arr.reshape(self.shape[1:]).astype(self.dtype, copy=False)
        return out


# --------------------------------------------------------------------------------------------
# open_volume
# --------------------------------------------------------------------------------------------

def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def open_volume(path: str | Path, spacing_um: Spacing | None = None) -> Volume:
    """Open any supported volume lazily. ``spacing_um`` (z, y, x) overrides the file's.

    Raises :class:`UserError` naming the file for missing, empty, corrupt or inconsistent input.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("no such file or folder", path)
    if path.is_dir():
        vol = _open_folder(path)
    elif path.suffix.lower() == ".log":
        vol = _open_nrecon(path.parent, path)
    elif path.stat().st_size == 0:
        raise UserError("empty file", path)
    elif _has_suffix(path, TIFF_SUFFIXES):
        vol = TiffVolume(path)
    elif _has_suffix(path, SITK_SUFFIXES):
        if path.name.lower().endswith(".nii.gz") and path.with_name(path.name[:-3]).exists():
            log.warning("%s: %s exists beside it; the NIfTI library may read that one instead",
                        path, path.name[:-3])
        vol = SitkVolume(path)
    elif _has_suffix(path, IMAGE_SUFFIXES):
        vol = SliceFolderVolume(path, [path], "slices", None, "unknown")
    else:
        raise UserError("unsupported file type (expected a folder of slices, TIFF, NIfTI, "
                        "MHA/MHD, NRRD or DICOM)", path)
    if spacing_um is not None:
        vol.spacing_um = tuple(float(s) for s in spacing_um)  # type: ignore[assignment]
        vol.spacing_source = "user"
    elif vol.spacing_um is None and vol.format != "nrecon":  # NRecon warned about its log
        what = "slices without metadata" if vol.format == "slices" else "no voxel size in the file"
        log.warning("%s: %s; spacing unknown (use --spacing-um)", path, what)
    return vol


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

_ACTIVE: set["VolumeWriter"] = set()
_PREV_SIGTERM: Any = None


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM while writing: raise so context managers abort and remove temporary output."""
    raise SystemExit(128 + signum)


def _register(writer: "VolumeWriter") -> None:
    global _PREV_SIGTERM
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        try:
            _PREV_SIGTERM = signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):
            _PREV_SIGTERM = None
    _ACTIVE.add(writer)


def _unregister(writer: "VolumeWriter") -> None:
    global _PREV_SIGTERM
    _ACTIVE.discard(writer)
    if not _ACTIVE and _PREV_SIGTERM is not None and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _PREV_SIGTERM)
        _PREV_SIGTERM = None


class VolumeWriter:
    """Appends slices in order under a temporary name; ``close()`` renames into place."""

    kind = "abstract"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, overwrite: bool):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.spacing_um = None if spacing_um is None else tuple(float(s) for s in spacing_um)
        self.overwrite = overwrite
        self.count = 0
        self.closed = False
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be (z, y, x) with positive sizes, got {shape}")
        _check_target(self.path, overwrite, folder=self.kind == "nrecon")
        self.tmp = self.path.parent / f"{TMP_PREFIX}{os.getpid()}-{self.path.name}"
        _remove(self.tmp)
        _remove_stale(self.path)
        _register(self)
        try:
            self._open()
        except BaseException:
            self.abort()
            raise

    # subclasses: _open(), _write(block), _finish(), _cleanup()
    def _open(self) -> None:
        """Create the temporary output."""
    def write(self, slices: np.ndarray) -> None:
        """Append one (y, x) slice or a (n, y, x) block; converted with :func:`to_dtype`."""
        if self.closed:
            raise RuntimeError(f"writer for {self.path} is closed")
        block = np.asarray(slices)
        if block.ndim == 2:
            block = block[None]
        if block.ndim != 3 or block.shape[1:] != self.shape[1:]:
            raise ValueError(f"slices of shape {block.shape} do not fit volume {self.shape}")
        if self.count + block.shape[0] > self.shape[0]:
            raise ValueError(f"too many slices for {self.path}: {self.count + block.shape[0]} "
                             f"> {self.shape[0]}")
        try:
            self._write(to_dtype(block, self.dtype))
        except BaseException:
            self.abort()
            raise
        self.count += block.shape[0]

    def close(self) -> None:
        """Finish the file, check the slice count and rename into place."""
        if self.closed:
            return
        if self.count != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: wrote {self.count} of {self.shape[0]} slices")
        try:
            self._finish()
            _check_target(self.path, self.overwrite, folder=self.kind == "nrecon")
            _move_into_place(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        _unregister(self)

    def abort(self) -> None:
        """Discard the temporary output; the final name is left untouched."""
        if self.closed:
            return
        self.closed = True
        try:
            self._cleanup()
        finally:
            _remove(self.tmp)
            _unregister(self)

    def _write(self, block: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self) -> None:
        pass

    def _cleanup(self) -> None:
        pass

    def __enter__(self) -> "VolumeWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_target(path: Path, overwrite: bool, folder: bool) -> None:
    """UserError unless ``path`` may be (re)written."""
    if not path.parent.is_dir():
        raise UserError("the output's parent folder does not exist", path.parent)
    if not path.exists():
        return
    if not overwrite:
        raise UserError("already exists; pass --overwrite to replace it", path)
    if path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(f"exists and is {kind}; refusing to replace it", path)
    if folder:
        _check_replaceable_folder(path)


_REPLACEABLE = set(IMAGE_SUFFIXES) | {".log", ".json", ".csv", ".txt", ".png"}


def _check_replaceable_folder(path: Path) -> None:
    """Only replace folders that look like volume output (slices, logs, json)."""
    for p in path.iterdir():
        if p.is_dir() or p.suffix.lower() not in _REPLACEABLE:
            raise UserError(f"refusing to replace the folder: it holds {p.name!r}, which this "
                            "tool does not write", path)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _remove_stale(final: Path) -> None:
    """Remove temporary outputs for ``final`` left by killed processes (SIGKILL, power loss)."""
    pat = re.compile(rf"^{re.escape(TMP_PREFIX)}(?:old-)?(\d+)-{re.escape(final.name)}$")
    for p in final.parent.iterdir():
        m = pat.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            log.info("removing %s left by an interrupted run", p)
            _remove(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing folder is swapped out first, then removed."""
    if tmp.is_dir() and final.is_dir():
        old = final.parent / f"{TMP_PREFIX}old-{os.getpid()}-{final.name}"
        _remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class TiffVolumeWriter(VolumeWriter):
    """ImageJ hyperstack TIFF (spacing + unit um, X/YResolution in px/um), or BigTIFF with
    OME-XML PhysicalSize in um when forced (``.ome.tif``) or above :data:`BIGTIFF_THRESHOLD`.
    The header is written first with the final shape; slices are then written in place."""

    kind = "tiff"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, overwrite: bool, ome: bool = False,
                 description: str | None = None):
        self.ome, self.description = ome, description
        self._fh: Any = None
        super().__init__(path, shape, dtype, spacing_um, overwrite)

    def _open(self) -> None:
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.bigtiff = nbytes > BIGTIFF_THRESHOLD
        asked_ome = self.ome
        self.ome = asked_ome or self.bigtiff or self.dtype.name not in IMAGEJ_DTYPES
        if self.bigtiff and not asked_ome:
            log.warning("%s: %.1f GiB is too large for an ImageJ TIFF; writing BigTIFF with "
                        "OME-XML voxel size instead", self.path, nbytes / 2**30)
        elif self.ome and not asked_ome:
            log.warning("%s: ImageJ TIFF cannot hold %s; writing OME-TIFF instead", self.path,
                        self.dtype)
        self._offset = self._write_header(self.description)
        self._fh = open(self.tmp, "r+b")

    def _write_header(self, description: str | None) -> int:
        import tifffile

        kw: dict[str, Any] = {}
        if self.ome:
            md: dict[str, Any] = {"axes": "ZYX"}
            if self.spacing_um:
                for axis, v in zip("ZYX", self.spacing_um):
                    md[f"PhysicalSize{axis}"] = v
                    md[f"PhysicalSize{axis}Unit"] = "µm"
                kw = {"resolution": (1e4 / self.spacing_um[2], 1e4 / self.spacing_um[1]),
                      "resolutionunit": "CENTIMETER"}
            if description:
                md["Description"] = description
        else:
            md = {"axes": "ZYX"}
            if self.spacing_um:
                md.update(spacing=self.spacing_um[0], unit="um")
                kw = {"resolution": (1 / self.spacing_um[2], 1 / self.spacing_um[1])}
            if description:
                md["Info"] = description
        with tifffile.TiffWriter(self.tmp, bigtiff=self.bigtiff, imagej=not self.ome,
                                 ome=self.ome) as tw:
            offset, _ = tw.write(None, shape=self.shape, dtype=self.dtype, returnoffset=True,
                                 photometric="minisblack", metadata=md, **kw)
        return int(offset)

    def _write(self, block: np.ndarray) -> None:
        slice_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self._fh.seek(self._offset + self.count * slice_bytes)
        self._fh.write(np.ascontiguousarray(block, self.dtype.newbyteorder("<")).tobytes())

    def _finish(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def _cleanup(self) -> None:
        if self._fh is not None:
            self._fh.close()


class NReconWriter(VolumeWriter):
    """NRecon-style folder: ``<prefix>rec00000000.bmp`` (uint8) or ``.tif`` (other dtypes),
    ``<prefix>rec.log`` with the pixel size; ``nrecon_log`` adds/overrides log entries."""

    kind = "nrecon"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, overwrite: bool, prefix: str | None = None,
                 log_extra: dict | None = None):
        self.prefix = (prefix if prefix is not None else f"{Path(path).name}_") + "rec"
        self.ext = ".bmp" if np.dtype(dtype) == np.uint8 else ".tif"
        self.log_extra = log_extra
        super().__init__(path, shape, dtype, spacing_um, overwrite)

    def _open(self) -> None:
        self.tmp.mkdir()

    def slice_name(self, z: int) -> str:
        return f"{self.prefix}{z:0{nrecon.INDEX_LENGTH}d}{self.ext}"

    def _write(self, block: np.ndarray) -> None:
        for i, s in enumerate(block):
            target = self.tmp / self.slice_name(self.count + i)
            if self.ext == ".bmp":
                import cv2

                ok, buf = cv2.imencode(".bmp", s)
                if not ok:
                    raise OSError(f"cannot encode BMP slice {target}")
                buf.tofile(target)
            else:
                import tifffile

                md = {"spacing": self.spacing_um[0], "unit": "um"} if self.spacing_um else {}
                res = (1 / self.spacing_um[2], 1 / self.spacing_um[1]) if self.spacing_um \
                    else None
                imagej = self.dtype.name in IMAGEJ_DTYPES
                tifffile.imwrite(target, s, photometric="minisblack", imagej=imagej,
                                 resolution=res if imagej else None,
                                 metadata=md if imagej else None)

    def add_file(self, name: str, data: bytes | str) -> None:
        """Put an extra file (e.g. ``simulation.json``) into the folder; it appears with the
        slices at the atomic rename. Only folder writers have this method."""
        if self.closed:
            raise RuntimeError(f"writer for {self.path} is closed")
        payload = data.encode() if isinstance(data, str) else data
        (self.tmp / name).write_bytes(payload)

    def _finish(self) -> None:
        from . import __version__

        base = nrecon.default_log(self.shape, self.spacing_um, self.prefix,
                                  self.ext.lstrip("."), __version__)
        sections = nrecon.merge_sections(base, self.log_extra)
        (self.tmp / f"{self.prefix}.log").write_bytes(nrecon.format_log(sections))


class SitkWriter(VolumeWriter):
    """NIfTI / MHA / NRRD through SimpleITK (spacing in mm). Buffers the whole volume in memory
    until ``close()``: SimpleITK cannot write slice by slice."""

    kind = "sitk"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, overwrite: bool):
        self._buf: np.ndarray | None = None
        super().__init__(path, shape, dtype, spacing_um, overwrite)

    def _open(self) -> None:
        self._buf = np.empty(self.shape, self.dtype)

    def _write(self, block: np.ndarray) -> None:
        assert self._buf is not None
        self._buf[self.count:self.count + block.shape[0]] = block

    def _finish(self) -> None:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self._buf)
        if self.spacing_um:
            img.SetSpacing([v / 1000.0 for v in self.spacing_um[::-1]])
        compress = self.path.name.lower().endswith((".gz", ".nrrd", ".mha"))
        try:
            sitk.WriteImage(img, str(self.tmp), useCompression=compress)
        except RuntimeError as e:
            raise OSError(f"SimpleITK could not write {self.path}: {_first_line(e)}") from None
        self._buf = None

    def _cleanup(self) -> None:
        self._buf = None


def output_kind(path: Path, nrecon_prefix: str | None = None) -> str:
    """``"ome"``, ``"tiff"``, ``"sitk"`` or ``"nrecon"`` from the output path."""
    name = path.name.lower()
    if nrecon_prefix is not None:
        return "nrecon"
    if name.endswith(OME_SUFFIXES):
        return "ome"
    if name.endswith((".tif", ".tiff", ".btf")):
        return "tiff"
    if name.endswith(SITK_WRITE_SUFFIXES):
        return "sitk"
    if path.suffix == "" or path.is_dir():
        return "nrecon"
    raise UserError("unsupported output format (use a folder name for NRecon slices, .tif, "
                    ".ome.tif, .nii, .nii.gz, .mha or .nrrd)", path)


def create_volume_writer(path: str | Path, shape: tuple[int, int, int], dtype: Any,
                         spacing_um: Spacing | None, *, overwrite: bool = False,
                         nrecon_prefix: str | None = None, nrecon_log: dict | None = None,
                         description: str | None = None) -> VolumeWriter:
    """A slice-by-slice writer for ``path`` (format from the suffix; see the module docs).

    Raises :class:`UserError` when ``path`` exists and ``overwrite`` is False, or its folder
    does not exist.
    """
    path = Path(path)
    kind = output_kind(path, nrecon_prefix)
    if kind == "nrecon":
        return NReconWriter(path, shape, dtype, spacing_um, overwrite, nrecon_prefix,
                            nrecon_log)
    if kind in ("tiff", "ome"):
        return TiffVolumeWriter(path, shape, dtype, spacing_um, overwrite, ome=kind == "ome",
                          description=description)
    return SitkWriter(path, shape, dtype, spacing_um, overwrite)


def write_volume(path: str | Path, array: np.ndarray, spacing_um: Spacing | None,
                 **kw: Any) -> Path:
    """Write a whole (z, y, x) array (2D is one slice) atomically; returns the path."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    with create_volume_writer(path, array.shape, array.dtype, spacing_um, **kw) as w:
        step = max(1, (64 << 20) // max(1, array[0].nbytes))
        for z in range(0, array.shape[0], step):
            w.write(array[z:z + step])
    return Path(path)


def describe(vol: Volume, samples: int = 3) -> dict:
    """What ``microct-sr info`` prints: path, format, shape, dtype, spacing and its source, and
    the value range over ``samples`` evenly spaced slices (first, middle, last)."""
    n = len(vol)
    zs = sorted({round(i * (n - 1) / max(1, samples - 1)) for i in range(samples)})
    lo = hi = None
    for z in zs:
        s = vol[z]
        lo = s.min() if lo is None else min(lo, s.min())
        hi = s.max() if hi is None else max(hi, s.max())
    cast = float if vol.dtype.kind == "f" else int
    return {"path": str(vol.path), "format": vol.format, "shape": list(vol.shape),
            "dtype": vol.dtype.name,
            "spacing_um": None if vol.spacing_um is None else list(vol.spacing_um),
            "spacing_source": vol.spacing_source,
            "value_range": [cast(lo), cast(hi)], "value_range_slices": zs}
