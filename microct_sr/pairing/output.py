"""The pair folder on disk: ``pairs.csv`` and ``registration.json`` (read, merged per scan id,
written atomically under a lock), ``lr/`` and ``hr/`` patch files moved in from a temporary
folder."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
from pathlib import Path

from ..atomic import atomic_write, deferred_signals
from ..errors import UserError

CSV_COLUMNS = ["patch_id", "scan_id", "lr_slice", "hr_slice", "lr_x", "lr_y", "hr_x", "hr_y",
               "angle_deg", "ncc"]
SCAN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _read_index(out_dir: Path) -> tuple[list[dict], list[dict]]:
    rows, regs = [], []
    csv_p, reg_p = out_dir / "pairs.csv", out_dir / "registration.json"
    if csv_p.exists():
        with open(csv_p, newline="") as fh:
            rows = list(csv.DictReader(fh))
    if reg_p.exists():
        try:
            regs = json.loads(reg_p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON ({e}); fix or remove it", reg_p)
        if not isinstance(regs, list):
            raise UserError("expected a JSON list of per-scan objects", reg_p)
    return rows, regs


def scan_exists(out_dir: Path, scan_id: str) -> bool:
    """True when OUT_DIR already holds patches or a registration for ``scan_id``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return False
    rows, regs = _read_index(out_dir)
    return (any(r.get("scan_id") == scan_id for r in rows)
            or any(g.get("scan_id") == scan_id for g in regs)
            or (out_dir / "lr" / f"{scan_id}_00000.tif").exists())


def check_same_dtype(out_dir: Path, scan_id: str, lr_dtype: object, hr_dtype: object,
                     lr_path: str | Path, hr_path: str | Path) -> None:
    """UserError when OUT_DIR already holds another scan's patches of another dtype than
    ``lr_dtype``/``hr_dtype`` (LR patches keep the LR scan's dtype, HR ones the HR's): ``train``
    needs one dtype (one intensity window), so the mix is refused before any work."""
    import numpy as np
    import tifffile

    rows, _ = _read_index(Path(out_dir)) if Path(out_dir).is_dir() else ([], [])
    other = next((r for r in rows if r.get("scan_id") != scan_id), None)
    if other is None:
        return
    for sub, dtype, scan in (("lr", lr_dtype, lr_path), ("hr", hr_dtype, hr_path)):
        patch = Path(out_dir) / sub / f"{other['patch_id']}.tif"
        try:
            with tifffile.TiffFile(patch) as tif:
                have = np.dtype(tif.pages[0].dtype)
        except (OSError, ValueError, tifffile.TiffFileError):
            continue  # train reports unreadable patches itself
        if have != np.dtype(dtype):
            raise UserError(f"is {np.dtype(dtype)}, but the {sub.upper()} patches already in "
                            f"{out_dir} are {have} ({patch.name}); train needs one dtype: "
                            "pair it into another folder or convert the scan", scan)


def check_same_context(out_dir: Path, scan_id: str, context: int) -> None:
    """UserError when OUT_DIR already holds another scan paired with another ``--context``
    (its registration.json entry's ``context``, 0 when absent; for a scan without an entry, the
    page count of its first LR patch): ``train`` reads the LR page count (2N+1) as the model's
    input channels, so one folder holds one context. Checked before any work."""
    import tifffile

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    rows, regs = _read_index(out_dir)
    for g in regs:
        have = g.get("context", 0)
        if g.get("scan_id") != scan_id and have != context:
            raise UserError(f"scan {g.get('scan_id')!r} in it was paired with --context {have}, "
                            f"this one with --context {context}; {_one_context(have)}",
                            out_dir / "registration.json")
    known = {g.get("scan_id") for g in regs} | {scan_id}
    other = next((r for r in rows if r.get("scan_id") not in known), None)
    if other is None:
        return
    patch = out_dir / "lr" / f"{other['patch_id']}.tif"
    try:
        with tifffile.TiffFile(patch) as tif:
            pages = len(tif.pages)
    except (OSError, ValueError, tifffile.TiffFileError):
        return  # train reports unreadable patches itself
    if pages != 2 * context + 1:
        raise UserError(f"this LR patch of {out_dir} has {pages} page(s), but --context "
                        f"{context} makes {2 * context + 1}; {_one_context((pages - 1) // 2)}",
                        patch)


def _one_context(have: object) -> str:
    return ("train reads the LR page count (2N+1) as the model's input channels and needs one "
            f"context per folder: give --context {have} or pair into another folder")


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _commit(out_dir: Path, tmp: Path, scan_id: str, rows: list[dict], reg: dict,
            overwrite: bool) -> None:
    """Replace this scan's patches/rows/registration by the new ones; other scans untouched.

    Under the folder's lock (concurrent runs of other scans merge one after the other) and
    with SIGINT/SIGTERM held until the merge is done: an interrupt half-way through would
    leave ``pairs.csv`` listing patch files already deleted or not yet moved in (``train``
    then refuses the folder). Waiting for the lock can still be interrupted."""
    with open(out_dir / ".microct-sr-pair.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with deferred_signals():
            _merge(out_dir, tmp, scan_id, rows, reg, overwrite)


def _merge(out_dir: Path, tmp: Path, scan_id: str, rows: list[dict], reg: dict,
           overwrite: bool) -> None:
    """:func:`_commit`'s work, with the lock held.

    Ordered so that ``pairs.csv`` lists only patch files that exist after every step, also
    when the process is killed outright (SIGKILL, power loss), which no signal handler sees:
    the scan's old rows leave the index before its old patches go, and its new rows enter it
    after the new patches are in. Patch files of this scan that no row lists (what such a
    killed merge left) are removed with the old ones."""
    old_rows, old_regs = _read_index(out_dir)
    if not overwrite and scan_exists(out_dir, scan_id):
        raise UserError(f"scan id {scan_id!r} is already in {out_dir}; use --overwrite to "
                        "replace it or choose another --scan-id", out_dir)
    check_same_context(out_dir, scan_id, reg.get("context", 0))  # a run that merged meanwhile
    keep = [r for r in old_rows if r.get("scan_id") != scan_id]
    if len(keep) < len(old_rows):
        _atomic_text(out_dir / "pairs.csv", _csv_text(keep))
    own = re.compile(rf"^{re.escape(scan_id)}_\d{{5}}\.tif$")
    for sub in ("lr", "hr"):
        (out_dir / sub).mkdir(exist_ok=True)
        listed = {f"{r['patch_id']}.tif" for r in old_rows if r.get("scan_id") == scan_id}
        for p in (out_dir / sub).iterdir():
            if p.name in listed or own.match(p.name):
                p.unlink(missing_ok=True)
        for p in sorted((tmp / sub).iterdir()):
            os.replace(p, out_dir / sub / p.name)
    _atomic_text(out_dir / "pairs.csv", _csv_text(keep + rows))
    regs = [g for g in old_regs if g.get("scan_id") != scan_id] + [reg]
    _atomic_text(out_dir / "registration.json", json.dumps(regs, indent=2) + "\n")
    if (tmp / "qc.png").exists():
        (out_dir / "qc").mkdir(exist_ok=True)
        os.replace(tmp / "qc.png", out_dir / "qc" / f"{scan_id}.png")


def _csv_text(rows: list[dict]) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
