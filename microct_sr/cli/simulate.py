"""`microct-sr simulate HR LR_OUT`: the LR scan a scanner would give of an HR volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import (
    FINITE,
    NON_NEGATIVE,
    POSITIVE,
    emit_json,
    json_option,
    overwrite_option,
    quiet_option,
    refuse_output_over_input,
    spacing_option,
    volume_inputs,
)


@click.command("simulate")
@click.argument("hr", type=click.Path(exists=True, dir_okay=True, path_type=str))
@click.argument("lr_out", type=click.Path(path_type=str))
@click.option("--factor", type=int, default=8, show_default=True,
              help="Downsampling factor in x, y and z.")
@click.option("--views", type=int, default=225, show_default=True,
              help="Projections over 360 degrees.")
@click.option("--photons", type=float, default=None,
              help="Open-beam photons per LR detector pixel per view; 'inf' = noiseless. "
                   "Default ~19310: an HR scan of 900 views x 464 ms rescaled to 225 views x "
                   "40 ms (see docs/simulate.md).")
@click.option("--smoothing", type=NON_NEGATIVE, default=0.5, show_default=True,
              help="Gaussian smoothing sigma in LR pixels after reconstruction (0: none).")
@click.option("--filter", "filter_name", default="hamming", show_default=True,
              type=click.Choice(["hamming", "shepp-logan", "cosine", "hann", "ramp"]),
              help="Reconstruction filter window on the ramp.")
@click.option("--rotation", "rotation", type=FINITE, default=None,
              help="Object rotation in degrees about the field centre (+x towards +y, i.e. "
                   "clockwise on screen); see simulation.json 'conventions'.")
@click.option("--shift-um", "shift_um", type=FINITE, nargs=2, default=None,
              help="Object shift X Y in um after the rotation (+x right, +y down).")
@click.option("--random-motion", is_flag=True,
              help="Draw rotation (+-10 deg) and shift (+-3 LR pixels) from --seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise and motion seed.")
@click.option("--format", "fmt", type=click.Choice(["nrecon", "tif"]), default="nrecon",
              show_default=True, help="NRecon-style slice folder or one multi-page TIFF.")
@click.option("--name", default=None, help="File name prefix (default: LR_OUT's name).")
@click.option("--window", type=FINITE, nargs=2, default=None,
              help="Gray window LO HI mapped to attenuation 0 .. --attenuation "
                   "(default: from 16 evenly spaced slices, 0 for unsigned data, else the "
                   "0.1th percentile, .. the 99.9th percentile).")
@click.option("--attenuation", "attenuation_per_cm", type=POSITIVE, default=4.0,
              show_default=True, help="Attenuation (1/cm) at the window's top gray value.")
@click.option("--proj-pitch", "proj_pitch", type=int, default=0, show_default=True,
              help="Forward-projection pitch in HR pixels (0: 2 when it divides the factor, "
                   "else 1; 1 = full HR resolution, slower).")
@click.option("--edge-pad", "edge_pad", type=int, default=2, show_default=True,
              help="LR pixels added around the field (its edge values repeated) before "
                   "projection: the object goes on beyond the HR field; 0 = air outside.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Worker processes (0: one per CPU core, at most 8).")
@spacing_option
@overwrite_option
@json_option
@quiet_option
def command(hr: str, lr_out: str, factor: int, views: int, photons: float | None,
            smoothing: float, filter_name: str, rotation: float | None,
            shift_um: tuple[float, float] | None, random_motion: bool, seed: int, fmt: str,
            name: str | None, window: tuple[float, float] | None, attenuation_per_cm: float,
            proj_pitch: int, edge_pad: int, workers: int, spacing_um, overwrite: bool,
            as_json: bool, quiet: bool) -> None:
    """Simulate the LR micro-CT scan of the HR volume HR into the folder LR_OUT.

    Parallel-beam projection with the object moved rigidly, detector binning, Poisson noise,
    filtered back-projection onto the LR grid, smoothing. The truth (motion, noise, grid) is
    written to LR_OUT/simulation.json.
    """
    from ..errors import UserError
    from ..simulate import (
        DEFAULT_PHOTONS,
        SimParams,
        auto_proj_pitch,
        output_targets,
        simulate_volume,
    )
    from ..simulate import random_motion as draw_motion
    from ..volume import open_volume

    if not lr_out:      # an unset shell variable: not the current folder
        raise UserError("LR_OUT is an empty path; give the output folder")
    if random_motion and (rotation is not None or shift_um is not None):
        raise UserError("give either --random-motion or --rotation/--shift-um, not both")
    params = SimParams(factor=factor, views=views,
                       photons=DEFAULT_PHOTONS if photons is None else photons,
                       smoothing=smoothing, filter=filter_name, rotation_deg=rotation or 0.0,
                       shift_um=tuple(shift_um) if shift_um else (0.0, 0.0), seed=seed,
                       window=tuple(window) if window else None,
                       attenuation_per_cm=attenuation_per_cm,
                       proj_pitch=proj_pitch or auto_proj_pitch(factor),
                       edge_pad=edge_pad)
    params.validate()
    with open_volume(hr, spacing_um=spacing_um) as vol:
        refuse_output_over_input([("LR_OUT", p) for p in output_targets(lr_out, fmt, name)],
                                 volume_inputs(vol))
        _refuse_tif_into_scan_folder(lr_out, fmt, vol)
        if random_motion:
            sp = spacing_um or vol.spacing_um
            if sp is None:
                raise UserError("has no voxel size in its metadata; give --spacing-um", hr)
            params.rotation_deg, params.shift_um = draw_motion(seed, sp[2] * factor)
        truth = simulate_volume(vol, lr_out, params, spacing_um=spacing_um, fmt=fmt,
                                name=name, overwrite=overwrite, quiet=quiet,
                                random_motion_used=random_motion, workers=workers)
    if as_json:
        emit_json(truth)
    else:
        click.echo(f"{truth['output']}: LR scan {tuple(truth['lr_shape'])} at "
                   f"{truth['lr_spacing_um'][2]:g} um, rotation {truth['rotation_deg']:g} deg, "
                   f"shift {truth['shift_um']} um, {truth['seconds']:.1f} s "
                   f"(truth: {Path(lr_out) / 'simulation.json'})")


def _refuse_tif_into_scan_folder(lr_out: str, fmt: str, vol: Any) -> None:
    """UserError when ``--format tif`` would write into the input's own scan folder (slices,
    NRecon, DICOM): its ``<name>.tif`` and ``simulation.json`` would join the scan (a numbered
    name extends the series, a TIFF in a DICOM folder makes it unreadable)."""
    folder = Path(vol.path)
    if fmt == "tif" and folder.is_dir() and Path(lr_out).resolve() == folder.resolve():
        from ..errors import UserError

        raise UserError(f"LR_OUT is the input scan folder {vol.path}; --format tif would add "
                        "its files to the scan (give another LR_OUT)", lr_out)
