"""`microct-sr train`: two-stage training (psnr, then gan) on `pair` output folders."""

from __future__ import annotations

import dataclasses
import os

import click
from click.core import ParameterSource

from ..models import ARCHS, ModelConfig
from ..models.blocks import UPSAMPLERS
from ._common import (
    DEVICE,
    FINITE,
    NON_NEGATIVE,
    POSITIVE,
    emit_json,
    json_option,
    quiet_option,
)

# ModelConfig fields a user may set on the command line (--n-feats, --n-rcabs, ...)
_MODEL_FIELDS = [f for f in dataclasses.fields(ModelConfig)
                 if f.name not in ("arch", "in_channels", "out_channels", "scale", "extra")]
_PYTYPE = {"int": int, "float": FINITE, "str": str}
# command-line parameters whose TrainConfig field has another name
_FIELD = {"gan_weight": "w_gan", "percep_weight": "w_percep"}


def _given(ctx: click.Context) -> set[str]:
    """The TrainConfig fields set on the command line (not left at their defaults): on
    --resume the others keep the run's saved values."""
    return {_FIELD.get(name, name) for name in ctx.params
            if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}


def _model_options(f):
    for fld in reversed(_MODEL_FIELDS):
        kind = (click.Choice(list(UPSAMPLERS)) if fld.name == "upsampler"
                else _PYTYPE[fld.type])
        f = click.option(f"--{fld.name.replace('_', '-')}", fld.name, type=kind,
                         default=None,
                         help=f"Model: {fld.name} (default: the preset's).")(f)
    return f


@click.command("train")
@click.option("--stage", type=click.Choice(["psnr", "gan"]), required=True,
              help="psnr: the pixel loss only (L1, or MSE with --pixel-loss mse). gan: the pixel "
                   "loss + 0.1 RaGAN + 0.5 VGG19 perceptual (needs --init).")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(),
              help="A `microct-sr pair` output folder (or a folder of them); repeat to pool.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Run folder: split.json, train_log.csv, checkpoints/, model.pt.")
@click.option("--arch", type=click.Choice(list(ARCHS)), default="r2rcan", show_default=True)
@click.option("--preset", type=click.Choice(["paper", "small", "tiny"]), default="paper",
              show_default=True, help="Network size and schedule (paper: sec. 3.2).")
@_model_options
@click.option("--iters", type=int, default=None,
              help="Iterations (default: preset's; paper 300k psnr / 150k gan).")
@click.option("--batch-size", type=int, default=None,
              help="Global batch of LR patches, split over processes (default: preset's; "
                   "paper 64).")
@click.option("--lr", type=POSITIVE, default=1e-4, show_default=True,
              help="Adam learning rate, halved every --lr-step iterations.")
@click.option("--lr-step", type=int, default=100_000, show_default=True,
              help="Halve the learning rate every N iterations (the paper: 1e5; short "
                   "fine-tuning runs settle better with a few halvings).")
@click.option("--init", type=click.Path(), default=None,
              help="Start from this model file (a psnr-stage model for --stage gan, or "
                   "weights/default.pt to fine-tune).")
@click.option("--pixel-loss", type=click.Choice(["l1", "mse"]), default="l1", show_default=True,
              help="Pixel loss: l1 (the paper's) or mse (the PSNR-optimal mean; scores higher "
                   "PSNR where the LR leaves the HR uncertain, e.g. strongly smoothed scans).")
@click.option("--ema", "ema", type=NON_NEGATIVE, default=0.0, show_default=True, metavar="DECAY",
              help="Keep an exponential moving average of the generator weights with this "
                   "decay (e.g. 0.999, with a warm-up); validation, the best checkpoint and "
                   "model.pt use it. 0: off.")
@click.option("--gray-augment", type=NON_NEGATIVE, default=0.0, show_default=True, metavar="P",
              help="With probability P map each training pair's gray levels by a random "
                   "gain and offset (the same on LR and HR): robustness to scanners' "
                   "windows and contrast. 0: off.")
@click.option("--gan-weight", type=NON_NEGATIVE, default=0.1, show_default=True,
              help="gan stage: weight of the relativistic GAN loss (the paper: 0.1).")
@click.option("--percep-weight", type=NON_NEGATIVE, default=0.5, show_default=True,
              help="gan stage: weight of the VGG19 perceptual loss (the paper: 0.5). 0 drops "
                   "the term and the need for VGG19 weights (not the paper's GAN stage).")
@click.option("--disc-feats", type=int, default=None,
              help="gan stage: the U-Net discriminator's first-level channels (default: the "
                   "preset's; paper 64, small 32). Its cost grows with the square.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--val-every", type=int, default=None, help="Validation PSNR every N iterations.")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N iterations.")
@click.option("--keep", type=int, default=3, show_default=True,
              help="Checkpoints kept (newest N plus the best by validation PSNR).")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Data-loading worker processes.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision (bf16, or fp16 with a GradScaler); default on for CUDA.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms only.")
@click.option("--vgg-weights", type=click.Path(), default=None,
              help="torchvision's vgg19-dcbb9e9d.pth (default: torchvision's cache).")
@click.option("--split-file", type=click.Path(), default=None,
              help='JSON {"train": [scan ids], "val": [...], "test": [...]}.')
@json_option
@quiet_option
@click.pass_context
def command(ctx: click.Context, stage, data, out, arch, preset, iters, batch_size, lr, lr_step,
            init, pixel_loss, ema, gray_augment, gan_weight, percep_weight, disc_feats, resume,
            val_every, save_every, keep, workers, device, amp, seed, deterministic, vgg_weights,
            split_file, as_json, quiet, **model_options) -> None:
    """Train a generator on LR/HR patch pairs (one stage per call)."""
    from ..train import TrainConfig, train

    overrides = {k: v for k, v in model_options.items() if v is not None}
    config = TrainConfig(
        data=list(data), out=out, stage=stage, arch=arch, preset=preset,
        model_overrides=overrides, iters=iters, batch_size=batch_size, lr=lr, lr_step=lr_step,
        init=init, ema=ema, pixel_loss=pixel_loss, gray_augment=gray_augment, w_gan=gan_weight,
        w_percep=percep_weight, disc_feats=disc_feats, resume=resume, val_every=val_every,
        save_every=save_every, keep=keep, workers=workers, device=device, amp=amp, seed=seed,
        deterministic=deterministic, vgg_weights=vgg_weights, split_file=split_file, quiet=quiet)
    summary = train(config, given=_given(ctx))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"model: {summary['model']} ({summary['iterations']} iterations, "
                   f"val PSNR {summary['val_psnr']} dB, bicubic {summary['bicubic_val_psnr']} dB)")
