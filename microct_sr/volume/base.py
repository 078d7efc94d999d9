"""Shared pieces of the volume package: the ``Spacing`` type, suffix tuples and other constants,
:func:`to_dtype` and the :class:`Volume` base class. Imports no format module (no cycles)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import nrecon
from ..atomic import TMP_PREFIX as TMP_PREFIX  # re-exported: the volume modules use it
from ..errors import UserError

Spacing = tuple[float, float, float]
# Voxel sizes (um) that can describe a scan: 1 pm to 1 km. Beyond them a value is a unit
# mix-up or garbage, and TIFF resolution tags or NRecon section numbers cannot be formed.
SPACING_RANGE_UM = (1e-6, 1e9)

SITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
SITK_WRITE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.btf")
IMAGE_SUFFIXES = nrecon.SLICE_EXTENSIONS
IMAGEJ_DTYPES = ("uint8", "uint16", "int16", "float32")

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# Checks every reader shares
# --------------------------------------------------------------------------------------------

def context_index(z0: int, z1: int, context: int, nz: int) -> np.ndarray:
    """(z1 - z0, 2 * context + 1) slice indices of the 2.5D stacks of slices z0 .. z1 - 1:
    each slice and ``context`` neighbours on each side, clamped to [0, nz) at the volume's
    ends (edge replication, as ``pair --context`` cuts its training patches)."""
    offsets = np.arange(-context, context + 1)
    return np.clip(np.arange(z0, z1)[:, None] + offsets[None, :], 0, nz - 1)


def finite_slices(block: np.ndarray, path: Any, z0: int, hint: str = "") -> np.ndarray:
    """``block`` (one slice or slices of the volume at ``path``, from slice ``z0``) as it is;
    UserError naming ``path`` and the first slice holding NaN or Inf (a float export's masked
    voxels), with ``hint`` appended: no computation spreads them silently."""
    if block.dtype.kind in "fc":
        finite = np.isfinite(block).reshape((-1, *block.shape[-2:])).all(axis=(1, 2))
        if not finite.all():
            z = z0 + int(np.flatnonzero(~finite)[0])
            raise UserError(f"slice {z} holds NaN or Inf values{hint}", path)
    return block


def checked_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``shape`` as ints; UserError naming ``path`` when a dimension is zero (e.g. an MHA with
    ``DimSize = 32 32 0``): there is nothing to read."""
    out = tuple(int(s) for s in shape)
    if min(out) < 1:
        raise UserError(f"empty volume: shape (z, y, x) {out} has a zero-size dimension", path)
    return out  # type: ignore[return-value]


def checked_dtype(path: Path, dtype: Any) -> np.dtype:
    """``dtype`` when it is an integer or floating-point type; UserError naming ``path`` and
    the type otherwise. A bool volume (a binary mask) is refused rather than read as 0/1 uint8:
    the network's intensity window would turn it into a black image, silently."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise UserError(f"unsupported voxel type {dtype.name}; expected integer or "
                        "floating-point grayscale (save a mask as uint8 0/255)", path)
    return dtype


def checked_spacing(path: Path, spacing_um: Any) -> Spacing | None:
    """The file's (z, y, x) voxel size made usable, with a warning naming ``path`` when changed.

    A negative size is taken as its absolute value: the voxels are read in file order and the
    axis direction belongs in the direction matrix (MHA ``TransformMatrix``, NIfTI qform), so
    the sign says nothing about the size. A zero or non-finite size is no voxel size: the
    spacing is unknown (None), as for a file without one."""
    if spacing_um is None:
        return None
    sp = tuple(float(s) for s in spacing_um)
    if not all(math.isfinite(s) and s != 0 for s in sp):
        log.warning("%s: voxel size (z, y, x) %s um is zero or not finite; ignored", path, sp)
        return None
    if any(s < 0 for s in sp):
        log.warning("%s: negative voxel size (z, y, x) %s um in the file; using its absolute "
                    "value (the axis direction is not part of the voxel size)", path, sp)
    lo, hi = SPACING_RANGE_UM
    if not all(lo <= abs(s) <= hi for s in sp):
        log.warning("%s: voxel size (z, y, x) %s um is outside %g-%g um; ignored", path, sp,
                    lo, hi)
        return None
    return tuple(abs(s) for s in sp)  # type: ignore[return-value]


def check_same_headers(files: list[Path],
                       probe: Callable[[Path], tuple[tuple[int, int], str]]
                       ) -> tuple[tuple[int, int], str]:
    """All slice files agree with the first on ``probe(file)`` = ((y, x), dtype); returns them.
    UserError names the odd file (slice folders, DICOM series)."""
    first_shape, first_dtype = probe(files[0])
    for f in files[1:]:
        shape, dtype = probe(f)
        if shape != first_shape:
            raise UserError(f"slice size {shape[1]}x{shape[0]} differs from the first slice "
                            f"{files[0].name} ({first_shape[1]}x{first_shape[0]})", f)
        if dtype != first_dtype:
            raise UserError(f"slice dtype {dtype} differs from the first slice {files[0].name} "
                            f"({first_dtype})", f)
    return tuple(first_shape), first_dtype  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------

class Volume:
    """A lazy (z, y, x) volume: metadata up front, slices read on demand. Every reader passes
    :func:`checked_shape`, :func:`checked_dtype` and :func:`checked_spacing` on opening."""

    format: str = "unknown"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, spacing_source: str,
                 metadata: dict | None = None):
        self.path = Path(path)
        self.shape = checked_shape(self.path, shape)
        self.dtype = checked_dtype(self.path, dtype)
        self.spacing_um = checked_spacing(self.path, spacing_um)
        self.spacing_source = spacing_source if self.spacing_um is not None else "unknown"
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
