"""Whole-volume inference: stream slices through a generator, batched along Z.

One reader thread reads and normalises batches of slices, the calling thread runs the network,
one writer thread maps results back to the input's units and dtype and appends them to the
writer; the two queues between them are bounded, so memory does not grow with the slice count
and compute does not wait on disk. Slices too big for the device are cut into overlapping
tiles that are blended with weights that ramp linearly across the overlap (weighted averaging,
not pasting): channel attention pools over its whole input, so a tile's statistics differ from
the slice's and pasting would leave visible seams. docs/upscale.md reports the seam error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .volume.base import context_index, finite_slices
from .progress import progress

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class _Failure:
    """An exception raised in a worker thread, handed to the calling thread."""

    exc: BaseException


@dataclass
class PrecisionState:
    """Per-run record of fp16 batches that had to be recomputed in fp32 (warned once)."""

    fallbacks: int = 0
    warned: bool = field(default=False, repr=False)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> the first CUDA device if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available here")
    return dev


def default_batch_size(device: torch.device) -> int:
    """Slices per forward pass: 8 on CUDA (fills the GPU), 1 on the CPU, where one 160 x 160
    slice's activations already exceed the caches and bigger batches ran slower (0.15 s per
    slice at batch 1 vs 0.24 s at batch 4 for `small`, one thread; docs/performance.md)."""
    return 8 if device.type == "cuda" else 1


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "fp16" on CUDA, "fp32" elsewhere; "fp16"/"fp32" as given."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in ("fp16", "fp32"):
        raise UserError(f"precision must be auto, fp16 or fp32, not {precision!r}")
    return precision


def resolve_window(intensity: dict, window: tuple[float, float] | None,
                   dtype: np.dtype) -> tuple[float, float]:
    """The input intensities mapped to [0, 1]: ``window`` if given, else the checkpoint's
    training window, rescaled to the input's integer range when its dtype differs."""
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise UserError(f"--window {lo:g} {hi:g}: the window is empty (LO must be below HI)")
    else:
        lo, hi = (float(v) for v in intensity["window"])
        trained, given = np.dtype(intensity["dtype"]), np.dtype(dtype)
        if trained != given:
            if trained.kind in "ui" and given.kind in "ui":
                f = np.iinfo(given).max / np.iinfo(trained).max
                lo, hi = lo * f, hi * f
            log.warning("the model was trained on %s intensities in [%g, %g]; the input is %s: "
                        "using [%g, %g]; pass --window LO HI so that marrow and bone land where "
                        "the training scans had them, not the data's min and max "
                        "(docs/upscale.md, Intensities)",
                        trained, *intensity["window"], given, lo, hi)
    if not hi > lo:
        raise UserError(f"intensity window [{lo:g}, {hi:g}] is empty (need LO < HI)")
    return lo, hi


def scale_mismatch(trained_lr_um: list[float] | None,
                   spacing_um: tuple[float, float, float] | None,
                   tolerance: float = 1.5) -> str | None:
    """Why a scan's in-plane voxel size is outside the model's training range [lo, hi] um by
    more than ``tolerance`` times, or None (also when either is unknown). The network works in
    pixels: at another voxel size, trabeculae are thicker or thinner in pixels than any it
    learned from."""
    try:
        lo, hi = (float(v) for v in trained_lr_um)  # type: ignore[union-attr]
        px = float(np.sqrt(spacing_um[1] * spacing_um[2]))  # type: ignore[index]
    except (TypeError, ValueError):  # unknown, or a hand-edited file's odd entry
        return None
    if not 0 < lo <= hi < np.inf or not px > 0 or lo / tolerance <= px <= hi * tolerance:
        return None
    trained = f"{lo:g} um" if lo == hi else f"{lo:g}-{hi:g} um"
    ratio = lo / px if px < lo else px / hi
    return (f"in-plane voxel size {px:g} um, but the model was trained on scans at {trained}: "
            f"bone is {ratio:.1f}x {'larger' if px < lo else 'smaller'} in pixels than any it "
            "learned from, so expect less gain over bicubic (resample the scan to the "
            "training voxel size, or fine-tune the model on your own pairs)")


def output_geometry(shape: tuple[int, int, int],
                    spacing_um: tuple[float, float, float] | None, scale: int
                    ) -> tuple[tuple[int, int, int], tuple[float, float, float] | None]:
    """SR output (z, s*y, s*x) and spacing (z, y/s, x/s): Z is unchanged (one SR slice per
    LR slice, at the LR slice distance), in-plane pixels shrink by ``scale``."""
    z, y, x = shape
    spacing = None if spacing_um is None else (spacing_um[0], spacing_um[1] / scale,
                                               spacing_um[2] / scale)
    return (z, y * scale, x * scale), spacing


def output_origin(origin_mm: tuple[float, ...] | None, direction: tuple[float, ...] | None,
                  spacing_um: tuple[float, float, float] | None, scale: int
                  ) -> tuple[float, float, float] | None:
    """Physical position (mm, ITK's x, y, z) of the SR volume's first voxel centre, so that it
    overlays the LR scan in 3D Slicer: LR pixel i covers SR pixels [s*i, s*i + s), so SR
    pixel 0's centre lies (1/s - 1) / 2 LR pixels from LR pixel 0's, along the in-plane
    axes of ``direction`` (ITK's row-major 3x3; its columns are the axes). None when the
    input has no origin, direction or voxel size."""
    if origin_mm is None or direction is None or spacing_um is None:
        return None
    if len(origin_mm) != 3 or len(direction) != 9:
        return None
    d = np.asarray(direction, np.float64).reshape(3, 3)
    step = (0.5 / scale - 0.5) * np.array([spacing_um[2], spacing_um[1], 0.0]) / 1000.0
    return tuple(float(v) for v in np.asarray(origin_mm, np.float64) + d @ step)


def output_header(metadata: dict, spacing_um: tuple[float, float, float] | None, scale: int,
                  *, source: str, model: str) -> dict:
    """Writer keywords (``create_volume_writer``) that keep a scan's place and record in its
    SR volume: origin and direction for NIfTI/MHA/NRRD (:func:`output_origin`), and for an
    NRecon-style folder the scan's own log entries (``nrecon.carried_log``) plus where the
    volume came from."""
    from .nrecon import OWN_SECTION, carried_log, merge_sections

    direction = metadata.get("direction")
    log_extra = {OWN_SECTION: {"Upscaled from": source, "Model": model, "Scale": str(scale)}}
    if isinstance(metadata.get("log"), dict):  # an NRecon scan: its scanner and settings
        log_extra = merge_sections(carried_log(metadata["log"]), log_extra)
    return {"origin_mm": output_origin(metadata.get("origin_mm"), direction, spacing_um, scale),
            "direction": direction, "nrecon_log": log_extra}


def normalise(slices: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Input units -> float32 in [0, 1] (values outside the window are clipped)."""
    x = (slices.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(x, 0.0, 1.0, out=x)


def denormalise(y: np.ndarray, lo: float, hi: float, dtype: np.dtype) -> np.ndarray:
    """Network output in [0, 1] -> input units and dtype (clipped, rounded)."""
    from .volume import to_dtype

    return to_dtype(y * np.float32(hi - lo) + np.float32(lo), dtype)


def forward_at_precision(model: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """The precision step: one forward, under fp16 autocast when ``precision == "fp16"``."""
    if precision == "fp16":
        with torch.autocast(x.device.type, dtype=torch.float16):
            return model(x).float()
    return model(x)


def sr_forward(model: nn.Module, x: torch.Tensor, *, precision: str,
               state: PrecisionState | None = None,
               step: Callable[[nn.Module, torch.Tensor, str], torch.Tensor] | None = None
               ) -> torch.Tensor:
    """One batch (N, 1, h, w) -> (N, 1, s*h, s*w) float32. A fp16 result with NaN/Inf is
    recomputed in fp32; the first such batch of a run logs one warning."""
    step = step or forward_at_precision
    y = step(model, x, precision)
    if precision != "fp32" and not bool(torch.isfinite(y).all()):
        state = state if state is not None else PrecisionState()
        state.fallbacks += 1
        if not state.warned:
            state.warned = True
            log.warning("fp16 gave NaN/Inf values; recomputing such batches in fp32")
        y = step(model, x, "fp32")
    return y


def self_ensemble(forward: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor:
    """Geometric self-ensemble (EDSR, Lim et al. 2017, sec. 4.4; RCAN's "RCAN+"): the mean of
    ``forward`` over the 8 rotations and flips of ``x`` (N, C, h, w), each mapped back. The
    symmetries keep the SR grid (LR pixel i covers HR [8i, 8i+8)), as in training's
    augmentation; the result is equivariant to them, at 8x the compute."""
    acc = None
    for k in range(4):
        for flip in (False, True):
            t = torch.rot90(x, k, (2, 3))
            y = forward(t.flip(3) if flip else t)
            y = torch.rot90(y.flip(3) if flip else y, -k, (2, 3))
            acc = y if acc is None else acc + y
    return acc / 8


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with >= ``overlap``."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def ramp(length: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """1D blend weight of a tile over ``length`` px. At an interior edge (``lead``/``trail``)
    the weight is 0 over the outer quarter of the ``overlap`` (where zero padding corrupts the
    prediction), rises linearly over its middle half and is 1 beyond; two tiles that overlap
    by ``overlap`` thus get weights summing to 1. Edges on the slice border keep weight 1."""
    w = torch.ones(length)
    if overlap > 0:
        margin = overlap // 4
        i = torch.arange(length, dtype=torch.float32) + 0.5
        r = ((i - margin) / (overlap - 2 * margin)).clamp(0.0, 1.0)
        if lead:
            w = torch.minimum(w, r)
        if trail:
            w = torch.minimum(w, r.flip(0))
    return w


def tiled_forward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                  scale: int, tile: int, overlap: int,
                  output_device: torch.device) -> torch.Tensor:
    """Run ``forward`` on overlapping ``tile`` x ``tile`` LR tiles of ``x`` (N, C, h, w) and
    blend the outputs on ``output_device`` with the weights of :func:`ramp` (every output pixel
    gets a positive total weight as ``tile_starts`` overlaps by at least ``overlap``)."""
    n, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = wsum = None
    for y0 in ys:
        th = min(tile, h)
        wy = ramp(th * scale, overlap * scale, y0 > 0, y0 + th < h)
        for x0 in xs:
            tw = min(tile, w)
            wx = ramp(tw * scale, overlap * scale, x0 > 0, x0 + tw < w)
            pred = forward(x[:, :, y0:y0 + th, x0:x0 + tw]).to(output_device)
            if out is None:
                out = torch.zeros(n, pred.shape[1], h * scale, w * scale, device=output_device)
                wsum = torch.zeros(1, 1, h * scale, w * scale, device=output_device)
            weight = (wy[:, None] * wx[None, :]).to(output_device)
            sl = (slice(None), slice(None), slice(y0 * scale, (y0 + th) * scale),
                  slice(x0 * scale, (x0 + tw) * scale))
            out[sl] += pred * weight
            wsum[sl] += weight
    return out / wsum.clamp_min(1e-6)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up when ``stop`` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    """Blocking get that returns ``_DONE`` when ``stop`` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _DONE


def _reader(volume, batch_size: int, lo: float, hi: float, q: queue.Queue,
            stop: threading.Event, context: int = 0) -> None:
    """Thread: read ``batch_size`` slices at a time, normalise, queue them as (n, C, h, w)
    network inputs (C = 2 * context + 1: each slice with its neighbours); then _DONE. The
    neighbours read for one batch are kept for the next, so every slice is read once."""
    try:
        nz = volume.shape[0]
        held, held_z0 = None, 0  # normalised slices [held_z0, held_z0 + len(held))
        for z0 in range(0, nz, batch_size):
            z1 = min(z0 + batch_size, nz)
            need0, need1 = max(0, z0 - context), min(nz, z1 + context)
            have1 = need0 if held is None else held_z0 + len(held)
            parts = [] if held is None or have1 <= need0 else [held[need0 - held_z0:]]
            if need1 > have1:
                slices = finite_slices(volume.read(have1, need1), volume.path, have1,
                                       "; replace them (e.g. with the background value) first")
                parts.append(normalise(slices, lo, hi))
            held = parts[0] if len(parts) == 1 else np.concatenate(parts)
            held_z0 = need0
            if context == 0:
                batch = held[:, None]
            else:
                batch = held[context_index(z0, z1, context, nz) - need0]
            if not _put(q, batch, stop):
                return
        _put(q, _DONE, stop)
    except BaseException as e:  # handed to the calling thread
        _put(q, _Failure(e), stop)


def _writer(writer, lo: float, hi: float, dtype: np.dtype, q: queue.Queue,
            stop: threading.Event, errors: list, bar) -> None:
    """Thread: map each result batch back to input units/dtype and append it to ``writer``."""
    try:
        while True:
            item = _get(q, stop)
            if item is _DONE:
                return
            writer.write(denormalise(item, lo, hi, dtype))
            bar.update(len(item))
    except BaseException as e:  # handed to the calling thread
        errors.append(e)
        stop.set()


def input_context(model: nn.Module) -> int:
    """Neighbour slices on each side that ``model`` takes with each LR slice (0: 2D; k: its
    ``config.in_channels`` is 2k + 1, a 2.5D model trained on ``pair --context k`` patches)."""
    channels = int(getattr(getattr(model, "config", None), "in_channels", 1))
    if channels < 1 or channels % 2 == 0:
        raise UserError(f"the model takes {channels} input channels: expected 1 (one LR slice) "
                        "or an odd number (a slice and as many neighbours on each side)")
    return (channels - 1) // 2


def upscale_volume(volume, writer, model: nn.Module, *, intensity: dict,
                   window: tuple[float, float] | None = None, batch_size: int | None = None,
                   tile: int = 0, tile_overlap: int = 16, device: str = "auto",
                   output_device: str = "cpu", precision: str = "auto",
                   channels_last: bool = True, quiet: bool = False,
                   queue_size: int = 2, ensemble: bool = False) -> dict:
    """Super-resolve every slice of ``volume`` into ``writer``, in order.

    volume: a :class:`~microct_sr.volume.Volume` (``.shape``, ``.dtype``, ``.read(z0, z1)``).
    writer: a :class:`~microct_sr.volume.VolumeWriter` for (z, s*y, s*x) in the input dtype;
        the caller closes it (or aborts it on error).
    model: a generator in eval mode; moved to ``device`` (and channels_last) in place. A 2.5D
        model (``config.in_channels`` = 2k + 1) gets each slice with k neighbours on each
        side (:func:`context_index`).
    intensity: the checkpoint's ``{"window": [lo, hi], "dtype"}``; ``window`` overrides it.
    batch_size: slices per forward pass (Z batching); None: :func:`default_batch_size`.
        tile / tile_overlap: LR pixels per tile side and the overlap between tiles (tile 0 =
        whole slices).
    device: where the network runs ("auto", "cpu", "cuda[:N]"); output_device: where tiles
        are blended and results gathered before the writer (default "cpu": GPU memory stays
        bounded by one batch of tiles).
    precision: "auto" (fp16 autocast on CUDA, fp32 elsewhere), "fp16" or "fp32".
    channels_last: NHWC memory format (default True: faster on CUDA tensor cores and, measured
        by benchmarks/upscale.py on a 2-core CPU, 1.09x for the ``small`` preset and 1.6x for
        ``paper``; see docs/performance.md).
    queue_size: batches buffered between reader, compute and writer.
    ensemble: average over the 8 rotations and flips (:func:`self_ensemble`; per tile when
        tiled): about +0.1 dB on the default model's held-out scans, 8x the compute.

    Returns ``{"device", "precision", "batch_size", "window", "slices", "seconds",
    "slices_per_second", "compute_seconds", "fp16_fallbacks"}``.
    """
    dev = resolve_device(device)
    batch_size = default_batch_size(dev) if batch_size is None else batch_size
    if batch_size < 1 or tile < 0 or tile_overlap < 0:
        raise UserError("batch size must be >= 1, tile and tile overlap >= 0")
    if tile and tile_overlap >= tile:
        raise UserError(f"tile overlap ({tile_overlap}) must be smaller than the tile ({tile})")
    out_dev = torch.device(output_device)
    prec = resolve_precision(precision, dev)
    lo, hi = resolve_window(intensity, window, volume.dtype)
    scale = int(getattr(getattr(model, "config", None), "scale", 8))
    context = input_context(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=dev, memory_format=fmt).eval()
    state = PrecisionState()

    def plain(x: torch.Tensor) -> torch.Tensor:
        return sr_forward(model, x.contiguous(memory_format=fmt), precision=prec, state=state)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return self_ensemble(plain, x) if ensemble else plain(x)

    nz = volume.shape[0]
    in_q: queue.Queue = queue.Queue(maxsize=queue_size)
    out_q: queue.Queue = queue.Queue(maxsize=queue_size)
    stop, errors = threading.Event(), []
    bar = progress(total=nz, desc="upscale", unit="slice", quiet=quiet)
    threads = [threading.Thread(target=_reader, name="microct-sr-reader", daemon=True,
                                args=(volume, batch_size, lo, hi, in_q, stop, context)),
               threading.Thread(target=_writer, name="microct-sr-writer", daemon=True,
                                args=(writer, lo, hi, np.dtype(volume.dtype), out_q, stop,
                                      errors, bar))]
    t0, compute = time.perf_counter(), 0.0
    try:
        for t in threads:
            t.start()
        with torch.inference_mode():
            while True:
                item = _get(in_q, stop)
                if errors:
                    raise errors[0]
                if isinstance(item, _Failure):
                    raise item.exc
                if item is _DONE:
                    break
                tc = time.perf_counter()
                x = torch.from_numpy(item).to(dev, non_blocking=True)
                if tile and (tile < x.shape[-2] or tile < x.shape[-1]):
                    y = tiled_forward(forward, x, scale=scale, tile=tile, overlap=tile_overlap,
                                      output_device=out_dev)
                else:
                    y = forward(x).to(out_dev)
                y = y[:, 0].float().cpu().numpy()
                compute += time.perf_counter() - tc
                _put(out_q, y, stop)
        _put(out_q, _DONE, stop)
        threads[1].join()
        if errors:
            raise errors[0]
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        bar.close()
    seconds = time.perf_counter() - t0
    return {"device": str(dev), "precision": prec, "batch_size": batch_size,
            "window": [lo, hi], "slices": nz,
            "seconds": seconds, "slices_per_second": nz / seconds if seconds > 0 else None,
            "compute_seconds": compute, "fp16_fallbacks": state.fallbacks,
            "self_ensemble": ensemble}
