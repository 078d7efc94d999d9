"""Options and helpers shared by the subcommands (parsing only; no numerics here)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ..errors import UserError


def parse_spacing(value: str | None) -> tuple[float, float, float] | None:
    """``"10"`` -> (10, 10, 10); ``"80,10,10"`` or ``"80 10 10"`` -> (z, y, x) in micrometres."""
    if value is None or value == "":
        return None
    parts = value.replace(",", " ").split()
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'Z,Y,X' in micrometres")
    if len(nums) == 1:
        nums = nums * 3
    from ..volume.base import SPACING_RANGE_UM

    lo, hi = SPACING_RANGE_UM
    if len(nums) != 3 or any(not (0 < n < math.inf) for n in nums):
        raise click.BadParameter(
            f"{value!r}: give one positive finite value or three as Z,Y,X (um)")
    if any(not lo <= n <= hi for n in nums):
        raise click.BadParameter(f"{value!r}: voxel sizes must lie in {lo:g}-{hi:g} um")
    if any(n < 1 for n in nums):  # a micro-CT voxel below 1 um: millimetres, most likely
        logging.getLogger("microct_sr").warning(
            "--spacing-um %s: below 1 um; the option takes micrometres (80 for an 80 um "
            "scan), not millimetres", value)
    return (nums[0], nums[1], nums[2])


def spacing_option(f):
    """``--spacing-um``: overrides the voxel size the reader found."""
    return click.option(
        "--spacing-um", "spacing_um", default=None,
        callback=lambda ctx, param, v: parse_spacing(v),
        help="Voxel size in um, one value (isotropic) or Z,Y,X; overrides the file's metadata.")(f)


class FiniteFloat(click.ParamType):
    """A float that is neither inf nor nan, optionally bounded: ``FiniteFloat(0, open_min=True)``
    accepts only positive values. Bad values are click usage errors naming the option (exit 2)."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None,
                 open_min: bool = False):
        self.min, self.max, self.open_min = min, max, open_min

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low_bad = self.min is not None and (x < self.min or (self.open_min and x == self.min))
        if low_bad or (self.max is not None and x > self.max):
            self.fail(f"{value!r} is not {self._range()}", param, ctx)
        return x

    def _range(self) -> str:
        """``> 0``, ``in [-1, 1]`` ... for messages."""
        low = None if self.min is None else f"{'>' if self.open_min else '>='} {self.min:g}"
        if self.max is None:
            return low or "finite"
        return f"<= {self.max:g}" if low is None else f"{low} and <= {self.max:g}"


FINITE = FiniteFloat()
POSITIVE = FiniteFloat(0.0, open_min=True)
NON_NEGATIVE = FiniteFloat(0.0)


class DeviceParam(click.ParamType):
    """``--device``: 'auto', 'cpu', 'cuda' or 'cuda:N'; a CUDA device that is not there is a
    usage error (exit 2) naming the option, before any work starts."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        problem = device_problem(text)
        if problem:
            self.fail(f"{value!r}: {problem}", param, ctx)
        return text


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None ('auto', 'cpu', 'cuda', 'cuda:N')."""
    if device in ("auto", "cpu"):
        return None
    kind, sep, index = device.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        return "expected auto, cpu, cuda or cuda:N"
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available here (use cpu or auto)"
    if sep and int(index) >= torch.cuda.device_count():
        return f"there is no CUDA device {index} ({torch.cuda.device_count()} visible)"
    return None


DEVICE = DeviceParam()


def refuse_output_over_input(outputs: Iterable[tuple[str, str | Path | None]],
                             inputs: Iterable[str | Path | None]) -> None:
    """UserError (exit 2) when an output would replace an input, even with --overwrite.

    ``outputs`` are (option label, path) of what a command replaces: the file, or the folder
    when a folder is replaced as a whole. It is refused if it resolves to an input (symlinks and
    hard links included) or to a folder holding one. An output inside an input folder is
    allowed (a report written next to the slices) unless it is itself an input: pass a folder
    input's member files (``Volume.files``) as inputs to protect them."""
    resolved = [(p, Path(p).resolve()) for p in inputs if p is not None]
    for label, out in outputs:
        if out is None:
            continue
        target = Path(out).resolve()
        for given, src in resolved:
            if _same_path(target, src):
                raise UserError(f"{label} is the input {given}; refusing to replace it", out)
            if target in src.parents:
                raise UserError(f"{label} holds the input {given}; refusing to replace it", out)


def volume_inputs(vol: Any) -> list[Path]:
    """An opened volume's path and, for a slice folder or DICOM series, the files it reads."""
    return [Path(vol.path), *getattr(vol, "files", ())]


def _same_path(a: Path, b: Path) -> bool:
    """Resolved paths equal, or the same existing file under two names."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON object on stdout (logs go to stderr).")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace an existing output.")


def emit_json(obj: Any) -> None:
    """Print exactly one JSON document on stdout; NaN and Inf become null (strict JSON
    parsers, jq included, reject the NaN/Infinity tokens Python would write)."""
    global _documents
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    _documents += 1


_documents = 0


def json_documents() -> int:
    """How many JSON documents this process printed (the CLI adds no error document after a
    run that printed its own)."""
    return _documents


def _finite(o: Any) -> Any:
    """``o`` with every non-finite float (numpy's too) replaced by None, recursively."""
    import numpy as np

    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
