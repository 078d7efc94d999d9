"""TIFF stacks: :class:`TiffVolume` (multi-page, ImageJ and OME), voxel size from OME
PhysicalSize / ImageJ spacing+unit / resolution tags, and :class:`TiffVolumeWriter`
(ImageJ hyperstack, or BigTIFF + OME-XML above :data:`BIGTIFF_THRESHOLD`)."""

from __future__ import annotations

import logging
import os
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .base import IMAGEJ_DTYPES, Spacing, Volume
from .slices import _gray
from .writer import VolumeWriter, float16_as_float32

log = logging.getLogger(__name__)

# Above this many bytes an ImageJ (classic) TIFF cannot hold the data: write BigTIFF + OME.
# Module constant so tests can lower it instead of writing 4 GiB.
BIGTIFF_THRESHOLD = 2**32 - 2**25
# Length of one unit in micrometres (ImageJ 'unit', OME PhysicalSizeUnit).
_UNIT_UM = {"um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0,
            "micrometer": 1.0, "micrometre": 1.0, "\\u00b5m": 1.0, "nm": 1e-3,
            "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
            "m": 1e6, "meter": 1e6, "inch": 25400.0, "in": 25400.0}


def _unit_um(unit: Any) -> float | None:
    """Micrometres per ``unit`` (ImageJ/OME spelling), None when unknown."""
    if unit is None:
        return None
    u = str(unit).strip().lower().replace("\\u00b5", "µ")
    return _UNIT_UM.get(u)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

class TiffVolume(Volume):
    """A multi-page, ImageJ or OME TIFF; contiguous uncompressed data is read by offset."""

    def __init__(self, path: Path):
        import tifffile

        try:
            with _TifffileErrors() as errors:
                self._tf = _open_tiff(path)
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


def _open_tiff(path: Path) -> Any:
    """``tifffile.TiffFile(path)``; a stack written one 2D page per ``write`` call (one tifffile
    "shaped" series per page) whose pages all have one shape and dtype is opened without the
    shaped metadata, as one stack: tifffile compares such series pairwise as pyramid levels, so
    opening took time quadratic in the page count (0.45 s for 1000 pages, 4.1 s for 4000; the
    check of every page here is linear). Other files open as they are."""
    import tifffile

    tf = tifffile.TiffFile(path)
    first = tf.pages.first
    if tf.is_ome or tf.is_imagej or not first.is_shaped or len(tf.pages) < 2:
        return tf
    try:
        shape = tifffile.tifffile.shaped_description_metadata(first.shaped_description)["shape"]
    except (ValueError, KeyError, TypeError, AttributeError):  # AttributeError: a tifffile
        return tf                                               # without this helper
    if tuple(shape) != first.shape:  # one series spans several pages: keep it
        return tf
    tf.close()
    tf = tifffile.TiffFile(path, is_shaped=False)
    if len({(p.shape, p.dtype) for p in tf.pages}) == 1:
        return tf
    tf.close()  # pages differ: the shaped series name them (TiffVolume refuses the file)
    return tifffile.TiffFile(path)


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
# Writing
# --------------------------------------------------------------------------------------------

def _resolution_tags(path: Path, x: float, y: float, unit: str | None = None) -> dict:
    """tifffile's resolution keywords, or none when a value does not fit a TIFF rational
    (32-bit numerator and denominator: voxel sizes far outside micro-CT's), with a warning."""
    limit = 2.0**32 - 1
    if not all(1 / limit <= v <= limit for v in (x, y)):
        log.warning("%s: pixels per unit %g x %g do not fit the TIFF resolution tags; left "
                    "out", path, x, y)
        return {}
    return {"resolution": (x, y), **({"resolutionunit": unit} if unit else {})}


class TiffVolumeWriter(VolumeWriter):
    """ImageJ hyperstack TIFF (spacing + unit um, X/YResolution in px/um, min/max for 16-bit and
    float), or BigTIFF with OME-XML PhysicalSize in um when forced (``.ome.tif``) or above
    :data:`BIGTIFF_THRESHOLD`.
    The header is written first with the final shape; slices are then written in place."""

    kind = "tiff"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, overwrite: bool, ome: bool = False,
                 description: str | None = None):
        self.ome, self.description = ome, description
        self._fh: Any = None
        dt = np.dtype(dtype)
        if dt.kind in "iu" and dt.itemsize == 8:  # neither ImageJ nor OME pixel types
            raise UserError(f"TIFF (ImageJ or OME) cannot hold {dt} voxels; write .nrrd, .mha "
                            "or .nii.gz, which keep them", path)
        super().__init__(path, shape, float16_as_float32(path, dt, "TIFF (ImageJ or OME)"),
                         spacing_um, overwrite)

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
        # Fiji takes a 16-bit/float stack's display range from min/max in the description,
        # else from the first slice alone (saturating the rest): track the whole volume's
        self._range: list[float] | None = None
        self._track_range = not self.ome and self.dtype.name in ("uint16", "int16", "float32")

    def _write_header(self, description: str | None) -> int:
        import tifffile

        kw: dict[str, Any] = {}
        if self.ome:
            md: dict[str, Any] = {"axes": "ZYX"}
            if self.spacing_um:
                for axis, v in zip("ZYX", self.spacing_um):
                    md[f"PhysicalSize{axis}"] = v
                    md[f"PhysicalSize{axis}Unit"] = "µm"
                kw = _resolution_tags(self.path, 1e4 / self.spacing_um[2],
                                      1e4 / self.spacing_um[1], "CENTIMETER")
            if description:
                md["Description"] = description
        else:
            md = {"axes": "ZYX"}
            if self.spacing_um:
                md.update(spacing=self.spacing_um[0], unit="um")
                kw = _resolution_tags(self.path, 1 / self.spacing_um[2], 1 / self.spacing_um[1])
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
        if self._track_range:
            values = block[np.isfinite(block)] if block.dtype.kind == "f" else block
            if values.size:
                lo, hi = float(values.min()), float(values.max())
                self._range = [lo, hi] if self._range is None else \
                    [min(lo, self._range[0]), max(hi, self._range[1])]

    def _finish(self) -> None:
        self._fh.flush()
        if self._range is not None and self._range[0] < self._range[1]:
            self._write_display_range(*self._range)
        os.fsync(self._fh.fileno())
        self._fh.close()

    def _write_display_range(self, lo: float, hi: float) -> None:
        """Add ImageJ's ``min``/``max`` (the display range Fiji opens with) to the description.
        ImageJ reads int16 as unsigned values shifted by 32768, and so are its min/max."""
        import tifffile

        shift = 32768.0 if self.dtype == np.int16 else 0.0
        desc = tifffile.tiffcomment(self.tmp)
        desc = (desc.decode("ascii") if isinstance(desc, bytes) else desc).rstrip("\0\n")
        tifffile.tiffcomment(self.tmp, comment=f"{desc}\nmin={lo + shift!r}\nmax={hi + shift!r}\n")

    def _cleanup(self) -> None:
        if self._fh is not None:
            self._fh.close()
