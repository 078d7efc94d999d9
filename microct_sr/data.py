"""Training data: LR/HR patch pairs from one or more ``microct-sr pair`` folders.

A pair folder holds ``lr/<patch_id>.tif``, ``hr/<patch_id>.tif`` (HR = factor x LR in-plane)
and ``pairs.csv`` (patch_id, scan_id, ...); a folder of pair folders stands for all of them.
An LR patch is 2D, or with ``pair --context N`` a (2N+1, h, w) stack of the LR slice and its N
neighbours on each side: the page count is the network's number of input channels.
Folders are pooled; the train/val/test split is by
``scan_id`` (one specimen/animal: give the same scan_id to every simulated setting of the same
specimen so no specimen leaks across the split). Augmentation: the 8 symmetries of the square
(rotations by 0/90/180/270 degrees, each with or without a flip), the same for LR and HR.

Batches come from :class:`IterationBatchSampler`, whose batch at iteration t depends only on
(seed, t): a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tifffile
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .atomic import atomic_write
from .errors import UserError

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
SPLIT_KEYS = ("train", "val", "test")


@dataclass(frozen=True)
class Pair:
    """One LR/HR patch pair on disk."""

    folder: Path
    patch_id: str
    scan_id: str

    @property
    def lr_path(self) -> Path:
        return self.folder / "lr" / f"{self.patch_id}.tif"

    @property
    def hr_path(self) -> Path:
        return self.folder / "hr" / f"{self.patch_id}.tif"


def pair_folders(dirs: Sequence[str | Path]) -> list[Path]:
    """The pair folders named by ``dirs``: each is a pair folder, or a folder whose direct
    subfolders are (e.g. one per simulated scanner setting), taken in name order."""
    if not dirs:
        raise UserError("no --data folder given")
    found: list[Path] = []
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise UserError("data folder not found", folder)
        if (folder / "pairs.csv").is_file():
            found.append(folder)
            continue
        subs = sorted(p.parent for p in folder.glob("*/pairs.csv"))
        if not subs:
            raise UserError("no pairs.csv here or in its subfolders: not a `microct-sr pair` "
                            "output folder", folder)
        found += subs
    return _unique_folders(found)


def _unique_folders(folders: list[Path]) -> list[Path]:
    """``folders`` without repeats of the same resolved folder (a folder given twice, or with
    its parent), in first-seen order; a warning names what was dropped."""
    seen: dict[Path, Path] = {}
    for folder in folders:
        if folder.resolve() in seen:
            log.warning("pair folder %s is given more than once (as %s); counted once", folder,
                        seen[folder.resolve()])
        else:
            seen[folder.resolve()] = folder
    return list(seen.values())


def read_pairs(dirs: Sequence[str | Path]) -> list[Pair]:
    """All pairs listed in the ``pairs.csv`` of each pair folder (see :func:`pair_folders`);
    UserError naming a bad folder."""
    pairs: list[Pair] = []
    for folder in pair_folders(dirs):
        csv_path = folder / "pairs.csv"
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"patch_id", "scan_id"} <= set(reader.fieldnames):
                raise UserError("pairs.csv lacks the patch_id and scan_id columns", csv_path)
            rows = [Pair(folder, r["patch_id"], r["scan_id"]) for r in reader]
        if not rows:
            raise UserError("pairs.csv lists no patches (empty data folder)", csv_path)
        for p in rows:  # a moved or half-copied folder fails here, not hours into a run
            for f in (p.lr_path, p.hr_path):
                if not f.is_file():
                    raise UserError(f"patch {p.patch_id} is listed in pairs.csv but missing", f)
        pairs += rows
    return pairs


def lr_pixel_range(pairs: Sequence[Pair], scan_ids: Sequence[str]) -> list[float] | None:
    """[min, max] in-plane LR pixel size (um) of ``scan_ids``, from each pair folder's
    ``registration.json`` (HR pixel x factor); None when no scan's size is known. Recorded in
    the model file so that ``upscale`` can warn about a scan at another scale."""
    keep, sizes = set(scan_ids), []
    for folder in sorted({p.folder for p in pairs}):
        try:
            regs = json.loads((folder / "registration.json").read_text())
        except (OSError, ValueError):
            continue  # an older or hand-made folder: the scale stays unknown
        for r in regs if isinstance(regs, list) else []:
            hr_um, factor = r.get("hr_pixel_um"), r.get("factor")
            if r.get("scan_id") in keep and hr_um and factor:
                sizes.append(float(hr_um) * int(factor))
    return [min(sizes), max(sizes)] if sizes else None


def patch_dtype(pairs: Sequence[Pair]) -> str:
    """The dtype of the patches (see :func:`patch_format`)."""
    return patch_format(pairs)[0]


def lr_channels(lr: np.ndarray) -> int:
    """Input channels of an LR patch: 1 for a 2D patch, the page count of a stack."""
    return 1 if lr.ndim == 2 else int(lr.shape[0])


def patch_format(pairs: Sequence[Pair]) -> tuple[str, int]:
    """(dtype, LR channels) of the patches: read from the LR and HR patch of the first pair of
    each scan in each pair folder (not every patch); UserError naming two files when they
    differ (8- and 16-bit data pooled would need two intensity windows; 2D and 2.5D patches,
    two networks)."""
    # per scan, not per folder: a folder made by hand or by an older `pair` may mix dtypes,
    # and a scan left out of the window estimate (a val scan) would be scaled silently wrong
    first: dict[tuple[Path, str], Pair] = {}
    for p in pairs:
        first.setdefault((p.folder, p.scan_id), p)
    found = _DtypeCheck()
    channels: tuple[Path, int] | None = None
    for p in first.values():
        lr = _read_patch(p.lr_path)
        found.add(p.lr_path, lr.dtype)
        found.add(p.hr_path, _read_patch(p.hr_path).dtype)
        if lr_channels(lr) % 2 == 0:
            raise UserError(f"LR patch of {lr_channels(lr)} slices: a 2.5D patch holds the "
                            "slice and as many neighbours on each side (an odd count)",
                            p.lr_path)
        if channels is None:
            channels = (p.lr_path, lr_channels(lr))
        elif lr_channels(lr) != channels[1]:
            raise UserError(f"mixed LR patch depths: {channels[0]} has {channels[1]} slice(s), "
                            f"{p.lr_path} has {lr_channels(lr)}; pair every scan with the same "
                            "--context")
    return found.dtype, (channels[1] if channels else 1)


class _DtypeCheck:
    """Remembers the first patch's dtype; UserError for a patch of another dtype."""

    def __init__(self):
        self.first: tuple[Path, np.dtype] | None = None

    def add(self, path: Path, dtype: np.dtype) -> None:
        if self.first is None:
            self.first = (path, dtype)
        elif dtype != self.first[1]:
            raise UserError(f"mixed patch dtypes: {self.first[0]} is {self.first[1]}, {path} is "
                            f"{dtype}; train on one dtype (one intensity window) at a time")

    @property
    def dtype(self) -> str:
        return "" if self.first is None else str(self.first[1])


def make_split(scan_ids: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Split the distinct scan ids 80/10/10 into train/val/test (shuffled with ``seed``).

    With 2 scans: 1 train, 1 val. With 3 or more: at least one val and one test scan.
    """
    ids = sorted(set(scan_ids))
    rng = np.random.default_rng(seed)
    ids = [ids[i] for i in rng.permutation(len(ids))]
    n = len(ids)
    if n == 1:
        n_val = n_test = 0
    elif n == 2:
        n_val, n_test = 1, 0
    else:
        n_val = n_test = max(1, round(0.1 * n))
    split = {"train": sorted(ids[n_val + n_test:]), "val": sorted(ids[:n_val]),
             "test": sorted(ids[n_val:n_val + n_test])}
    if n < 3:
        log.warning("only %d scan(s) in the data: split %s (no held-out test scan)", n,
                    {k: len(v) for k, v in split.items()})
    return split


def load_split(path: str | Path, scan_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Read a split file ``{"train": [...], "val": [...], "test": [...]}`` of scan ids."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the split file ({e})", path) from e
    if not isinstance(split, dict) or not all(isinstance(split.get(k, []), list)
                                              for k in SPLIT_KEYS) or not split.get("train"):
        raise UserError('split file must be {"train": [scan ids], "val": [...], "test": [...]} '
                        "with a non-empty train list", path)
    split = {k: [str(s) for s in split.get(k, [])] for k in SPLIT_KEYS}
    seen: dict[str, str] = {}
    for k in SPLIT_KEYS:
        for s in split[k]:
            if s in seen:
                raise UserError(f"scan {s!r} is in both {seen[s]} and {k}", path)
            seen[s] = k
    if scan_ids is not None:
        unknown = sorted(set(split["train"]) - set(scan_ids))
        if unknown:
            raise UserError(f"train scans not in the data: {unknown[:5]}", path)
        unused = sorted(set(scan_ids) - set(seen))
        if unused:  # deliberate in a recipe that holds scans back, a slip otherwise: say so
            log.warning("%s: %d scan(s) in the data are in no split list and go unused: %s%s",
                        path, len(unused), ", ".join(unused[:5]),
                        " ..." if len(unused) > 5 else "")
    return split


def save_split(split: dict, path: str | Path) -> None:
    """Write the split as JSON atomically."""
    text = json.dumps(split, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def augment_pair(lr: np.ndarray, hr: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetry ``code`` in 0..7: rotate by 90 * (code % 4) degrees, then flip if code >= 4,
    in the last two axes (every page of a 2.5D LR stack alike). Rotations and flips keep the
    SR grid (LR pixel i covers HR [8i, 8i+8))."""
    k, flip = code % 4, code >= 4
    lr, hr = np.rot90(lr, k, axes=(-2, -1)), np.rot90(hr, k, axes=(-2, -1))
    if flip:
        lr, hr = lr[..., ::-1], hr[..., ::-1]
    return lr, hr


# Gray-level augmentation ranges, in units of the [0, 1] window: gain log-uniform, offset
# uniform. They take the training volumes' marrow (0.2-0.35) down to a real scan's (the LHDL
# bone's marrow sits at 0.06-0.1, with 1% of voxels clipped at 0) and bone up to the top.
GRAY_GAIN = (0.8, 1.25)
GRAY_OFFSET = (-0.25, 0.1)


def gray_transform(lr: torch.Tensor, hr: torch.Tensor, gain: float,
                   offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same gray-level map ``clip(gain * x + offset, 0, 1)`` on LR and HR: a scanner's
    reconstruction is linear in attenuation up to its noise, so a pair under another window
    or contrast is still a valid pair; the clip is what an 8-bit export does."""
    return ((gain * lr + offset).clamp_(0.0, 1.0), (gain * hr + offset).clamp_(0.0, 1.0))


def draw_gray(seed: int, probability: float) -> tuple[float, float] | None:
    """(gain, offset) drawn from ``seed`` with :data:`GRAY_GAIN` / :data:`GRAY_OFFSET`, or
    None (no change) with probability ``1 - probability``."""
    rng = np.random.default_rng(seed)
    if rng.random() >= probability:
        return None
    gain = float(np.exp(rng.uniform(np.log(GRAY_GAIN[0]), np.log(GRAY_GAIN[1]))))
    return gain, float(rng.uniform(*GRAY_OFFSET))


def _read_patch(path: Path) -> np.ndarray:
    """A patch TIFF; UserError naming it if it is missing, truncated or not a TIFF."""
    try:
        return tifffile.imread(path)
    except (OSError, ValueError) as e:  # tifffile.TiffFileError is a ValueError
        raise UserError(f"cannot read this patch ({type(e).__name__}: {e})", path) from None


def worker_batches(loader: DataLoader) -> Iterator:
    """The batches of ``loader``. A UserError raised in a worker process comes back as
    itself: torch re-raises it with the worker's whole traceback as its message."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError as e:
            text = str(e).rstrip()
            if not text.startswith("Caught UserError"):
                raise
            raise UserError(text.splitlines()[-1].split("UserError: ", 1)[-1]) from None
        yield batch


class PatchDataset(Dataset):
    """LR/HR pairs of the given scans as float32 tensors (C, h, w) / (1, f*h, f*w) in [0, 1]
    (C = 1, or the page count of 2.5D LR stacks)
    after the intensity ``window`` (lo, hi); items are indexed by ``i`` or ``(i, code)`` or
    ``(i, code, gray_seed)`` where ``code`` is an :func:`augment_pair` symmetry (applied only
    when ``augment``) and ``gray_seed`` draws a :func:`gray_transform` (with probability
    ``gray_augment``, only when ``augment``)."""

    def __init__(self, dirs: Sequence[str | Path] | None = None,
                 scan_ids: Sequence[str] | None = None, augment: bool = False, *,
                 window: tuple[float, float] | None = None, factor: int = 8,
                 pairs: Sequence[Pair] | None = None, gray_augment: float = 0.0):
        all_pairs = list(pairs) if pairs is not None else read_pairs(dirs or [])
        keep = None if scan_ids is None else set(scan_ids)
        self.pairs = [p for p in all_pairs if keep is None or p.scan_id in keep]
        self.augment = augment
        self.window = window
        self.factor = factor
        self.gray_augment = gray_augment

    def __len__(self) -> int:
        return len(self.pairs)

    def read_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored LR and HR arrays of pair ``i`` (native dtype), shapes checked."""
        p = self.pairs[i]
        lr, hr = _read_patch(p.lr_path), _read_patch(p.hr_path)
        if lr.ndim not in (2, 3):
            raise UserError(f"LR patch of shape {lr.shape}: expected 2D, or a stack of slices",
                            p.lr_path)
        h, w = lr.shape[-2:]
        if hr.shape != (h * self.factor, w * self.factor):
            raise UserError(f"HR patch {hr.shape} is not {self.factor}x the LR patch "
                            f"{(h, w)} (2D)", p.hr_path)
        return lr, hr

    def _scale(self, a: np.ndarray) -> torch.Tensor:
        lo, hi = self.window if self.window is not None else (0.0, 1.0)
        x = (np.ascontiguousarray(a, dtype=np.float32) - lo) / max(hi - lo, 1e-12)
        x = torch.from_numpy(np.clip(x, 0.0, 1.0))
        return x[None] if x.ndim == 2 else x

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        i, code, gray_seed = ((key, 0, None) if isinstance(key, (int, np.integer))
                              else (*key, None)[:3])
        lr, hr = self.read_raw(int(i))
        if self.augment and code:
            lr, hr = augment_pair(lr, hr, int(code))
        lr_t, hr_t = self._scale(lr), self._scale(hr)
        if self.augment and self.gray_augment > 0 and gray_seed is not None:
            gray = draw_gray(int(gray_seed), self.gray_augment)
            if gray is not None:
                lr_t, hr_t = gray_transform(lr_t, hr_t, *gray)
        return lr_t, hr_t


def estimate_window(dataset: PatchDataset, max_patches: int = 256) -> tuple[float, float]:
    """The intensity window (lo, hi) mapped to [0, 1]: the dtype's full range for 8-bit data,
    otherwise the min and max over up to ``max_patches`` evenly spaced LR and HR patches.
    UserError naming two of them when their dtypes differ."""
    idx = np.unique(np.linspace(0, len(dataset) - 1, min(max_patches, len(dataset))).astype(int))
    lo, hi, dtypes = np.inf, -np.inf, _DtypeCheck()
    for i in idx:
        lr, hr = dataset.read_raw(int(i))
        p = dataset.pairs[int(i)]
        for path, a in ((p.lr_path, lr), (p.hr_path, hr)):
            dtypes.add(path, a.dtype)
        lo = min(lo, float(lr.min()), float(hr.min()))
        hi = max(hi, float(lr.max()), float(hr.max()))
    if dtypes.dtype == "uint8":
        return 0.0, 255.0
    if not hi > lo:
        raise UserError("the training patches are constant: no intensity window")
    return lo, hi


class IterationBatchSampler(Sampler):
    """Batches of ``(index, symmetry, gray_seed)`` for iterations ``start .. stop - 1``.

    The global batch of iteration t is positions [t*B, (t+1)*B) of an endless stream of
    epochs, each a permutation drawn from (seed, epoch); process ``rank`` of ``world`` takes
    its B/world share. So batches depend only on (seed, t), never on earlier state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1):
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} is not divisible by the {world} "
                            "processes")
        self.n, self.batch, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            # drawn in this order: the gray seeds came later and leave the first two as they were
            self._epoch = (epoch, rng.permutation(self.n), rng.integers(0, 8, self.n),
                           rng.integers(0, 2**31, self.n))
        return self._epoch[1], self._epoch[2], self._epoch[3]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per = self.batch // self.world
        for t in range(self.start, self.stop):
            first = t * self.batch + self.rank * per
            batch = []
            for pos in range(first, first + per):
                perm, codes, grays = self._draw(pos // self.n)
                j = pos % self.n
                batch.append((int(perm[j]), int(codes[j]), int(grays[j])))
            yield batch
