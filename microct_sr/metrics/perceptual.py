"""No-reference perceptual metrics with pyiqa: NIQE, Ma (NRQM) and PI = ((10 - Ma) + NIQE) / 2.

Imported only by ``evaluate`` (pyiqa is the optional extra ``microct-sr[iqa]``). Parameter
files are always passed to pyiqa by path and never downloaded here: the folder is
``--iqa-weights DIR``, else ``$MICROCT_SR_IQA_WEIGHTS``, else pyiqa's own cache
(``$TORCH_HOME/hub/pyiqa``, where pyiqa puts what it downloads on a machine with internet).
A missing file makes that metric unavailable (null, with the reason in the notes), never a
made-up number and never a hanging download.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError

NIQE_FILE = "niqe_modelparameters.mat"
NRQM_FILE = "NRQM_model.mat"
WEIGHTS_ENV = "MICROCT_SR_IQA_WEIGHTS"
INSTALL_HINT = ('install the optional extra: pip install "microct-sr[iqa]" (pyiqa, about 1.4 GB '
                'more; licence PolyForm-Noncommercial-1.0.0)')
NIQE_MIN_SIDE = 96  # NIQE's block size: a smaller image has no block to fit


def perceptual_index(niqe: float, ma: float) -> float:
    """PIRM 2018 perceptual index: ``((10 - Ma) + NIQE) / 2`` (lower is better)."""
    return ((10.0 - ma) + niqe) / 2.0


def pyiqa_available() -> bool:
    """True when pyiqa can be imported (checked without importing it)."""
    return importlib.util.find_spec("pyiqa") is not None


def weights_search_path(weights_dir: str | Path | None) -> list[Path]:
    """Folders searched for the parameter files, in order. An explicit folder must exist."""
    if weights_dir is not None:
        p = Path(weights_dir)
        if not p.is_dir():
            raise UserError("IQA weights folder not found (--iqa-weights)", p)
        return [p]
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env)
        if not p.is_dir():
            raise UserError(f"IQA weights folder not found (${WEIGHTS_ENV})", p)
        return [p]
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        hub = Path(torch_home) / "hub"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        hub = Path(xdg) / "torch" / "hub"
    return [hub / "pyiqa"]


def find_file(name: str, folders: list[Path]) -> Path | None:
    """The first ``folders/name`` that exists."""
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass
class PerceptualScorer:
    """Scores 2D gray images on the 0-255 scale with the metrics whose parameter files exist.

    ``wanted`` is a subset of {"niqe", "ma", "pi"}; after construction ``available`` holds the
    ones that can be computed and ``notes`` says why any other is not.
    """

    wanted: set[str]
    weights_dir: str | Path | None = None
    available: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        folders = weights_search_path(self.weights_dir)
        where = ", ".join(str(f) for f in folders)
        niqe_path = find_file(NIQE_FILE, folders)
        nrqm_path = find_file(NRQM_FILE, folders)
        need_niqe = bool(self.wanted & {"niqe", "pi"})
        need_nrqm = bool(self.wanted & {"ma", "pi"})
        if need_niqe and niqe_path is None:
            self.notes.append(f"NIQE unavailable: {NIQE_FILE} not found in {where} "
                              f"(give its folder with --iqa-weights or ${WEIGHTS_ENV})")
        if need_nrqm and nrqm_path is None:
            self.notes.append(f"Ma (NRQM) and PI unavailable: {NRQM_FILE} not found in {where} "
                              "(pyiqa downloads it on a machine with internet; give its folder "
                              f"with --iqa-weights or ${WEIGHTS_ENV}); reported as null")
        self._niqe = self._nrqm = None
        if (need_niqe and niqe_path) or (need_nrqm and nrqm_path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub lookup
            if need_niqe and niqe_path:
                from pyiqa.archs.niqe_arch import NIQE

                self._niqe = NIQE(pretrained_model_path=str(niqe_path)).eval()
            if need_nrqm and nrqm_path:
                from pyiqa.archs.nrqm_arch import NRQM

                self._nrqm = NRQM(pretrained_model_path=str(nrqm_path)).eval()
        if "niqe" in self.wanted and self._niqe is not None:
            self.available.add("niqe")
        if "ma" in self.wanted and self._nrqm is not None:
            self.available.add("ma")
        if "pi" in self.wanted and self._niqe is not None and self._nrqm is not None:
            self.available.add("pi")

    def score(self, img255: np.ndarray) -> dict[str, float]:
        """{metric: value} for one 2D gray image on the 0-255 scale (NaN where undefined)."""
        import torch

        if min(img255.shape) < NIQE_MIN_SIDE:
            raise ValueError(f"a {img255.shape[0]}x{img255.shape[1]} image is smaller than the "
                             f"{NIQE_MIN_SIDE}x{NIQE_MIN_SIDE} block NIQE needs")
        x = torch.from_numpy(np.ascontiguousarray(img255, dtype=np.float64))[None, None]
        out: dict[str, float] = {}
        with torch.no_grad():
            niqe = ma = math.nan
            if self._niqe is not None:
                # pyiqa multiplies a 1-channel input in [0, 1] by 255 and rounds
                niqe = float(self._niqe(x / 255.0).item())
            if self._nrqm is not None:
                # pyiqa scores an RGB image's Y channel on 0-255: give the gray image that scale
                ma = float(self._nrqm(torch.round(x)).item())
        if "niqe" in self.available:
            out["niqe"] = niqe
        if "ma" in self.available:
            out["ma"] = ma
        if "pi" in self.available:
            out["pi"] = perceptual_index(niqe, ma)
        return out


@dataclass(frozen=True)
class Crop:
    """A 2D crop: slice index ``z`` (within the evaluated range) and a square at (y0, x0)."""

    z: int
    y0: int
    x0: int
    size_y: int
    size_x: int


def whole_slices(n_slices: int, height: int, width: int, n_samples: int, crop: int) -> bool:
    """True when every whole slice is scored instead of a sample of crops."""
    return n_samples == 0 or (n_slices <= n_samples and height <= crop and width <= crop)


def sample_crops(n_slices: int, height: int, width: int, n_samples: int, crop: int,
                 seed: int) -> list[Crop]:
    """Seeded crops of ``crop`` x ``crop`` (or the whole slice if smaller), sorted by slice.

    ``n_samples == 0``, or a volume small enough (at most ``n_samples`` slices, each within
    ``crop``), gives one whole-slice crop per slice. The result depends only on the arguments,
    so every method in a comparison is scored on the same crops.
    """
    if whole_slices(n_slices, height, width, n_samples, crop):
        return [Crop(z, 0, 0, height, width) for z in range(n_slices)]
    cy, cx = min(crop, height), min(crop, width)
    rng = np.random.default_rng(seed)
    zs = rng.integers(0, n_slices, size=n_samples)
    ys = rng.integers(0, height - cy + 1, size=n_samples)
    xs = rng.integers(0, width - cx + 1, size=n_samples)
    crops = [Crop(int(z), int(y), int(x), cy, cx) for z, y, x in zip(zs, ys, xs)]
    return sorted(crops, key=lambda c: (c.z, c.y0, c.x0))


def crops_by_slice(crops: list[Crop]) -> Iterator[tuple[int, list[Crop]]]:
    """Group sorted crops by their slice index."""
    i = 0
    while i < len(crops):
        j = i
        while j < len(crops) and crops[j].z == crops[i].z:
            j += 1
        yield crops[i].z, crops[i:j]
        i = j
