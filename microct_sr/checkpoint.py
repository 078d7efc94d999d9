"""Model files: save atomically, load safely (``torch.load(weights_only=True)``), validate.

A model file is a plain dict of tensors and built-in types, so it loads without executing
pickled code::

    {"format": "microct-sr", "format_version": 1, "microct_sr_version": "0.1.0",
     "config": ModelConfig.to_dict(), "state_dict": {...},
     "intensity": {"window": [lo, hi], "dtype": "uint8"},
     "provenance": {"stage", "iterations", "data", "created"}, ...extra}

Training-state checkpoints are the same dict plus ``"train_state"``; :func:`load_model` ignores
it. Every problem with a file (missing, not ours, truncated, newer format, weights that do not
fit the config) is a :class:`~microct_sr.errors.UserError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
import site
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .atomic import atomic_write
from .errors import UserError
from .models import ModelConfig, build_model

FORMAT = "microct-sr"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "config", "state_dict", "intensity", "provenance")

# The bundled model: weights/default.pt at the repository root (beside the package in an
# editable or source install), which a wheel installs as data under <prefix>/share/microct-sr/
# (pyproject's data-files). MICROCT_SR_DEFAULT_MODEL overrides both (tests, site installs).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "default.pt"
SHARE_SUBPATH = Path("share") / "microct-sr" / "weights" / "default.pt"


def installed_model_candidates() -> list[Path]:
    """Where the bundled model may be, in order: the checkout, then the wheel's data
    directory for this interpreter's prefix and for a ``pip install --user``."""
    prefixes = [sys.prefix, getattr(site, "USER_BASE", None) or ""]
    return [DEFAULT_MODEL] + [Path(p) / SHARE_SUBPATH for p in prefixes if p]


def default_model_path() -> Path:
    """``MICROCT_SR_DEFAULT_MODEL`` if set (read at call time), else the first of
    :func:`installed_model_candidates` that exists (the checkout's path when none does, so
    the error message names where the model belongs)."""
    env = os.environ.get("MICROCT_SR_DEFAULT_MODEL")
    if env:
        return Path(env)
    return next((p for p in installed_model_candidates() if p.is_file()), DEFAULT_MODEL)


def _intensity_dict(intensity: dict) -> dict:
    """Validate and normalise ``{"window": [lo, hi], "dtype": name}``."""
    try:
        lo, hi = (float(v) for v in intensity["window"])
        dtype = str(intensity["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"intensity must be {{'window': [lo, hi], 'dtype': name}}: {e}") from e
    if not hi > lo:
        raise ValueError(f"intensity window [{lo}, {hi}] is empty")
    return {"window": [lo, hi], "dtype": dtype}


def save_model(path: str | Path, model: nn.Module, config: ModelConfig, *, intensity: dict,
               provenance: dict, extra: dict | None = None) -> Path:
    """Write ``model``'s weights with its config, intensity window and provenance, atomically
    (temporary file in the same folder, then rename). Returns the path."""
    path = Path(path)
    prov = {"stage": None, "iterations": None, "data": None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    prov.update(provenance)
    ckpt: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "microct_sr_version": __version__,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "intensity": _intensity_dict(intensity), "provenance": prov}
    for key, value in (extra or {}).items():
        if key in ckpt:
            raise ValueError(f"extra key {key!r} would overwrite a checkpoint field")
        ckpt[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a model file; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir() and (path / "model.pt").is_file():
            raise UserError(f"a training run folder, not a model file: pass "
                            f"{path / 'model.pt'}", path)
        raise UserError("model file not found" if not path.exists() else "not a file", path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; so does save_model
        raise UserError("not a readable PyTorch model file (truncated, or another format: "
                        "not the zip archive torch.save writes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError("not a microct-sr model file (it holds Python objects that a model "
                        "file never contains; refusing to unpickle them): "
                        f"{_reason(e)}", path) from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... here
        raise UserError("not a readable PyTorch model file (truncated or corrupt?): "
                        f"{_reason(e)}", path) from None
    _validate(ckpt, path)
    return ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _reason(e: BaseException) -> str:
    """The informative line of a torch.load error (its first lines are generic advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Trying to load", "Unsupported", "Unpickler error")):
            return ln
    return lines[-1] if lines else type(e).__name__


def _validate(ckpt: Any, path: Path) -> None:
    """Format, version, required keys, config and intensity of a loaded dict."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError("not a microct-sr model file (no 'format': 'microct-sr' entry; a bare "
                        "state_dict or another project's checkpoint cannot be used)", path)
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise UserError(f"model file format version {version!r} is not supported by microct-sr "
                        f"{__version__} (supports {FORMAT_VERSION}); it was written by "
                        f"microct-sr {ckpt.get('microct_sr_version', '?')}", path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"model file lacks {', '.join(missing)}", path)
    try:
        ModelConfig.from_dict(ckpt["config"])
        ckpt["intensity"] = _intensity_dict(ckpt["intensity"])
    except (TypeError, ValueError) as e:
        raise UserError(f"incompatible model file: {e}", path) from None


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict]:
    """Rebuild the network from the file alone: ``(model.eval() on device, checkpoint)``."""
    ckpt = load_checkpoint(path)
    try:
        config = ModelConfig.from_dict(ckpt["config"])
        model = build_model(config)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, ValueError, TypeError, ImportError) as e:
        raise UserError(f"weights do not fit the model config in the file: {_first_line(e)}",
                        path) from None
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged run's weights: every output would be NaN (written as 0)
        raise UserError(f"{len(bad)} weight tensor(s) hold NaN or Inf values (first: {bad[0]}); "
                        "the run that wrote this file diverged", path)
    return model.to(device).eval(), ckpt
