"""``microct-sr info PATH``: what the volume reader understood about a scan."""

from __future__ import annotations

import click

from ._common import emit_json, json_option, spacing_option

JSON_KEYS = ("path", "format", "shape", "dtype", "spacing_um", "spacing_source", "value_range",
             "non_finite_voxels")


@click.command("info")
@click.argument("path", type=click.Path(path_type=str))
@spacing_option
@json_option
def command(path: str, spacing_um: tuple[float, float, float] | None, as_json: bool) -> None:
    """Print format, shape (z, y, x), dtype, value range of a sample and voxel size of PATH.

    PATH is an NRecon folder, a folder of numbered slices, a TIFF/OME-TIFF, NIfTI, MHA/MHD,
    NRRD file or a DICOM series folder.
    """
    from ..errors import UserError
    from ..volume import describe, open_volume

    if not path:        # an unset shell variable: not the current folder
        raise UserError("PATH is an empty path; give a scan file or folder")
    with open_volume(path, spacing_um=spacing_um) as vol:
        info = describe(vol)
    if as_json:
        emit_json({k: info[k] for k in JSON_KEYS})
        return
    sp = info["spacing_um"]
    spacing = "unknown (pass --spacing-um)" if sp is None else \
        " x ".join(f"{v:g}" for v in sp) + f" um  (from {info['spacing_source']})"
    lines = [
        ("path", info["path"]),
        ("format", info["format"]),
        ("shape (z, y, x)", " x ".join(str(n) for n in info["shape"])),
        ("dtype", info["dtype"]),
        ("value range", _value_range(info)),
        ("spacing (z, y, x)", spacing),
    ]
    for key, value in lines:
        click.echo(f"{key + ':':<19}{value}")


def _value_range(info: dict) -> str:
    """``lo .. hi  (slices a, b, c)``, with the NaN/inf count when there are any."""
    vr = info["value_range"]
    text = "no finite value" if vr is None else f"{vr[0]} .. {vr[1]}"
    text += f"  (slices {', '.join(map(str, info['value_range_slices']))}"
    bad = info["non_finite_voxels"]
    return text + (f"; {bad} NaN/inf voxels)" if bad else ")")
