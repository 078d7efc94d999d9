"""Volume I/O: lazy readers for every scanner output we accept, and atomic slice-by-slice writers.

Arrays are (z, y, x); ``spacing_um`` is (z, y, x) in micrometres (mm only at SimpleITK).
Readers never load more than the slices asked for, except the SimpleITK file formats
(NIfTI, MHA/MHD, NRRD), which are loaded whole on first access. Writers write under a temporary
name in the target folder (``.microct-sr-tmp-<pid>-<name>``) and rename on success; the
SimpleITK writers buffer the whole volume in memory until ``close()``.

Where things live (everything below is importable from ``microct_sr.volume``):

- ``__init__.py``: :func:`open_volume` (dispatch by path), :func:`output_kind`,
  :func:`create_volume_writer`, :func:`write_volume`, :func:`describe`.
- ``base.py``: ``Spacing``, suffix tuples, ``TMP_PREFIX``, :func:`to_dtype`, :class:`Volume`.
- ``slices.py``: 2D slice files (BMP/PNG/JPEG/TIFF), :class:`SliceFolderVolume`, numbered
  series, NRecon folders and :class:`NReconWriter`, the folder dispatch.
- ``tiff.py``: :class:`TiffVolume`, TIFF/OME spacing, :class:`TiffVolumeWriter`,
  ``BIGTIFF_THRESHOLD`` (patch it as ``microct_sr.volume.tiff.BIGTIFF_THRESHOLD``).
- ``sitk.py``: :class:`SitkVolume`, :class:`DicomSeriesVolume`, NIfTI checks, :class:`SitkWriter`.
- ``writer.py``: the :class:`VolumeWriter` base, target checks, stale temporary outputs, the
  SIGTERM handler.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .base import (
    IMAGE_SUFFIXES,
    IMAGEJ_DTYPES,
    OME_SUFFIXES,
    SITK_SUFFIXES,
    SITK_WRITE_SUFFIXES,
    TIFF_SUFFIXES,
    TMP_PREFIX,
    Spacing,
    Volume,
    finite_slices,
    to_dtype,
)
from .sitk import DicomSeriesVolume, SitkVolume, SitkWriter
from .slices import (
    NReconWriter,
    SliceFolderVolume,
    _open_folder,
    _open_nrecon,
    numbered_slices,
    probe_slice_file,
    read_slice_file,
)
from .tiff import BIGTIFF_THRESHOLD, TiffVolume, TiffVolumeWriter
from .writer import VolumeWriter, _on_sigterm

__all__ = [
    "finite_slices",
    "BIGTIFF_THRESHOLD",
    "IMAGEJ_DTYPES",
    "IMAGE_SUFFIXES",
    "OME_SUFFIXES",
    "SITK_SUFFIXES",
    "SITK_WRITE_SUFFIXES",
    "TIFF_SUFFIXES",
    "TMP_PREFIX",
    "DicomSeriesVolume",
    "NReconWriter",
    "SitkVolume",
    "SitkWriter",
    "SliceFolderVolume",
    "Spacing",
    "TiffVolume",
    "TiffVolumeWriter",
    "Volume",
    "VolumeWriter",
    "_on_sigterm",
    "create_volume_writer",
    "describe",
    "numbered_slices",
    "open_volume",
    "output_kind",
    "probe_slice_file",
    "read_slice_file",
    "to_dtype",
    "write_volume",
]

log = logging.getLogger(__name__)


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
        log.warning("%s: %s; spacing unknown, and outputs made from it have none either "
                    "(give it, in um: --spacing-um 80 for an 80 um scan, or Z,Y,X)", path, what)
    return vol


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

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
                         description: str | None = None,
                         origin_mm: tuple[float, ...] | None = None,
                         direction: tuple[float, ...] | None = None) -> VolumeWriter:
    """A slice-by-slice writer for ``path`` (format from the suffix; see the module docs).
    ``origin_mm`` and ``direction`` (ITK's, row-major 3x3) go into NIfTI/MHA/NRRD headers;
    TIFF and NRecon have no place for them.

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
    return SitkWriter(path, shape, dtype, spacing_um, overwrite, origin_mm=origin_mm,
                      direction=direction)


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
    the value range over ``samples`` evenly spaced slices (first, middle, last). The range is
    over their finite values (None when there is none, e.g. an all-NaN volume), so it is valid
    JSON; ``non_finite_voxels`` counts their NaN and infinite voxels."""
    n = len(vol)
    zs = sorted({round(i * (n - 1) / max(1, samples - 1)) for i in range(samples)})
    lo = hi = None
    non_finite = 0
    for z in zs:
        s = vol[z]
        if s.dtype.kind == "f":
            finite = np.isfinite(s)
            non_finite += int(s.size - np.count_nonzero(finite))
            s = s[finite]
        if s.size:
            lo = s.min() if lo is None else min(lo, s.min())
            hi = s.max() if hi is None else max(hi, s.max())
    cast = float if vol.dtype.kind == "f" else int
    return {"path": str(vol.path), "format": vol.format, "shape": list(vol.shape),
            "dtype": vol.dtype.name,
            "spacing_um": None if vol.spacing_um is None else list(vol.spacing_um),
            "spacing_source": vol.spacing_source,
            "value_range": None if lo is None else [cast(lo), cast(hi)],
            "value_range_slices": zs, "non_finite_voxels": non_finite}
