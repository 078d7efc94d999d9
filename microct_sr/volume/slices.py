"""2D slice files and folders of them: read/probe BMP/PNG/JPEG/TIFF slices,
:class:`SliceFolderVolume`, numbered-slice series, NRecon folders (opening and
:class:`NReconWriter`) and the folder dispatch (NRecon, numbered slices, DICOM series)."""

from __future__ import annotations

import logging
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .. import nrecon
from ..errors import UserError
from .base import (
    IMAGE_SUFFIXES,
    IMAGEJ_DTYPES,
    TIFF_SUFFIXES,
    TMP_PREFIX,
    Spacing,
    Volume,
    check_same_headers,
)
from .sitk import DicomSeriesVolume, _dicom_files
from .writer import VolumeWriter

log = logging.getLogger(__name__)


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
        shape2d, dtype = check_same_headers(files, probe_slice_file)
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
    ``*_spr.*`` previews and dot-files (macOS ``._*`` companions, our temporaries) are
    skipped."""
    groups: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES or nrecon.is_preview(p.name) or \
                nrecon.is_hidden(p.name) or not p.is_file():
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
                    "series %s... instead", folder, info.prefix or log_path.stem,
                    indexed[0][1].name)
    _check_numbering(indexed, 1 if _steps_are_unit(indexed) else info.section_step)
    if info.first_section is not None and indexed[0][0] != info.first_section:
        log.warning("%s: first slice %s is number %d but the log says First Section=%d",
                    folder, indexed[0][1].name, indexed[0][0], info.first_section)
    if info.last_section is not None and indexed[-1][0] != info.last_section:
        log.warning("%s: last slice %s is number %d but the log says Last Section=%d "
                    "(an incomplete copy?)", folder, indexed[-1][1].name, indexed[-1][0],
                    info.last_section)
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


def _rec_subfolders(folder: Path) -> str:
    """Subfolders holding a reconstruction log (the scan folder above NRecon's
    ``<scan>_Rec``), joined for a message ("" when none)."""
    subs = []
    for d in sorted(folder.iterdir()):
        try:
            if d.is_dir() and not nrecon.is_hidden(d.name) and nrecon.find_log(d) is not None:
                subs.append(d.name)
        except OSError:  # an unreadable subfolder only loses the hint
            continue
    return " or ".join(subs)


def _refuse_projections(folder: Path, indexed: list[tuple[int, Path]]) -> None:
    """UserError when the numbered series is the scanner's projections: named after the
    ``Filename Prefix`` of an acquisition log beside them (the scan folder, not NRecon's
    reconstruction), which would otherwise be read as a volume of slices."""
    acq = nrecon.find_acquisition_log(folder)
    if acq is None:
        return
    stem, prefix = indexed[0][1].stem.lower(), acq[1].lower()
    if stem.startswith(prefix) and stem[len(prefix):].isdigit():
        subs = _rec_subfolders(folder)
        where = f"open {subs}" if subs else "open the folder NRecon wrote (with a *_rec.log)"
        raise UserError(f"holds the scanner's projection images ({indexed[0][1].name}..., "
                        f"acquisition log {acq[0].name}), not reconstructed slices; {where}",
                        folder)


def _open_folder(folder: Path) -> Volume:
    entries = [p for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)]
    if not entries:
        raise UserError("empty folder", folder)
    log_path = nrecon.find_log(folder)
    if log_path is not None:
        return _open_nrecon(folder, log_path)
    indexed = numbered_slices(folder)
    if indexed:
        _refuse_projections(folder, indexed)
        _check_numbering(indexed)
        return SliceFolderVolume(folder, [p for _, p in indexed], "slices", None, "unknown",
                                 {"first_index": indexed[0][0]})
    dicom = _dicom_files(folder)
    if dicom:
        return DicomSeriesVolume(folder, dicom)
    subs = _rec_subfolders(folder)
    raise UserError("no recognisable slices (expected an NRecon folder, numbered "
                    "TIFF/PNG/BMP slices or a DICOM series)"
                    + (f"; the NRecon reconstruction is in {subs}" if subs else ""), folder)


# --------------------------------------------------------------------------------------------
# NRecon writer
# --------------------------------------------------------------------------------------------

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
        self.step = nrecon.section_step(spacing_um)  # files numbered by section, as NRecon does
        super().__init__(path, shape, dtype, spacing_um, overwrite)

    def _open(self) -> None:
        self.tmp.mkdir()

    def slice_name(self, z: int) -> str:
        return f"{self.prefix}{z * self.step:0{nrecon.INDEX_LENGTH}d}{self.ext}"

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
        from .. import __version__

        base = nrecon.default_log(self.shape, self.spacing_um, self.prefix,
                                  self.ext.lstrip("."), __version__)
        sections = nrecon.merge_sections(base, self.log_extra)
        (self.tmp / f"{self.prefix}.log").write_bytes(nrecon.format_log(sections))
