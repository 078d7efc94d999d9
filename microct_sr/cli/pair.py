"""`microct-sr pair LR HR OUT_DIR`: register a real LR/HR scan pair and cut training patches."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import click

from ._common import (
    FiniteFloat,
    emit_json,
    json_option,
    overwrite_option,
    parse_spacing,
    quiet_option,
    refuse_output_over_input,
    volume_inputs,
)

log = logging.getLogger(__name__)


def _spacing(ctx, param, value):
    return parse_spacing(value)


def default_scan_id(lr_path: str) -> str:
    """The LR file or folder name without suffixes, reduced to letters, digits, '.', '_', '-'."""
    name = Path(lr_path.rstrip("/")).name
    for suf in (".gz", ".nii", ".ome", ".tiff", ".tif", ".mha", ".nrrd"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "scan"


def _refuse_writing_over_inputs(out_dir: Path, inputs: list[str | Path | None]) -> None:
    """OUT_DIR gains lr/, hr/, qc/, pairs.csv and registration.json: none may be an input."""
    names = ("lr", "hr", "qc", "pairs.csv", "registration.json")
    refuse_output_over_input([("OUT_DIR", out_dir / n) for n in names], inputs)


@click.command("pair")
@click.argument("lr", type=click.Path(exists=True))
@click.argument("hr", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--factor", default=8, show_default=True, type=click.IntRange(2, 32),
              help="HR pixels per LR pixel (in-plane and in Z).")
@click.option("--lr-patch", default=40, show_default=True, type=click.IntRange(4, 4096),
              help="LR patch size in pixels (the HR patch is factor times larger).")
@click.option("--method", type=click.Choice(["ransac", "two-point"]), default="ransac",
              show_default=True,
              help="ransac: robust fit over many slices (default); two-point: the paper's Eq. 1.")
@click.option("--z-search", default=16, show_default=True, type=click.IntRange(0, 10000),
              help="Search the Z offset within +-N HR slices.")
@click.option("--min-ncc", default=0.5, show_default=True, type=FiniteFloat(-1.0, 1.0),
              help="Keep pairs whose upsampled-LR vs HR patch NCC reaches this (-1 to 1).")
@click.option("--max-patches-per-slice", default=3, show_default=True,
              type=click.IntRange(1, 10000))
@click.option("--slices", "n_slices", default=24, show_default=True,
              type=click.IntRange(1, 100000), help="LR slices sampled for the registration.")
@click.option("--scan-id", default=None,
              help="Names this scan's patches (default: the LR file/folder name); one per animal "
                   "so that train can split by scan.")
@click.option("--qc-png", is_flag=True, help="Write OUT_DIR/qc/<scan-id>.png (matches, overlay).")
@click.option("--lr-spacing-um", callback=_spacing, default=None,
              help="LR voxel size in um (one value or Z,Y,X); overrides the file's metadata.")
@click.option("--hr-spacing-um", callback=_spacing, default=None,
              help="HR voxel size in um (one value or Z,Y,X); overrides the file's metadata.")
@click.option("--context", default=0, show_default=True, type=click.IntRange(0, 8),
              help="2.5D input: each LR patch file holds LR slices k-N..k+N (2N+1 pages, edge "
                   "slices repeated); train then uses 2N+1 input channels. HR patches stay 2D.")
@click.option("--refine-per-slice", is_flag=True,
              help="Polish the scan's transform on each LR slice by NCC (within 1.5 LR px) before "
                   "cutting its patches, for scans that drift; reads every HR slice.")
@click.option("--motion-from", "motion_from", type=click.Path(dir_okay=False), default=None,
              help="Skip the registration and use the motion recorded in this simulation.json "
                   "(`microct-sr simulate`): for simulated scans too blurred for A-KAZE.")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Worker threads.")
@click.option("--seed", default=0, show_default=True, type=int, help="RANSAC seed.")
@overwrite_option
@json_option
@quiet_option
def command(lr: str, hr: str, out_dir: str, factor: int, lr_patch: int, method: str,
            z_search: int, min_ncc: float, max_patches_per_slice: int, n_slices: int,
            scan_id: str | None, qc_png: bool, lr_spacing_um, hr_spacing_um,
            context: int, refine_per_slice: bool, motion_from: str | None, jobs: int,
            seed: int, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Register LR to HR (rotation about Z, in-plane shift, Z offset) and cut LR/HR patch pairs
    into OUT_DIR (lr/, hr/, pairs.csv, registration.json). See docs/pair.md."""
    from ..pairing import pair_scans, read_simulated_motion
    from ..volume import open_volume

    sid = scan_id if scan_id is not None else default_scan_id(lr)
    known_motion = read_simulated_motion(motion_from) if motion_from else None
    with open_volume(lr, lr_spacing_um) as lv, open_volume(hr, hr_spacing_um) as hv:
        _refuse_writing_over_inputs(Path(out_dir), [motion_from, *volume_inputs(lv),
                                                    *volume_inputs(hv)])
        res = pair_scans(lv, hv, out_dir, scan_id=sid, overwrite=overwrite, factor=factor,
                         lr_patch=lr_patch, method=method, z_search=z_search, min_ncc=min_ncc,
                         max_patches_per_slice=max_patches_per_slice, n_slices=n_slices,
                         qc_png=qc_png, context=context, refine_per_slice=refine_per_slice,
                         jobs=jobs, seed=seed, quiet=quiet, known_motion=known_motion)
    reg = res["registration"]
    pages = f", {2 * context + 1} LR pages each" if context else ""
    if as_json:
        emit_json(res)
    else:
        click.echo(f"{sid}: angle {reg['angle_deg']:.3f} deg, shift {reg['shift_um']} um, "
                   f"Z offset {reg['z_offset_hr_slices']} HR slices, {reg['inliers']} inliers "
                   f"on {len(reg['slices_used'])} slices; {res['patches']} patch pairs "
                   f"(median NCC {res['median_ncc']:.3f}{pages}) -> {res['out_dir']}")
