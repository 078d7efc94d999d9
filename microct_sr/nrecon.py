"""Bruker SkyScan NRecon output: ``.log`` parsing, slice discovery and log writing.

An NRecon reconstruction folder holds slices ``<prefix><8 digits>.<bmp|tif|png|jpg>`` (the
prefix from ``[File name convention] Filename Prefix``, usually ending in ``rec``, e.g.
``sample__rec00000020.bmp``) beside ``<prefix>.log`` (``sample__rec.log``). Numbering starts at
``[Reconstruction] First Section``; ``*_spr.*`` files are previews and dot-files (macOS ``._*``
companions) are not NRecon's: both are skipped.

The voxel size is ``[Reconstruction] Pixel Size (um)``. ``[Acquisition] Image Pixel Size (um)``
is the *projection* pixel and differs from it when ``Undersampling factor`` > 1.
Logs are read as latin-1 (real ones carry non-UTF-8 Windows paths; UTF-8/UTF-16 only with a
byte-order mark); unknown sections and keys are kept and ignored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

SLICE_EXTENSIONS = (".bmp", ".tif", ".tiff", ".png", ".jpg", ".jpeg")
INDEX_LENGTH = 8
# Our own section: lets a writer record an anisotropic voxel size exactly.
OWN_SECTION = "microct-sr"

Sections = dict[str, dict[str, str]]


def is_hidden(name: str) -> bool:
    """Dot-files: macOS ``._*`` AppleDouble companions and ``.DS_Store`` (copies from a Mac
    carry one ``._x`` per file, binary, with the same suffix), our own temporaries."""
    return name.startswith(".")


def _decode(data: bytes) -> str:
    """Log text: latin-1, unless a byte-order mark says the log was re-saved by an editor as
    UTF-8 or UTF-16 (Notepad's "Unicode")."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16", errors="replace")
    if data[:3] == b"\xef\xbb\xbf":
        try:
            return data[3:].decode("utf-8")
        except UnicodeDecodeError:
            return data[3:].decode("latin-1")
    return data.decode("latin-1")


def parse_log(path: Path) -> Sections:
    """Parse an NRecon-style ``key=value`` log into ``{section: {key: value}}`` (latin-1, or
    UTF-8/UTF-16 with a byte-order mark).

    Lines outside any section go to section ``""``; repeated keys keep the last value.
    Raises :class:`UserError` when the file cannot be read or holds no section at all.
    """
    try:
        text = _decode(Path(path).read_bytes())
    except OSError as e:
        raise UserError(f"cannot read the NRecon log ({e.strerror or e})", path) from None
    if "\x00" in text:
        raise UserError("unreadable NRecon log (binary content)", path)
    sections: Sections = {"": {}}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith((";", "#")):
            continue
        m = re.fullmatch(r"\[(.+)\]", line)
        if m:
            current = m.group(1).strip()
            sections.setdefault(current, {})
        elif "=" in line:
            key, value = line.split("=", 1)
            sections[current][key.strip()] = value.strip()
    if len(sections) == 1:
        raise UserError("unreadable NRecon log (no [Section] headers)", path)
    return sections


def _number(sections: Sections, section: str, key: str, path: Path) -> float | None:
    """A numeric log value, None when absent; UserError when present but not a number."""
    value = sections.get(section, {}).get(key)
    if value is None or value == "":
        return None
    m = re.match(r"\s*([-+]?\d+(?:[.,]\d*)?(?:[eE][-+]?\d+)?)", value)
    if not m:
        raise UserError(f"[{section}] {key}={value!r} is not a number", path)
    return float(m.group(1).replace(",", "."))


@dataclass
class NReconLog:
    """What the readers need from an NRecon log."""

    path: Path
    sections: Sections
    pixel_size_um: float | None = None          # reconstructed voxel (x, y)
    projection_pixel_um: float | None = None    # [Acquisition] Image Pixel Size (um)
    undersampling: int = 1
    first_section: int | None = None
    last_section: int | None = None
    section_step: int = 1
    prefix: str | None = None                   # [File name convention] Filename Prefix
    index_length: int = INDEX_LENGTH
    spacing_um: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)


def read_log(path: Path) -> NReconLog:
    """Parse ``path`` and derive the voxel size (z, y, x) in um and the slice prefix."""
    path = Path(path)
    s = parse_log(path)
    if "Reconstruction" not in s and OWN_SECTION not in s:
        what = "an acquisition log of projections" if "Acquisition" in s else \
            "not an NRecon reconstruction log"
        raise UserError(f"{what} (no [Reconstruction] section); open the folder of "
                        "reconstructed slices NRecon wrote (usually <scan>_Rec)", path)
    info = NReconLog(path=path, sections=s)
    info.pixel_size_um = _number(s, "Reconstruction", "Pixel Size (um)", path)
    info.projection_pixel_um = _number(s, "Acquisition", "Image Pixel Size (um)", path)
    under = _number(s, "Reconstruction", "Undersampling factor", path)
    info.undersampling = int(under) if under and under >= 1 else 1
    first = _number(s, "Reconstruction", "First Section", path)
    info.first_section = None if first is None else int(first)
    last = _number(s, "Reconstruction", "Last Section", path)
    info.last_section = None if last is None else int(last)
    step = _number(s, "Reconstruction", "Section to Section Step", path)
    info.section_step = int(step) if step and step >= 1 else 1
    conv = s.get("File name convention", {})
    info.prefix = conv.get("Filename Prefix") or None
    length = _number(s, "File name convention", "Filename Index Length", path)
    info.index_length = int(length) if length else INDEX_LENGTH
    info.spacing_um = _spacing(info, path)
    return info


def _spacing(info: NReconLog, path: Path) -> tuple[float, float, float] | None:
    """Voxel size: our own exact entries, else Pixel Size (z = pixel x section step)."""
    own = [_number(info.sections, OWN_SECTION, f"Spacing {a} (um)", path) for a in "ZYX"]
    if all(v is not None and v > 0 for v in own):
        return (own[0], own[1], own[2])  # type: ignore[return-value]
    px = info.pixel_size_um
    if px is None and info.projection_pixel_um:
        px = info.projection_pixel_um * info.undersampling
        info.notes.append(f"no [Reconstruction] Pixel Size; used Image Pixel Size x undersampling"
                          f" = {px:g} um")
    if px is None or px <= 0:
        return None
    return (px * info.section_step, px, px)


def _logs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".log"
                  and not is_hidden(p.name) and p.is_file())


def find_log(folder: Path) -> Path | None:
    """The reconstruction log of an NRecon folder: ``*rec.log`` first, else any ``*.log``
    with a ``[Reconstruction]`` section. None when there is none."""
    logs = _logs(folder)
    rec = [p for p in logs if p.stem.lower().endswith("rec")]
    if rec:
        if len(rec) > 1:
            log.warning("%s: %d reconstruction logs (%s); reading %s", folder, len(rec),
                        ", ".join(p.name for p in rec), rec[0].name)
        return rec[0]
    for p in logs:
        try:
            head = _decode(p.read_bytes()[:200_000])
        except OSError:
            continue
        if "[Reconstruction]" in head:
            return p
    return None


def find_acquisition_log(folder: Path) -> tuple[Path, str] | None:
    """``(log, projection prefix)`` of a scanner acquisition log in ``folder`` (an
    ``[Acquisition] Filename Prefix`` and no ``[Reconstruction]``), else None."""
    for p in _logs(folder):
        try:
            s = parse_log(p)
        except UserError:
            continue
        prefix = s.get("Acquisition", {}).get("Filename Prefix")
        if prefix and "Reconstruction" not in s:
            return p, prefix
    return None


def slice_pattern(prefix: str, index_length: int = INDEX_LENGTH) -> re.Pattern[str]:
    """Regex matching ``<prefix><digits>.<ext>`` slice names (case-insensitive)."""
    exts = "|".join(e.lstrip(".") for e in SLICE_EXTENSIONS)
    return re.compile(rf"^{re.escape(prefix)}(\d{{{index_length}}})\.({exts})$", re.IGNORECASE)


def is_preview(name: str) -> bool:
    """NRecon writes ``*_spr.*`` previews beside the slices."""
    return Path(name).stem.lower().endswith("_spr")


def find_slices(folder: Path, info: NReconLog) -> list[tuple[int, Path]]:
    """``(section index, path)`` of the slices named after the log's prefix, sorted.

    Tries the prefix as written, then with ``rec`` appended, then the log's stem (``x_rec.log``
    -> ``x_rec``). Empty when none match. Slices in several formats (BMP and a TIFF
    conversion side by side): those of the log's ``Result File Type``, else the commonest.
    """
    names = [p.name for p in folder.iterdir() if not is_preview(p.name)]
    wanted = _EXT_OF_TYPE.get(info.sections.get("Reconstruction", {})
                              .get("Result File Type", "").strip().upper())
    candidates = []
    if info.prefix:
        candidates += [info.prefix, info.prefix + "rec"]
    candidates.append(info.path.stem)
    for prefix in candidates:
        pat = slice_pattern(prefix, info.index_length)
        found = [(int(m.group(1)), folder / n) for n in names if (m := pat.match(n))]
        if found:
            exts = sorted({_ext(p) for _, p in found})
            if len(exts) > 1:
                count = {e: sum(_ext(p) == e for _, p in found) for e in exts}
                best = wanted if wanted in exts else max(exts, key=lambda e: count[e])
                log.warning("%s: slices in several formats (%s); reading the %s slices%s",
                            folder, ", ".join(f"{count[e]} {e}" for e in exts), best,
                            " (the log's Result File Type)" if best == wanted else "")
                found = [(i, p) for i, p in found if _ext(p) == best]
            return sorted(found)
    return []


# Result File Type in the log -> slice suffix; .tiff/.jpeg count as .tif/.jpg.
_EXT_OF_TYPE = {"BMP": ".bmp", "TIF": ".tif", "TIFF": ".tif", "PNG": ".png", "JPG": ".jpg",
                "JPEG": ".jpg"}
_EXT_ALIAS = {".tiff": ".tif", ".jpeg": ".jpg"}


def _ext(path: Path) -> str:
    suffix = path.suffix.lower()
    return _EXT_ALIAS.get(suffix, suffix)


def section_step(spacing_um: tuple[float, float, float] | None) -> int:
    """NRecon's ``Section to Section Step`` for a (z, y, x) voxel size: z / x when that is a
    whole number (an 8x upscale: 80 um slices of a 10 um grid = every 8th section), else 1 (the
    exact spacing is in our own log section either way)."""
    if spacing_um is None or spacing_um[1] != spacing_um[2]:
        return 1
    ratio = spacing_um[0] / spacing_um[2]
    return max(1, round(ratio)) if abs(ratio - round(ratio)) < 1e-6 else 1


def default_log(shape: tuple[int, int, int], spacing_um: tuple[float, float, float] | None,
                prefix: str, file_type: str, version: str) -> Sections:
    """A minimal NRecon-1.7-shaped log for a volume this tool wrote. With a section step
    above 1 (:func:`section_step`) the slices are numbered by section, as NRecon does, so a
    reader that takes z = Pixel Size x step gets the true slice spacing."""
    z, y, x = shape
    step = section_step(spacing_um)
    rec: dict[str, str] = {
        "Reconstruction Program": "microct-sr",
        "Program Version": f"Version: {version}",
        "First Section": "0",
        "Last Section": str((z - 1) * step),
        "Section to Section Step": str(step),
        "Sections Count": str(z),
        "Result File Type": file_type.upper(),
        "Result Image Width (pixels)": str(x),
        "Result Image Height (pixels)": str(y),
    }
    sections: Sections = {"System": {"Software": f"microct-sr {version}"}, "Reconstruction": rec}
    if spacing_um is not None:
        rec["Pixel Size (um)"] = format(spacing_um[2], ".10g")
        sections[OWN_SECTION] = {f"Spacing {a} (um)": format(v, ".10g")
                                 for a, v in zip("ZYX", spacing_um)}
    sections["File name convention"] = {"Filename Index Length": str(INDEX_LENGTH),
                                        "Filename Prefix": prefix}
    return sections


# [Reconstruction] entries that describe the slices' grid and files: a volume derived from a
# scan (an 8x upscale) has its own, which the writer sets.
GRID_KEYS = ("First Section", "Last Section", "Section to Section Step", "Sections Count",
             "Result File Type", "Result Image Width (pixels)", "Result Image Height (pixels)",
             "Pixel Size (um)", "Reconstruction Program", "Program Version",
             "Undersampling factor")


def carried_log(sections: Sections) -> Sections:
    """A scan's log entries that still hold for a volume derived from it (scanner, acquisition,
    reconstruction settings, user notes), for the derived volume's log: everything but the
    grid (:data:`GRID_KEYS`), the file names and our own section, which its writer sets."""
    drop = {"File name convention", OWN_SECTION}
    out = {name: dict(entries) for name, entries in sections.items()
           if name and name not in drop}
    if "Reconstruction" in out:
        out["Reconstruction"] = {k: v for k, v in out["Reconstruction"].items()
                                 if k not in GRID_KEYS}
    return out


def format_log(sections: Sections) -> bytes:
    """Serialise sections as NRecon does (CRLF, latin-1; unencodable characters become '?')."""
    lines: list[str] = []
    for name, entries in sections.items():
        if name:
            lines.append(f"[{name}]")
        lines += [f"{k}={v}" for k, v in entries.items()]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1", errors="replace")


def merge_sections(base: Sections, extra: Sections | None) -> Sections:
    """``base`` updated with ``extra`` (section by section, key by key)."""
    out = {k: dict(v) for k, v in base.items()}
    for sec, entries in (extra or {}).items():
        out.setdefault(sec, {}).update({str(k): str(v) for k, v in entries.items()})
    return out
