"""Options and helpers shared by the subcommands (parsing only; no numerics here)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


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
    if len(nums) != 3 or any(not (n > 0) for n in nums):
        raise click.BadParameter(f"{value!r}: give one positive value or three as Z,Y,X (um)")
    return (nums[0], nums[1], nums[2])


def spacing_option(f):
    """``--spacing-um``: overrides the voxel size the reader found."""
    return click.option(
        "--spacing-um", "spacing_um", default=None,
        callback=lambda ctx, param, v: parse_spacing(v),
        help="Voxel size in um, one value (isotropic) or Z,Y,X; overrides the file's metadata.")(f)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON object on stdout (logs go to stderr).")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace an existing output.")


def emit_json(obj: Any) -> None:
    """Print exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    import numpy as np
    from pathlib import Path

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
