"""`microct-sr phantom OUT`: a procedural trabecular-bone HR volume (or a gray-valued mask)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from ._common import (
    FINITE,
    POSITIVE,
    emit_json,
    json_option,
    overwrite_option,
    parse_spacing,
    refuse_output_over_input,
    volume_inputs,
)


@click.command("phantom")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--shape", type=int, nargs=3, default=(128, 256, 256), show_default=True,
              help="Volume size Z Y X in voxels.")
@click.option("--bvtv", type=FINITE, default=0.25, show_default=True,
              help="Trabecular bone volume fraction BV/TV.")
@click.option("--thickness-um", "thickness_um", type=POSITIVE, default=80.0, show_default=True,
              help="Mean trabecular thickness in um.")
@click.option("--cortex/--no-cortex", default=True, show_default=True,
              help="An elliptic cortical shell around the trabecular compartment.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mask", "mask_path", type=click.Path(exists=True, path_type=str), default=None,
              help="Binary bone mask (nonzero = bone) to give gray values instead of the "
                   "procedural geometry (e.g. ../shared/data/bone/vertebra_rois/*.nrrd).")
@click.option("--dtype", type=click.Choice(["uint8", "uint16"]), default="uint8",
              show_default=True)
@click.option("--spacing-um", "spacing_um", default=None,
              callback=lambda ctx, param, v: parse_spacing(v),
              help="Voxel size in um, one value (isotropic) or Z,Y,X (default 10; with --mask: "
                   "the mask's, which this overrides).")
@overwrite_option
@json_option
def command(out: str, shape: tuple[int, int, int], bvtv: float, thickness_um: float,
            cortex: bool, seed: int, mask_path: str | None, dtype: str, spacing_um,
            overwrite: bool, as_json: bool) -> None:
    """Write a procedural trabecular-bone HR volume to OUT (.tif, .nii.gz, folder ...).

    Plates and rods from band-limited noise, marrow and bone gray levels, partial-volume
    edges, blur and noise; the achieved BV/TV and thickness are reported (--json).
    """
    from ..errors import UserError
    from ..phantom import check_memory, check_request, make_phantom
    from ..volume import create_volume_writer, open_volume

    if not out:         # an unset shell variable: not the current folder
        raise UserError("OUT is an empty path; give the output file or folder")
    with ExitStack() as stack:
        mask_vol = None
        if mask_path is not None:
            mask_vol = stack.enter_context(open_volume(mask_path, spacing_um=spacing_um))
            refuse_output_over_input([("OUT", out)], volume_inputs(mask_vol))
            check_memory(mask_vol.shape)
            spacing_um = spacing_um or mask_vol.spacing_um
        spacing = spacing_um or (10.0, 10.0, 10.0)
        if mask_vol is None:
            check_request(tuple(shape), spacing, bvtv, thickness_um, dtype, seed,
                          cortex=cortex)
        # the output is checked (exists, parent folder, format, free space) before the work
        grid = tuple(shape) if mask_vol is None else tuple(mask_vol.shape)
        # on the mask's grid: its position too, so the phantom overlays the mask in 3D Slicer
        meta = {} if mask_vol is None else mask_vol.metadata
        writer = stack.enter_context(create_volume_writer(
            out, grid, dtype, spacing, overwrite=overwrite,
            description="microct-sr phantom (procedural trabecular bone)",
            origin_mm=meta.get("origin_mm"), direction=meta.get("direction")))
        mask = None if mask_vol is None else mask_vol.read(0, len(mask_vol))
        array, info = make_phantom(tuple(shape), spacing, bvtv=bvtv, thickness_um=thickness_um,
                                   cortex=cortex, seed=seed, mask=mask, dtype=dtype,
                                   mask_path=mask_path)
        _write_blocks(writer, array)
    info["output"] = str(Path(out))
    if mask_path is not None:
        info["mask"] = mask_path
    if as_json:
        emit_json(info)
    else:
        click.echo(f"{info['output']}: phantom {tuple(info['shape'])} {dtype} at "
                   f"{spacing[2]:g} um, BV/TV {info['bvtv']:.3f}, "
                   f"Tb.Th {info['thickness_um']:.1f} um")


def _write_blocks(writer: Any, array: Any) -> None:
    """Write ``array`` (z, y, x) in blocks of about 64 MB."""
    step = max(1, (64 << 20) // max(1, array[0].nbytes))
    for z in range(0, array.shape[0], step):
        writer.write(array[z:z + step])
