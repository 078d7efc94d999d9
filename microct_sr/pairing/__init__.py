"""Register a real LR scan to its HR scan and cut matching LR/HR training patches.

Geometry (see docs/pair.md): internally pixel coordinates have their origin at the corner of
pixel (0, 0), so pixel (i, j) spans x in [j, j+1), y in [i, i+1), and the registration
(:class:`Rigid`) maps an LR position to an HR position:

    P_hr = factor * R(angle) @ P_lr + t_hr          (x, y in each scan's own pixels)

with R(a) = [[cos a, -sin a], [sin a, cos a]] on (x, y). Identity is the SR grid convention:
LR pixel (i, j) covers HR pixels [8i, 8i+8) x [8j, 8j+8). In Z, LR slice k covers HR slices
[factor*k + z0, factor*k + z0 + factor) with z0 = ``z_offset_hr_slices``. ``registration.json``
reports the motion in simulate's convention instead (``CONVENTIONS``, ``Registration.motion``):
p_lr = R(angle_deg) (p_hr - c) + c + shift_um about the HR field's centre c, so it compares
directly with ``simulation.json``.

Matching never crosses the 8x gap: the LR slice is upsampled (cubic) by ``u`` and the HR slab
(the ``factor`` HR slices one LR slice covers, averaged) is area-downsampled by ``factor/u`` to a
common grid of at least ``match_size`` pixels, both are stretched to uint8 by percentiles and
A-KAZE keypoints are matched there.

Patches: the HR scan is resampled into the LR scan's orientation, never the reverse, so LR
patches are untouched LR pixels (what the network sees at inference, noise texture included)
and only the 8x oversampled HR is interpolated (cubic), where the interpolation error is far
below an LR pixel.

The pipeline, :func:`pair_scans`, is in this ``__init__``; each step has its own module
(everything below is importable from ``microct_sr.pairing``):

- ``geometry.py``: ``CONVENTIONS``, :class:`Rigid`, :func:`fit_rigid`,
  :func:`rotation_angle_deg`, :func:`motion_of` / :func:`rigid_from_motion` (simulate's motion).
  Imports nothing else from the package.
- ``images.py``: the OpenCV/A-KAZE check (``_cv2``), :func:`stretch_u8`, :func:`area_down`,
  :func:`cubic_up`, :func:`ncc`.
- ``scans.py``: :class:`PairOptions`, ``METHODS``, :func:`check_inputs`, :func:`hr_pixel_um`,
  the thread-safe slice reader ``_Reader`` (``lr_stack``: the ``--context`` neighbours),
  :func:`grid_upsample`, :func:`valid_lr_slices`.
- ``keypoints.py``: A-KAZE :func:`detect` (:class:`Features`) and brute-force :func:`match`.
- ``registration.py``: per-slice fits (:class:`SliceFit`, :func:`fit_ransac`, the paper's
  two-point Eq. 1 :func:`fit_two_point`, :func:`two_point_failure_rate`), the matcher
  ``_Matcher``, :func:`combine`, the NCC polish :func:`refine_ncc`, the Z offset
  (:func:`z_profile`), :func:`register` -> :class:`Registration`; a known motion:
  :func:`read_simulated_motion`, :func:`registration_from_motion`.
- ``patches.py``: :class:`Patch`, :func:`hr_crop`, :func:`slice_patches` (field-of-view and NCC
  screens), :func:`iter_patches`.
- ``output.py``: the pair folder: ``CSV_COLUMNS``, ``SCAN_ID_RE``, :func:`scan_exists`,
  :func:`check_same_dtype`, :func:`check_same_context`, the locked per-scan merge of
  ``pairs.csv``/``registration.json`` and the patch files (``_commit``).
- ``qc.py``: the QC picture (``--qc-png``): inlier matches and an LR-over-HR overlay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import TMP_PREFIX, remove_dead_runs
from ..errors import UserError
from .geometry import (
    CONVENTIONS,
    Rigid,
    fit_rigid,
    motion_of,
    rigid_from_motion,
    rotation_angle_deg,
)
from .images import _cv2, area_down, cubic_up, ncc, stretch_u8
from .keypoints import Features, detect, match
from .output import (
    CSV_COLUMNS,
    SCAN_ID_RE,
    _commit,
    check_same_context,
    check_same_dtype,
    scan_exists,
)
from .patches import Patch, hr_crop, iter_patches, slice_patches
from .registration import (
    Registration,
    SliceFit,
    _Matcher,
    combine,
    fit_ransac,
    fit_two_point,
    read_simulated_motion,
    refine_ncc,
    register,
    registration_from_motion,
    two_point_estimate,
    two_point_failure_rate,
    warp_lr_to_hr_grid,
    z_profile,
)
from .scans import (
    MAX_CONTEXT,
    METHODS,
    PairOptions,
    _path,
    _Reader,
    check_inputs,
    coverage_warning,
    grid_upsample,
    hr_pixel_um,
    valid_lr_slices,
)

__all__ = [
    "CONVENTIONS",
    "CSV_COLUMNS",
    "MAX_CONTEXT",
    "METHODS",
    "SCAN_ID_RE",
    "Features",
    "PairOptions",
    "Patch",
    "Registration",
    "Rigid",
    "SliceFit",
    "UserError",
    "_Matcher",
    "_Reader",
    "area_down",
    "check_inputs",
    "check_same_context",
    "combine",
    "coverage_warning",
    "cubic_up",
    "detect",
    "fit_ransac",
    "fit_rigid",
    "fit_two_point",
    "grid_upsample",
    "hr_crop",
    "hr_pixel_um",
    "iter_patches",
    "match",
    "motion_of",
    "ncc",
    "pair_scans",
    "read_simulated_motion",
    "refine_ncc",
    "register",
    "registration_from_motion",
    "rigid_from_motion",
    "rotation_angle_deg",
    "scan_exists",
    "slice_patches",
    "stretch_u8",
    "two_point_estimate",
    "two_point_failure_rate",
    "valid_lr_slices",
    "warp_lr_to_hr_grid",
    "z_profile",
]

log = logging.getLogger(__name__)


TMP_PAIR_PREFIX = f"{TMP_PREFIX}pair-"  # + <pid>-<scan id>-<random>: a run's patches


def _remove_dead_runs_folders(out_dir: Path) -> None:
    """Remove the patch folders that runs killed outright (SIGKILL, power loss) left in
    ``out_dir``: as large as a scan's patches, and nothing else would ever remove them."""
    remove_dead_runs(out_dir, re.compile(rf"^{re.escape(TMP_PAIR_PREFIX)}(\d+)-"))


def pair_scans(lr, hr, out_dir: str | Path, *, scan_id: str, overwrite: bool = False,
               known_motion: tuple[float, Sequence[float]] | None = None,
               **options: Any) -> dict:
    """Register ``lr`` to ``hr`` (``Volume``s), cut patches into ``out_dir`` and return
    ``{"registration": {...}, "patches": n, ...}``. See docs/pair.md.

    ``known_motion = (rotation_deg, shift_um)`` in simulate's convention skips the registration
    (Z offset 0), for simulated scans whose truth is known."""
    import tifffile

    from ..progress import progress

    opts = PairOptions(**options)
    out_dir = Path(out_dir)
    if not SCAN_ID_RE.match(scan_id or ""):
        raise UserError(f"--scan-id {scan_id!r}: use 1-100 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (it names the patch files)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("OUT_DIR exists and is not a folder", out_dir)
    if not overwrite and scan_exists(out_dir, scan_id):
        raise UserError(f"scan id {scan_id!r} is already in {out_dir}; use --overwrite to "
                        "replace its patches or choose another --scan-id", out_dir)
    check_inputs(lr, hr, opts)
    check_same_dtype(out_dir, scan_id, lr.dtype, hr.dtype, getattr(lr, "path", "LR"),
                     getattr(hr, "path", "HR"))
    check_same_context(out_dir, scan_id, opts.context)
    if known_motion is None:
        _cv2()
        reg = register(lr, hr, opts, scan_id)
    else:
        reg = registration_from_motion(lr, hr, opts, scan_id, *known_motion)
    reg_json = reg.to_json()
    log.info("%s: registered (angle %.3f deg, shift %s HR px, Z offset %d, NCC %.3f); cutting "
             "patches", scan_id, reg_json["angle_deg"], reg_json["shift_hr_px"], reg.z_offset,
             reg.ncc)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_runs_folders(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PAIR_PREFIX}{os.getpid()}-{scan_id}-",
                                dir=out_dir))
    done = False
    try:
        (tmp / "lr").mkdir()
        (tmp / "hr").mkdir()
        rows, totals = [], {"candidates": 0, "outside": 0, "low_ncc": 0, "duplicates": 0}
        ks = valid_lr_slices(lr.shape[0], hr.shape[0], opts.factor, reg.z_offset, reg.z_offset)
        n_valid = len(ks)
        warning = coverage_warning(lr.shape[0], ks, opts.factor, reg.z_offset)
        if warning:
            log.warning("%s: %s", scan_id, warning)
        bar = progress(total=n_valid, desc=f"pair {scan_id}", quiet=opts.quiet, unit="slice")
        with bar:
            for patches, st in iter_patches(lr, hr, reg, opts):
                bar.update(1)
                for k, v in st.items():
                    totals[k] += v
                for pt in patches:
                    pid = f"{scan_id}_{len(rows):05d}"
                    # minisblack: a (2N+1, p, p) stack is 2N+1 gray pages, not RGB planes
                    # (for a 2D patch the file is the same as without it)
                    tifffile.imwrite(tmp / "lr" / f"{pid}.tif", pt.lr, photometric="minisblack")
                    tifffile.imwrite(tmp / "hr" / f"{pid}.tif", pt.hr)
                    rows.append({"patch_id": pid, "scan_id": scan_id, "lr_slice": pt.lr_slice,
                                 "hr_slice": pt.hr_slice, "lr_x": f"{pt.lr_x:g}",
                                 "lr_y": f"{pt.lr_y:g}", "hr_x": f"{pt.hr_x:.2f}",
                                 "hr_y": f"{pt.hr_y:.2f}",
                                 "angle_deg": f"{motion_of(pt.rigid, hr.shape[1:])[0]:.4f}",
                                 "ncc": f"{pt.ncc:.4f}"})
        if not rows:
            raise UserError(
                f"no patch pair passed: {totals['candidates']} candidates, {totals['outside']} "
                f"outside a field of view, {totals['low_ncc']} below --min-ncc {opts.min_ncc}; "
                "the fields of view may barely overlap or --lr-patch is too large", _path(lr))
        reg_json["patches"] = len(rows)
        reg_json["context"] = opts.context
        if opts.qc_png:
            from .qc import write_qc_png

            write_qc_png(tmp / "qc.png", lr, hr, reg)
        _commit(out_dir, tmp, scan_id, rows, reg_json, overwrite)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not done:  # we made it: leave nothing behind, but only while it is
            with contextlib.suppress(OSError):  # empty: another scan may have merged into it
                out_dir.rmdir()
    nccs = np.array([float(r["ncc"]) for r in rows])
    return {"registration": reg_json, "patches": len(rows), "out_dir": str(out_dir),
            "median_ncc": float(np.median(nccs)), "rejected": totals,
            "slices": n_valid, "qc_png": str(out_dir / "qc" / f"{scan_id}.png")
            if opts.qc_png else None}
