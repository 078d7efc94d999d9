"""`microct-sr evaluate`: PSNR, SSIM, NIQE, Ma, PI and bone morphometry of SR volumes vs HR."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from ._common import (
    emit_json,
    json_option,
    overwrite_option,
    quiet_option,
    refuse_output_over_input,
    spacing_option,
    volume_inputs,
)

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _parse_named(values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise click.BadParameter(f"{v!r}: expected NAME=PATH", param_hint="--sr")
        out.append((name.strip(), path.strip()))
    return out


def _methods(paths: tuple[str, ...], hr: str | None, srs: tuple[str, ...], lr: str | None,
             bicubic: bool, label: str | None) -> tuple[str, list[tuple[str, str]], bool]:
    """(HR path, [(label, SR path)], comparison form?) from either form of the command."""
    if paths and (hr or srs):
        raise click.UsageError("give either SR HR, or --hr HR --sr NAME=PATH ..., not both")
    if bicubic != bool(lr):
        raise click.UsageError("--bicubic needs --lr LR (and --lr is only used by --bicubic)")
    if paths:
        if len(paths) != 2:
            raise click.UsageError("expected two paths: SR HR")
        sr_path, hr_path = paths
        return hr_path, [(label or Path(sr_path).stem or "SR", sr_path)], bool(bicubic)
    if not hr:
        raise click.UsageError("give SR HR, or --hr HR with --sr NAME=PATH and/or --bicubic")
    methods = _parse_named(srs)
    if not methods and not bicubic:
        raise click.UsageError("--hr needs at least one --sr NAME=PATH or --bicubic --lr LR")
    return hr, methods, True


def _check_plot_suffix(plot_path: str | None) -> None:
    """--plot must name a format we draw (before any metric is computed)."""
    if plot_path is not None and Path(plot_path).suffix.lower() not in PLOT_SUFFIXES:
        raise click.BadParameter(f"{plot_path!r}: the file name must end in "
                                 f"{', '.join(PLOT_SUFFIXES)}", param_hint="'--plot'")


def _check_outputs(overwrite: bool, outputs: dict[str, str | None],
                   inputs: list[str | None]) -> None:
    """Output folders exist, existing outputs need --overwrite, no output is an input path
    (the files of folder inputs are checked once they are open: ``_refuse_over_volumes``)."""
    refuse_output_over_input(outputs.items(), inputs)
    for p in outputs.values():
        if p is None:
            continue
        path = Path(p)
        if not path.parent.is_dir():
            raise UserError("output folder does not exist", path.parent)
        if path.exists() and not overwrite:
            raise UserError("exists; use --overwrite to replace it", path)


def _refuse_over_volumes(outputs: dict[str, str | None]):
    """A check of the opened volumes: no report is written over a file one is read from (a
    slice of a folder input)."""
    return lambda volumes: refuse_output_over_input(
        outputs.items(), [f for vol in volumes for f in volume_inputs(vol)])


@click.command("evaluate")
@click.argument("paths", nargs=-1, metavar="[SR HR]")
@click.option("--hr", "hr", default=None, help="HR volume (comparison form).")
@click.option("--sr", "srs", multiple=True, metavar="NAME=PATH",
              help="An SR volume to compare, repeatable (comparison form).")
@click.option("--lr", "lr", default=None, help="LR volume for --bicubic.")
@click.option("--bicubic", is_flag=True,
              help="Add the bicubic 8x upscaling of --lr as a row (align_corners=False).")
@click.option("--metrics", default=None, metavar="LIST",
              help="Comma list of psnr,ssim,niqe,ma,pi,morph (default: all available).")
@click.option("--crop-border", type=click.IntRange(min=0), default=4, show_default=True,
              help="Pixels dropped at each slice edge for the 2D metrics (PIRM).")
@click.option("--slices", default=None, metavar="A:B",
              help="Evaluate SR slices A..B-1 only.")
@click.option("--perceptual-sample", type=click.IntRange(min=0), default=16, show_default=True,
              help="Seeded 2D crops scored by NIQE/Ma/PI (0: every whole slice).")
@click.option("--perceptual-crop", type=click.IntRange(min=96), default=256, show_default=True,
              help="Side of the perceptual crops in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the crop sample.")
@click.option("--hr-slice", type=click.Choice(["middle", "mean"]), default="middle",
              show_default=True,
              help="For SR with the LR's slice count: compare SR slice k with HR slice 8k+4 "
                   "(middle) or the mean of HR slices 8k..8k+7.")
@click.option("--iqa-weights", default=None, type=click.Path(),
              help="Folder with niqe_modelparameters.mat / NRQM_model.mat "
                   "(default: $MICROCT_SR_IQA_WEIGHTS, then pyiqa's cache).")
@click.option("--csv", "csv_path", default=None, type=click.Path(), help="Per-slice CSV.")
@click.option("--table", "table_path", default=None, type=click.Path(),
              help="Write the Table-1-style Markdown table here.")
@click.option("--plot", "plot_path", default=None, type=click.Path(),
              help="PSNR-PI (or PSNR-NIQE) plane and box plots (PNG, PDF or SVG).")
@click.option("--label", default=None, help="Method name in the single form (default: SR name).")
@spacing_option
@json_option
@quiet_option
@overwrite_option
def command(paths, hr, srs, lr, bicubic, metrics, crop_border, slices, perceptual_sample,
            perceptual_crop, seed, hr_slice, iqa_weights, csv_path, table_path, plot_path, label,
            spacing_um, as_json, quiet, overwrite) -> None:
    """Compare SR volume(s) with the HR scan: PSNR, SSIM, NIQE, Ma, PI, morphometry.

    \b
    Single form:      microct-sr evaluate SR HR
    Comparison form:  microct-sr evaluate --hr HR --sr NAME=PATH ... [--bicubic --lr LR]
    """
    from ..metrics.evaluate import EvalOptions, evaluate_files, parse_metrics, parse_slices
    from ..metrics import report

    hr_path, methods, comparison = _methods(paths, hr, srs, lr, bicubic, label)
    wanted, explicit = parse_metrics(metrics)
    _check_plot_suffix(plot_path)
    outputs = {"--csv": csv_path, "--table": table_path, "--plot": plot_path}
    _check_outputs(overwrite, outputs, [hr_path, lr, iqa_weights, *(p for _, p in methods)])
    opts = EvalOptions(metrics=wanted, crop_border=crop_border, slices=parse_slices(slices),
                       perceptual_sample=perceptual_sample, perceptual_crop=perceptual_crop,
                       seed=seed, hr_slice=hr_slice, spacing_um=spacing_um,
                       metrics_explicit=explicit, quiet=quiet)
    results = evaluate_files(hr_path, methods, opts, lr_path=lr, weights_dir=iqa_weights,
                             check_inputs=_refuse_over_volumes(outputs))
    if csv_path:
        report.write_csv(csv_path, results, replace=overwrite)
    if table_path:
        report.write_text(table_path, report.format_table(results), replace=overwrite)
    if plot_path:
        report.plot(plot_path, results, replace=overwrite)
    if as_json:
        if comparison:
            emit_json([{"label": r.label, **r.summary} for r in results])
        else:
            emit_json(results[0].summary)
    else:
        click.echo(report.format_report(results), nl=False)
