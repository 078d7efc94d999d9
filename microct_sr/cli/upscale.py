"""`microct-sr upscale INPUT OUTPUT`: 8x super-resolution of a whole scan, streamed."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ._common import (
    DEVICE,
    FINITE,
    emit_json,
    json_option,
    overwrite_option,
    quiet_option,
    refuse_output_over_input,
    spacing_option,
    volume_inputs,
)

log = logging.getLogger(__name__)


def _model_path(model: Path | None) -> Path:
    """``--model`` or the bundled default; a missing default is a clear UserError."""
    from ..checkpoint import default_model_path
    from ..errors import UserError

    if model is not None:
        return model
    path = default_model_path()
    if not path.exists():
        raise UserError(
            f"no default model: {path} does not exist (an install without the bundled "
            "weights/default.pt, or MICROCT_SR_DEFAULT_MODEL naming a missing file). Pass a "
            "model file with --model PATH (`microct-sr train` writes RUN_DIR/model.pt), or "
            f"copy one to {path}.")
    return path


@click.command("upscale")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(path_type=Path))
@click.option("--model", "model", type=click.Path(path_type=Path), default=None,
              help="Model file (.pt from `microct-sr train`); default: the bundled "
                   "weights/default.pt, or $MICROCT_SR_DEFAULT_MODEL when set.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16"]), default="auto",
              show_default=True, help="auto: fp16 autocast on CUDA, fp32 on the CPU.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Slices per forward pass [default: 8 on CUDA, 1 on the CPU].")
@click.option("--tile", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tile side in LR pixels for slices too big for the device; 0 = whole slices.")
@click.option("--tile-overlap", type=click.IntRange(min=0), default=16, show_default=True,
              help="Overlap between tiles in LR pixels (blended, not pasted).")
@click.option("--self-ensemble", "ensemble", is_flag=True,
              help="Average the network over the 8 rotations and flips of each slice: a "
                   "little sharper and steadier (about +0.1 dB), 8x slower.")
@click.option("--window", type=(FINITE, FINITE), default=None, metavar="LO HI",
              help="Input intensities mapped to the network's [0, 1] (default: the model's "
                   "training window).")
@spacing_option
@overwrite_option
@quiet_option
@json_option
def command(input_path: Path, output_path: Path, model: Path | None, device: str,
            precision: str, batch_size: int | None, tile: int, tile_overlap: int,
            ensemble: bool, window: tuple[float, float] | None, spacing_um, overwrite: bool,
            quiet: bool, as_json: bool) -> None:
    """Super-resolve INPUT (any volume `info` reads) 8x in-plane into OUTPUT (.tif, .ome.tif,
    .nii.gz, .mha, .nrrd, or a folder for NRecon-style slices), in the input's dtype."""
    from .. import __version__
    from ..checkpoint import load_model
    from ..infer import output_geometry, output_header, scale_mismatch, upscale_volume
    from ..volume import create_volume_writer, open_volume

    model_file = _model_path(model)
    with open_volume(input_path, spacing_um=spacing_um) as vol:
        refuse_output_over_input([("OUTPUT", output_path)],
                                 [model_file, *volume_inputs(vol)])
        net, ckpt = load_model(model_file)
        s = net.config.scale
        shape, spacing = output_geometry(vol.shape, vol.spacing_um, s)  # open_volume warned
        prov = ckpt["provenance"] if isinstance(ckpt["provenance"], dict) else {}
        mismatch = scale_mismatch(prov.get("lr_pixel_um"), vol.spacing_um)
        if mismatch:
            log.warning("%s: %s", input_path, mismatch)
        header = output_header(vol.metadata, vol.spacing_um, s, source=str(input_path),
                               model=str(model_file))
        with create_volume_writer(
                output_path, shape, vol.dtype, spacing, overwrite=overwrite, **header,
                description=f"microct-sr {__version__} upscale x{s} of {input_path.name} "
                            f"with {model_file.name}") as writer:
            stats = upscale_volume(vol, writer, net, intensity=ckpt["intensity"], window=window,
                                   batch_size=batch_size, tile=tile, tile_overlap=tile_overlap,
                                   device=device, precision=precision, quiet=quiet,
                                   ensemble=ensemble)
        summary = {"input": str(input_path), "output": str(output_path),
                   "shape": list(shape),
                   "spacing_um": None if spacing is None else list(spacing),
                   "dtype": str(writer.dtype), "model": str(model_file),
                   "device": stats["device"], "precision": stats["precision"],
                   "self_ensemble": ensemble, "seconds": round(stats["seconds"], 3),
                   "slices_per_second": round(stats["slices_per_second"] or 0.0, 3)}
    click.echo(f"upscaled {input_path} -> {output_path}: {' x '.join(map(str, shape))} "
               f"{summary['dtype']} "
               f"in {summary['seconds']:.1f} s ({summary['slices_per_second']:.2f} slices/s, "
               f"{stats['device']}, {stats['precision']})", err=True)
    if as_json:
        emit_json(summary)
