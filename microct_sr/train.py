"""Two-stage training (Yu et al. 2022, sec. 2.4 and 3.2): ``psnr`` (L1) then ``gan``
(L1 + 0.1 RaGAN + 0.5 VGG19 perceptual, U-Net discriminator), with atomic checkpoints, exact
resume, validation PSNR, a CSV log, DDP under torchrun and AMP on CUDA.

Layout of RUN_DIR::

    split.json                     train/val/test scan ids
    train_log.csv                  iteration, losses, lr, val PSNR, it/s, data-wait fraction
    checkpoints/iter_XXXXXXXX.pt   training state (model file + "train_state")
    model.pt                       the final model file (``upscale --model`` takes it)

With ``ema`` > 0 an exponential moving average of the generator weights (:class:`WeightEMA`)
is validated and written as the model's weights; the raw weights go into ``train_state``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import os
import random
import re
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint, load_model, save_model
from .data import (SPLIT_FILE, IterationBatchSampler, PatchDataset, estimate_window, load_split,
                   lr_pixel_range, make_split, patch_format, read_pairs, save_split, worker_batches)
from .errors import UserError
from .losses import (VGGPerceptualLoss, l1_loss, mse_loss, ragan_d_loss, ragan_g_loss,
                     resolve_vgg_weights)
from .models import ARCHS, ModelConfig, build_model, preset
from .models.discriminator import UNetDiscriminatorSN
from .progress import progress

log = logging.getLogger(__name__)

STAGES = ("psnr", "gan")
CKPT_DIR = "checkpoints"
LOG_FILE = "train_log.csv"
MODEL_FILE = "model.pt"
LOG_COLUMNS = ["iteration", "loss", "l1", "gan", "percep", "d_loss", "lr", "val_psnr",
               "bicubic_psnr", "it_per_s", "data_wait", "skipped"]

# Schedule presets. "paper" is sec. 3.2: batch 64, 300k psnr + 150k gan iterations.
# "small" is a CPU-sized run (the measurement: 4000 iterations of batch 16);
# "tiny" is for tests.
TRAIN_PRESETS: dict[str, dict] = {
    "paper": dict(iters_psnr=300_000, iters_gan=150_000, batch_size=64, val_every=5000,
                  save_every=5000, disc_feats=64),
    "small": dict(iters_psnr=4000, iters_gan=2000, batch_size=16, val_every=250,
                  save_every=500, disc_feats=32),
    "tiny": dict(iters_psnr=20, iters_gan=10, batch_size=4, val_every=10, save_every=10,
                 disc_feats=8),
}


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` fields take the value of the schedule preset."""

    data: list[str]
    out: str
    stage: str = "psnr"
    arch: str = "r2rcan"
    preset: str = "paper"
    model_overrides: dict = field(default_factory=dict)
    iters: int | None = None
    batch_size: int | None = None
    lr: float = 1e-4
    lr_step: int = 100_000              # halve the learning rate every lr_step iterations
    lr_gamma: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    w_pix: float = 1.0                  # L = w_pix L1 + w_gan L_G + w_percep L_percep
    pixel_loss: str = "l1"              # "l1" (the paper) or "mse" in place of L1 above
    w_gan: float = 0.1
    w_percep: float = 0.5
    disc_feats: int | None = None
    init: str | None = None
    resume: bool = False
    val_every: int | None = None
    save_every: int | None = None
    keep: int = 3
    val_patches: int = 256
    log_every: int = 10
    max_bad_steps: int = 10             # consecutive non-finite losses before stopping
    workers: int = 2
    device: str = "auto"
    amp: bool | None = None             # None: on for CUDA
    seed: int = 0
    deterministic: bool = False
    vgg_weights: str | None = None
    test_only_random_vgg: bool = False  # tests only: random VGG19 weights (no CLI option)
    test_only_cpu_amp: bool = False     # tests only: the CUDA fp16 AMP path on the CPU (slow)
    split_file: str | None = None
    window: tuple[float, float] | None = None
    ema: float = 0.0                    # EMA decay of the generator weights; 0: off
    gray_augment: float = 0.0           # probability of a random gray-level map per patch
    quiet: bool = False

    def resolved(self) -> "TrainConfig":
        """A copy with stage/arch/preset checked and preset defaults filled in."""
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}; choose psnr or gan")
        if self.arch not in ARCHS:
            raise UserError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.preset not in TRAIN_PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose {', '.join(TRAIN_PRESETS)}")
        p = TRAIN_PRESETS[self.preset]
        c = dataclasses.replace(
            self, data=[str(d) for d in self.data], out=str(self.out),
            iters=_or_preset(self.iters, p[f"iters_{self.stage}"]),
            batch_size=_or_preset(self.batch_size, p["batch_size"]),
            val_every=_or_preset(self.val_every, p["val_every"]),
            save_every=_or_preset(self.save_every, p["save_every"]),
            disc_feats=_or_preset(self.disc_feats, p["disc_feats"]))
        for name in ("iters", "batch_size", "val_every", "save_every", "keep", "lr_step",
                     "disc_feats"):
            if getattr(c, name) < 1:
                raise UserError(f"{name} must be at least 1")
        if c.workers < 0:
            raise UserError(f"--workers {c.workers}: the number of data-loading processes "
                            "must be 0 (load in the main process) or more")
        if c.pixel_loss not in PIXEL_LOSSES:
            raise UserError(f"unknown pixel loss {c.pixel_loss!r} "
                            f"(choose {', '.join(PIXEL_LOSSES)})")
        if not (math.isfinite(c.lr) and c.lr > 0):
            raise UserError(f"--lr {c.lr}: the learning rate must be a positive number")
        if not (c.w_gan >= 0 and c.w_percep >= 0 and math.isfinite(c.w_gan + c.w_percep)):
            raise UserError(f"loss weights must be >= 0 (--gan-weight {c.w_gan:g}, "
                            f"--percep-weight {c.w_percep:g})")
        if not 0 <= c.gray_augment <= 1:
            raise UserError(f"--gray-augment {c.gray_augment}: a probability in [0, 1]")
        if not 0 <= c.ema < 1:
            raise UserError(f"--ema {c.ema}: the decay must be in [0, 1) (0 turns EMA off; "
                            "typical 0.999)")
        return c


# TrainConfig fields that define a run, with their command-line spelling (bare: library only).
# --resume takes those not given from the checkpoint and refuses given ones that differ.
# arch and the model options are compared with the checkpoint's network (see _network_diffs).
RUN_OPTIONS = {"stage": "--stage", "preset": "--preset", "batch_size": "--batch-size",
               "lr": "--lr", "lr_step": "--lr-step", "lr_gamma": "lr_gamma", "betas": "betas",
               "w_pix": "w_pix", "pixel_loss": "--pixel-loss", "w_gan": "--gan-weight",
               "w_percep": "--percep-weight", "disc_feats": "--disc-feats",
               "gray_augment": "--gray-augment", "ema": "--ema", "seed": "--seed",
               "data": "--data", "split_file": "--split-file", "init": "--init",
               "window": "window"}
# May change on resume (--iters extends a run); taken from the checkpoint when not given.
# The other fields (workers, device, amp, deterministic, vgg_weights, quiet ...) are the
# machine's business: they come from the call as for a new run.
RESUME_SCHEDULE = ("iters", "val_every", "save_every", "keep")
_PATH_OPTIONS = ("split_file", "init")
_TUPLE_FIELDS = ("betas", "window")  # tuples in TrainConfig, lists once saved


def _or_preset(value: int | None, default: int) -> int:
    """An option's value, or the preset's when it was not given (0 stays 0 and is refused)."""
    return default if value is None else value


class WeightEMA:
    """Exponential moving average of a network's parameters (buffers are copied).

    After each optimiser step ``ema = d_t * ema + (1 - d_t) * weights`` with the warm-up of
    TensorFlow's ``ExponentialMovingAverage(num_updates=t)``: ``d_t = min(decay, (1 + t) /
    (10 + t))``, t = updates before this one, so the average is not dominated by the initial
    weights (a random init, or the ``--init`` model) early in a run. It starts as a copy of the
    network on the same device; the copy stays in eval mode without gradients.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = float(decay), 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.decay_at(self.updates)
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), weight)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1


PIXEL_LOSSES = {"l1": l1_loss, "mse": mse_loss}


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(config: TrainConfig, given: Collection[str] | None = None) -> dict:
    """Run one stage; returns a summary (model path, iterations, val PSNR, speed).

    ``given``: the fields of ``config`` set explicitly (the CLI passes those on its command
    line); with ``resume``, the run's fields not in it take the checkpoint's values and those
    in it must match (:data:`RUN_OPTIONS`). None: every field counts as given. Resuming a run
    that already reached ``iters`` (model.pt written) is a no-op reporting it.
    """
    resume_ckpt = _resume_checkpoint(config)
    if resume_ckpt is None:
        cfg = config.resolved()
    else:
        cfg = _resumed_config(config, resume_ckpt, given)
        finished = _finished_summary(cfg, resume_ckpt)
        if finished is not None:
            return finished
    _check_world(cfg)
    threads = torch.get_num_threads()
    dinfo = _init_distributed(cfg)
    try:
        _limit_cpu_threads(cfg)
        summary = _Trainer(cfg, dinfo, resume_ckpt, given).run()
        if dinfo.owns_group:  # leave together: rank 0 still writes model.pt, and a gloo peer
            dist.barrier()    # torn down under it has aborted a rank at exit (rare, seen once)
        return summary
    finally:
        _release_run_dir(Path(cfg.out))
        torch.set_num_threads(threads)
        if dinfo.owns_group:
            dist.destroy_process_group()


def _check_out_dir(run_dir: Path) -> None:
    """UserError unless ``run_dir`` is a folder or can be made one (no file on its path)."""
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"is a file, so --out {run_dir} cannot be a run folder", p)
            return


def _lock_run_dir(run_dir: Path, resume: bool) -> None:
    """Hold RUN_DIR for this run (an exclusive lock, released when the process ends, also
    when it is killed; :func:`train` releases it): a second ``train`` into the same folder,
    started before the first wrote a checkpoint, would otherwise mix both runs' checkpoints
    and logs. Checks again, under the lock, that no other run finished there meanwhile."""
    import fcntl

    fh = open(run_dir / ".microct-sr-train.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UserError("another `microct-sr train` is writing this run folder; wait for it "
                        "to finish (then --resume continues it) or choose another --out",
                        run_dir) from None
    if not resume and _holds_run(run_dir):
        fh.close()
        raise UserError("already holds a training run (written by another run while this "
                        "one started); pass --resume to continue it or choose another --out",
                        run_dir)
    _held_locks[run_dir] = fh


_held_locks: dict[Path, object] = {}  # RUN_DIR -> its open, locked lock file


def _release_run_dir(run_dir: Path) -> None:
    fh = _held_locks.pop(run_dir, None)
    if fh is not None:
        fh.close()


def _holds_run(run_dir: Path) -> bool:
    """Whether RUN_DIR holds a training run (a checkpoint or the final model)."""
    return bool(_checkpoints(run_dir)) or (run_dir / MODEL_FILE).exists()


def _resume_checkpoint(cfg: TrainConfig) -> dict | None:
    """Refuse to clobber a run; with ``resume`` the newest training checkpoint in RUN_DIR."""
    run_dir = Path(cfg.out)
    _check_out_dir(run_dir)
    if not cfg.resume:
        if _holds_run(run_dir):
            raise UserError("already holds a training run; pass --resume to continue it or "
                            "choose another --out", run_dir)
        return None
    existing = _checkpoints(run_dir)
    if not existing:
        raise UserError(f"--resume: no checkpoint in {run_dir / CKPT_DIR}", run_dir)
    path = existing[max(existing)]
    ckpt = load_checkpoint(path)
    if "train_state" not in ckpt:
        raise UserError("not a training checkpoint (no train_state)", path)
    log.info("resuming from %s", path)
    return ckpt


def _resumed_config(config: TrainConfig, ckpt: dict, given: Collection[str] | None
                    ) -> TrainConfig:
    """``config`` resolved for resuming the run of ``ckpt``: the run's fields not ``given``
    take the saved values; UserError listing each given one that differs."""
    saved = ckpt["train_state"]["train_config"]
    given = {f.name for f in dataclasses.fields(config)} if given is None else set(given)
    kept = {k: tuple(saved[k]) if k in _TUPLE_FIELDS and saved[k] is not None else saved[k]
            for k in (*RUN_OPTIONS, "arch", *RESUME_SCHEDULE) if k not in given and k in saved}
    overrides = {**saved.get("model_overrides", {}), **config.model_overrides}
    cfg = dataclasses.replace(config, model_overrides=overrides, **kept).resolved()
    diffs = _option_diffs(cfg, saved, given) + _network_diffs(config, ckpt, saved, given)
    if diffs:
        raise UserError("--resume: the run was started with other options: " + "; ".join(diffs)
                        + " (leave an option out to keep the run's value, or train into "
                        "another --out)", cfg.out)
    if cfg.iters < ckpt["train_state"]["iteration"]:
        raise UserError(f"--iters {cfg.iters}: the run is already at iteration "
                        f"{ckpt['train_state']['iteration']}; give more to extend it", cfg.out)
    return cfg


def _option_diffs(cfg: TrainConfig, saved: dict, given: set[str]) -> list[str]:
    """``--option: saved X, given Y`` for each given :data:`RUN_OPTIONS` field that differs."""
    return [f"{RUN_OPTIONS[k]}: saved {_shown(saved[k])}, given {_shown(getattr(cfg, k))}"
            for k in RUN_OPTIONS if k in given and k in saved
            and _comparable(k, saved[k]) != _comparable(k, getattr(cfg, k))]


def _network_diffs(config: TrainConfig, ckpt: dict, saved: dict, given: set[str]) -> list[str]:
    """``--arch``/model options that differ from the checkpoint's network (none when the run
    started from --init: those options were ignored then and are now)."""
    if saved.get("init"):
        return []
    asked = {**({"arch": config.arch} if "arch" in given else {}), **config.model_overrides}
    return [f"--{k.replace('_', '-')}: saved {_shown(ckpt['config'].get(k))}, given {_shown(v)}"
            for k, v in asked.items() if ckpt["config"].get(k) != v]


def _comparable(name: str, value):
    """A run option's value in a form that compares equal when it means the same."""
    if name == "data":
        return [str(Path(d).resolve()) for d in value]
    if name in _PATH_OPTIONS and value is not None:
        return str(Path(value).resolve())
    return list(value) if isinstance(value, (list, tuple)) else value


def _shown(value) -> str:
    """An option's value for a message: 0.0001, a b, none."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    return str(value)


def _finished_summary(cfg: TrainConfig, ckpt: dict) -> dict | None:
    """The report of a run that already reached ``cfg.iters`` and wrote model.pt (nothing is
    rewritten), else None."""
    it = int(ckpt["train_state"]["iteration"])
    model_file = Path(cfg.out) / MODEL_FILE
    if it < cfg.iters or not model_file.is_file():
        return None
    model = load_checkpoint(model_file)
    if model.get("provenance", {}).get("iterations") != it:
        return None  # model.pt is older than the newest checkpoint: write it again
    log.info("%s: the run already finished at iteration %d; give --iters above %d to train "
             "longer", cfg.out, it, it)
    prov = model["provenance"]
    best = {"psnr": prov.get("best_val_psnr"), "iteration": prov.get("best_iteration")}
    return _summary(cfg, model["config"]["arch"], it, best, ckpt["train_state"]["split"],
                    model["intensity"], _logged_val(Path(cfg.out), it),
                    {"iterations_this_run": 0, "processes": 0, "device": None, "seconds": 0.0,
                     "it_per_s": None, "data_wait_fraction": None})


def _logged_val(run_dir: Path, it: int) -> tuple[float | None, float | None]:
    """(val PSNR, bicubic PSNR) of iteration ``it`` in RUN_DIR/train_log.csv, else Nones."""
    val: tuple[float | None, float | None] = (None, None)
    if (run_dir / LOG_FILE).is_file():
        with open(run_dir / LOG_FILE, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("iteration") == str(it) and r.get("val_psnr"):
                    val = (float(r["val_psnr"]),
                           float(r["bicubic_psnr"]) if r.get("bicubic_psnr") else None)
    return val


def _summary(cfg: TrainConfig, arch: str, it: int, best: dict, split: dict, intensity: dict,
             last_val: tuple, speed: dict) -> dict:
    """What ``train`` returns; ``speed``: iterations_this_run, processes, device, timings."""
    return {"run_dir": str(cfg.out), "model": str(Path(cfg.out) / MODEL_FILE),
            "stage": cfg.stage, "arch": arch, "preset": cfg.preset, "iterations": it, **speed,
            "val_psnr": last_val[0], "bicubic_val_psnr": last_val[1],
            "best_val_psnr": best["psnr"], "best_iteration": best["iteration"],
            "ema_decay": cfg.ema or None, "split": {k: len(v) for k, v in split.items()},
            "intensity": intensity}


def _limit_cpu_threads(cfg: TrainConfig) -> None:
    """On the CPU, leave one core per data worker (never raise the thread count): OpenMP
    threads competing with the workers for cores made steps several times slower here."""
    if _pick_device(cfg.device, 0).type != "cpu":
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    free = (os.cpu_count() or 1) // max(1, local_world) - cfg.workers
    n = min(torch.get_num_threads(), max(1, free))
    if n != torch.get_num_threads():
        log.info("using %d torch thread(s) beside %d data worker(s)", n, cfg.workers)
        torch.set_num_threads(n)


# ---------------------------------------------------------------- setup helpers

def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def _check_world(cfg: TrainConfig) -> None:
    """UserError, before any process group or file, unless the global batch divides among
    torchrun's WORLD_SIZE processes (each rank raises it: all exit 2, none waits for another)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.batch_size % world:
        source = "the run's " if cfg.resume else ""
        raise UserError(f"--batch-size {cfg.batch_size} ({source}global batch) is not divisible "
                        f"by the {world} torchrun processes: each takes batch / {world}; give "
                        f"a multiple of {world} or another --nproc_per_node")


def _init_distributed(cfg: TrainConfig) -> _Dist:
    """DDP when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    else:
        owns = False
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def _set_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    """{iteration: path} of the training checkpoints in RUN_DIR/checkpoints."""
    found = {}
    for p in (run_dir / CKPT_DIR).glob("iter_*.pt"):
        m = re.fullmatch(r"iter_(\d+)\.pt", p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _slices(channels: int) -> str:
    """"1 LR slice" / "3 LR slices (2.5D, --context 1)" for messages."""
    if channels == 1:
        return "1 LR slice"
    return f"{channels} LR slices (2.5D, --context {(channels - 1) // 2})"


def _psnr(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Per-patch PSNR in dB of images in [0, 1]."""
    mse = ((sr - hr) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


class _NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------- the trainer

class _Trainer:
    """Holds the models, optimisers and data of one run; :meth:`run` is the loop."""

    def __init__(self, cfg: TrainConfig, dinfo: _Dist, resume_ckpt: dict | None = None,
                 given: Collection[str] | None = None):
        self.cfg, self.d, self.given = cfg, dinfo, given
        self.run_dir = Path(cfg.out)
        self.device = _pick_device(cfg.device, dinfo.local_rank)
        _set_determinism(cfg, self.device)
        init_ckpt = self._check_files(resume_ckpt)
        self._setup_data(resume_ckpt)
        self._setup_models(resume_ckpt, init_ckpt)
        if resume_ckpt is not None:
            try:
                self._restore(resume_ckpt["train_state"], resume_ckpt["state_dict"])
            except (RuntimeError, KeyError, ValueError) as e:  # e.g. an older discriminator
                why = " ".join(str(e).split())[:200] or type(e).__name__
                raise UserError(f"--resume: the newest checkpoint's training state does not "
                                f"fit this run ({why}); it may come from another microct-sr "
                                "version: start a new run with --init", self.run_dir) from None
        else:
            self.start, self.best = 0, {"psnr": None, "iteration": None}
        self._wrap_ddp()

    # -- files
    def _check_files(self, resume_ckpt: dict | None) -> dict | None:
        """Check VGG19 and --init before any work; the --init file's content, if one."""
        cfg = self.cfg
        if cfg.stage == "gan" and cfg.w_percep > 0:  # no perceptual term: no VGG19 needed
            self.vgg_path = (None if cfg.test_only_random_vgg  # checked before any work
                             else resolve_vgg_weights(cfg.vgg_weights))
        if resume_ckpt is not None:
            return None
        if cfg.init:
            self.init_model, init_ckpt = load_model(cfg.init)  # UserError for a bad file
            return init_ckpt
        if cfg.stage == "gan":
            raise UserError("--stage gan starts from a psnr-stage model: pass --init CKPT")
        return None

    # -- data
    def _setup_data(self, resume_ckpt: dict | None) -> None:
        cfg = self.cfg
        pairs = read_pairs(cfg.data)
        # one patch per scan: mixed 8/16-bit data, or 2D and 2.5D patches, are refused
        dtype, self.in_channels = patch_format(pairs)
        if resume_ckpt is not None and dtype != resume_ckpt["intensity"]["dtype"]:
            raise UserError(f"the patches are {dtype}, the run trained on "
                            f"{resume_ckpt['intensity']['dtype']}", cfg.data[0])
        scans = sorted({p.scan_id for p in pairs})
        if resume_ckpt is not None:
            self.split = resume_ckpt["train_state"]["split"]
        elif cfg.split_file:
            self.split = load_split(cfg.split_file, scans)
            unused = sorted(set(scans) - {s for v in self.split.values() for s in v})
            if unused:
                log.info("%d scan(s) in the data are in no list of %s and stay unused: %s",
                         len(unused), cfg.split_file, ", ".join(unused[:5]))
        else:
            self.split = make_split(scans, cfg.seed)
        self.train_ds = PatchDataset(pairs=pairs, scan_ids=self.split["train"], augment=True,
                                     gray_augment=cfg.gray_augment)
        if len(self.train_ds) == 0:
            raise UserError(f"no training patches: train scans {self.split['train'][:5]} are "
                            "not in the --data folders")
        if resume_ckpt is not None:
            window = tuple(resume_ckpt["intensity"]["window"])
        else:
            window = tuple(cfg.window) if cfg.window else estimate_window(self.train_ds)
        self.intensity = {"window": [float(window[0]), float(window[1])], "dtype": dtype}
        self.lr_pixel_um = lr_pixel_range(pairs, self.split["train"])
        self.train_ds.window = window
        self.val_ds = PatchDataset(pairs=pairs, scan_ids=self.split["val"], window=window)
        counts = {k: len(v) for k, v in self.split.items()}
        if counts.get("train", 0) < 3:
            log.warning("only %d training scan(s): the model learns those samples' bone, not "
                        "bone in general; pair more animals, or fine-tune (--init) a trained "
                        "model", counts.get("train", 0))
        log.info("data: %d pair folders, scans %s, %d train / %d val patches, window %s",
                 len({p.folder for p in pairs}), counts, len(self.train_ds), len(self.val_ds),
                 window)
        if self.d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _lock_run_dir(self.run_dir, self.cfg.resume)
            save_split(self.split, self.run_dir / SPLIT_FILE)

    # -- models
    def _setup_models(self, resume_ckpt: dict | None, init_ckpt: dict | None) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if resume_ckpt is not None:
            self.model_config = ModelConfig.from_dict(resume_ckpt["config"])
            self.model = build_model(self.model_config)
            # with EMA the file's weights are the average; the raw ones are in train_state
            self.model.load_state_dict(resume_ckpt["train_state"].get(
                "model", resume_ckpt["state_dict"]))
        elif init_ckpt is not None:
            self.model_config = ModelConfig.from_dict(init_ckpt["config"])
            ignored = self._ignored_by_init()
            if ignored:
                log.warning("--init %s: training its network (%s); ignored: %s", cfg.init,
                            self.model_config.arch, "; ".join(ignored))
            self.model = self.init_model.train()
        else:
            try:
                self.model_config = preset(cfg.arch, cfg.preset, in_channels=self.in_channels,
                                           **cfg.model_overrides)
                self.model = build_model(self.model_config)
            except (TypeError, ValueError) as e:
                raise UserError(f"bad model options: {e}") from e
        if self.model_config.in_channels != self.in_channels:
            source = cfg.init if resume_ckpt is None else self.run_dir
            raise UserError(f"the model takes {_slices(self.model_config.in_channels)} per "
                            f"patch, the --data patches have {_slices(self.in_channels)}: pair "
                            f"with --context {(self.model_config.in_channels - 1) // 2} "
                            "(or train a new model on these patches)", source)
        self.model.to(self.device).train()
        self.ema = WeightEMA(self.model, cfg.ema) if cfg.ema else None  # after --init/resume
        n_params = sum(p.numel() for p in self.model.parameters())
        source = "from --init" if init_ckpt is not None else (
            "from the checkpoint" if resume_ckpt is not None else cfg.preset)
        log.info("model %s (%s), %.2f M parameters, device %s, %d process(es)",
                 self.model_config.arch, source, n_params / 1e6, self.device, self.d.world)
        self.opt_g = torch.optim.Adam(self.model.parameters(), cfg.lr, betas=cfg.betas)
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, cfg.lr_step, cfg.lr_gamma)
        self.disc = self.perceptual = self.opt_d = self.sched_d = None
        if cfg.stage == "gan":
            torch.manual_seed(cfg.seed + 1)  # the same initial discriminator on every path
            self.disc = UNetDiscriminatorSN(self.model_config.out_channels,
                                            cfg.disc_feats).to(self.device).train()
            if cfg.w_percep > 0:
                self.perceptual = VGGPerceptualLoss(
                    self.vgg_path,
                    test_only_random_weights=cfg.test_only_random_vgg).to(self.device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), cfg.lr, betas=cfg.betas)
            self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, cfg.lr_step,
                                                           cfg.lr_gamma)
        self._setup_amp()

    def _ignored_by_init(self) -> list[str]:
        """``--option X (the file's: Y)`` for each given network option (--arch, --n-feats
        ...) that differs from the --init file's network, which is trained as it is."""
        cfg, net = self.cfg, self.model_config.to_dict()
        asked = {**({"arch": cfg.arch} if self.given is None or "arch" in self.given else {}),
                 **cfg.model_overrides}
        return [f"--{k.replace('_', '-')} {_shown(v)} (the file's: {_shown(net.get(k))})"
                for k, v in asked.items() if net.get(k) != v]

    def _setup_amp(self) -> None:
        """Autocast on CUDA (bf16 where supported, else fp16 with a GradScaler); float32
        elsewhere. ``test_only_cpu_amp`` runs the fp16 path on the CPU: the same autocast and
        GradScaler calls with the CPU's device type (real fp16 numerics, about 10x slower)."""
        dev = self.device.type
        amp_device = dev == "cuda" or (dev == "cpu" and self.cfg.test_only_cpu_amp)
        if self.cfg.amp and not amp_device:
            log.warning("AMP runs on CUDA only; training in float32 on %s", self.device)
        self.amp = amp_device and self.cfg.amp is not False
        self.amp_dtype = (torch.bfloat16 if self.amp and dev == "cuda"
                          and torch.cuda.is_bf16_supported() else torch.float16)
        self.scaler = torch.amp.GradScaler(dev, enabled=self.amp
                                           and self.amp_dtype == torch.float16)

    def _wrap_ddp(self) -> None:
        self.g_net: nn.Module = self.model
        self.d_net: nn.Module | None = self.disc
        if self.d.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.disc is not None:
                self.d_net = nn.parallel.DistributedDataParallel(self.disc, device_ids=ids)

    # -- checkpoints
    def _train_state(self, iteration: int) -> dict:
        s = {"iteration": iteration, "stage": self.cfg.stage, "split": self.split,
             "train_config": dataclasses.asdict(self.cfg), "best": dict(self.best),
             "processes": self.d.world,
             "optimizer_g": self.opt_g.state_dict(), "scheduler_g": self.sched_g.state_dict(),
             "scaler": self.scaler.state_dict(), "rng": _rng_state()}
        if self.disc is not None:
            s.update(discriminator=self.disc.state_dict(), optimizer_d=self.opt_d.state_dict(),
                     scheduler_d=self.sched_d.state_dict())
        if self.ema is not None:  # the file's state_dict holds the average
            s.update(model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                     ema={"decay": self.ema.decay, "updates": self.ema.updates})
        return s

    def _restore(self, s: dict, weights: dict) -> None:
        """Optimisers, schedulers, scaler, discriminator, EMA (``weights``: the file's
        state_dict, the average when EMA is on), RNG states, iteration, best."""
        self.opt_g.load_state_dict(s["optimizer_g"])
        self.sched_g.load_state_dict(s["scheduler_g"])
        if s["scaler"]:  # empty when the run trained without a scaler: a fresh one then
            self.scaler.load_state_dict(s["scaler"])
        if self.disc is not None:
            self.disc.load_state_dict(s["discriminator"])
            self.opt_d.load_state_dict(s["optimizer_d"])
            self.sched_d.load_state_dict(s["scheduler_d"])
        if self.ema is not None:
            self.ema.module.load_state_dict(weights)
            self.ema.updates = int(s["ema"]["updates"])
        _set_rng_state(s["rng"])
        self.start, self.best = int(s["iteration"]), dict(s["best"])
        was = s.get("processes")  # absent in checkpoints of older versions
        if self.disc is not None and was is not None and was != self.d.world and self.d.main:
            log.warning("--resume: this gan-stage run trained on %d process(es), now %d: the "
                        "relativistic loss takes its batch means over each process's batch / "
                        "N patches, so it continues with another objective than its own; "
                        "resume on %d to keep it", was, self.d.world, was)

    def _provenance(self, iteration: int) -> dict:
        return {"stage": self.cfg.stage, "iterations": iteration, "data": self.cfg.data,
                "pixel_loss": self.cfg.pixel_loss, "gray_augment": self.cfg.gray_augment,
                **({"w_gan": self.cfg.w_gan, "w_percep": self.cfg.w_percep}
                   if self.cfg.stage == "gan" else {}),
                "preset": self.cfg.preset, "init": self.cfg.init, "split": self.split,
                "lr_pixel_um": self.lr_pixel_um,
                "best_val_psnr": self.best["psnr"], "best_iteration": self.best["iteration"],
                **({"weights": "ema", "ema_decay": self.ema.decay,
                    "ema_updates": self.ema.updates} if self.ema is not None else {})}

    @property
    def _eval_model(self) -> nn.Module:
        """The weights that are validated and written as the model: the EMA when on."""
        return self.model if self.ema is None else self.ema.module

    def _save(self, iteration: int) -> Path:
        """Atomic training checkpoint; prune to the newest ``keep`` plus the best."""
        path = self.run_dir / CKPT_DIR / f"iter_{iteration:08d}.pt"
        save_model(path, self._eval_model, self.model_config, intensity=self.intensity,
                   provenance=self._provenance(iteration),
                   extra={"train_state": self._train_state(iteration)})
        found = _checkpoints(self.run_dir)
        keep = set(sorted(found)[-self.cfg.keep:]) | {self.best["iteration"]}
        for it, p in found.items():
            if it not in keep:
                p.unlink(missing_ok=True)
        return path

    # -- one iteration
    def _all_finite(self, *losses: torch.Tensor) -> bool:
        ok = torch.tensor([float(all(bool(torch.isfinite(v)) for v in losses))],
                          device=self.device)  # NCCL reduces CUDA tensors only
        if self.d.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _step(self, lr: torch.Tensor, hr: torch.Tensor) -> dict | None:
        """One optimisation step; None when a loss is not finite (the step is skipped).

        With fp16 AMP, gradients that overflow fp16 under a finite loss are the GradScaler's
        business, not a skipped step here: it skips the optimiser step and halves its scale.
        """
        cfg = self.cfg
        with self._autocast():
            sr = self.g_net(lr)
        sr = sr.float()
        l1 = l1_loss(sr, hr)  # logged whatever the objective, so runs stay comparable
        l_pix = l1 if cfg.pixel_loss == "l1" else PIXEL_LOSSES[cfg.pixel_loss](sr, hr)
        out = {"l1": l1 if l_pix is l1 else l1.detach()}
        total = cfg.w_pix * l_pix
        if self.disc is not None:
            self.disc.requires_grad_(False)
            with self._autocast():
                fake = self.disc(sr).float()
                with torch.no_grad():
                    real = self.disc(hr).float()
                if self.perceptual is not None:
                    out["percep"] = self.perceptual(sr, hr).float()
            out["gan"] = ragan_g_loss(real, fake)
            total = total + cfg.w_gan * out["gan"]
            if "percep" in out:
                total = total + cfg.w_percep * out["percep"]
        out["loss"] = total
        if not self._all_finite(total):
            return None
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt_g)
        if self.disc is not None:
            self.disc.requires_grad_(True)
            with self._autocast():
                logits = self.d_net(torch.cat([hr, sr.detach()])).float()
            real, fake = logits.chunk(2)
            out["d_loss"] = ragan_d_loss(real, fake)
            if self._all_finite(out["d_loss"]):
                self.opt_d.zero_grad(set_to_none=True)
                self.scaler.scale(out["d_loss"]).backward()
                self.scaler.step(self.opt_d)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)  # the unwrapped module: equal on every DDP rank
        return self._mean_over_ranks(out)

    def _mean_over_ranks(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The losses as floats, averaged over the DDP processes (each has batch / N), so
        the CSV logs the whole batch's loss, not rank 0's share."""
        names = sorted(losses)  # the same keys on every rank
        values = torch.stack([losses[k].detach().float() for k in names])
        if self.d.world > 1:
            dist.all_reduce(values)
            values /= self.d.world
        return dict(zip(names, values.tolist()))

    # -- validation
    @torch.no_grad()
    def _validate(self) -> tuple[float | None, float | None]:
        """Mean PSNR (dB) of the model (its EMA when on) and of bicubic on up to
        ``val_patches`` val patches."""
        if len(self.val_ds) == 0:
            return None, None
        n = len(self.val_ds)
        idx = np.unique(np.linspace(0, n - 1, min(self.cfg.val_patches, n)).astype(int))
        net = self._eval_model
        net.eval()
        psnrs, bic = [], []
        for chunk in np.array_split(idx, max(1, math.ceil(len(idx) / 16))):
            lr, hr = (torch.stack(t).to(self.device) for t in
                      zip(*(self.val_ds[int(i)] for i in chunk)))
            with self._autocast():
                sr = net(lr)
            psnrs.append(_psnr(sr.float().clamp(0, 1), hr))
            centre = lr.shape[1] // 2  # the LR slice itself of a 2.5D stack
            up = F.interpolate(lr[:, centre:centre + 1], scale_factor=self.model_config.scale,
                               mode="bicubic",
                               align_corners=False)
            bic.append(_psnr(up.clamp(0, 1), hr))
        self.model.train()  # the EMA copy stays in eval mode
        return float(torch.cat(psnrs).mean()), float(torch.cat(bic).mean())

    # -- the loop
    def _loader(self) -> DataLoader:
        cfg = self.cfg
        sampler = IterationBatchSampler(len(self.train_ds), cfg.batch_size, cfg.seed,
                                        self.start, cfg.iters, self.d.rank, self.d.world)
        return DataLoader(self.train_ds, batch_sampler=sampler, num_workers=cfg.workers,
                          pin_memory=self.device.type == "cuda",
                          prefetch_factor=4 if cfg.workers > 0 else None)

    def run(self) -> dict:
        cfg = self.cfg
        logger = _CsvLog(self.run_dir / LOG_FILE, self.start) if self.d.main else None
        bar = progress(total=cfg.iters, desc=cfg.stage, quiet=cfg.quiet or not self.d.main)
        bar.update(self.start)
        bad, window = 0, _Window()
        t_start, wait_total, last_val = time.perf_counter(), 0.0, (None, None)
        it = self.start
        t_fetch = time.perf_counter()
        for lr, hr in worker_batches(self._loader()):
            t_got = time.perf_counter()
            lr = lr.to(self.device, non_blocking=True)
            hr = hr.to(self.device, non_blocking=True)
            losses = self._step(lr, hr)
            it += 1
            if losses is None:
                bad += 1
                log.warning("iteration %d: non-finite loss, step skipped (%d in a row)", it, bad)
                if bad >= cfg.max_bad_steps:
                    raise _NonFiniteLossError(self._diverged_message(it, bad))
            else:
                bad = 0
            with warnings.catch_warnings():
                # a step the fp16 GradScaler skipped (overflow, common on the first iterations)
                # still advances the schedule, on purpose; torch would warn about it
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step",
                                        UserWarning)
                self.sched_g.step()
                if self.sched_d is not None:
                    self.sched_d.step()
            t_done = time.perf_counter()
            wait_total += t_got - t_fetch
            window.add(losses, t_got - t_fetch, t_done - t_fetch)
            bar.update(1)
            if losses is not None:
                bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
            is_val = it % cfg.val_every == 0 or it == cfg.iters
            if self.d.main:
                new_best = False
                if is_val:
                    last_val = self._validate()
                    new_best = last_val[0] is not None and (self.best["psnr"] is None
                                                            or last_val[0] > self.best["psnr"])
                    if new_best:
                        self.best = {"psnr": last_val[0], "iteration": it}
                due = it % cfg.save_every == 0 or it == cfg.iters
                if new_best or (due and bad == 0):  # never in a run of non-finite losses
                    self._save(it)
                if it % cfg.log_every == 0 or is_val or it == cfg.iters:
                    logger.write(it, window.row(), self.opt_g.param_groups[0]["lr"],
                                 last_val if is_val else (None, None))
                    window = _Window()
            t_fetch = time.perf_counter()
        bar.close()
        if it == cfg.iters == self.start and self.d.main:  # resumed at the end: model.pt only
            last_val = self._validate()
        elapsed = time.perf_counter() - t_start
        return self._finish(it, elapsed, wait_total, last_val)

    def _diverged_message(self, it: int, bad: int) -> str:
        found = _checkpoints(self.run_dir)
        last = found[max(found)] if found else "none"
        return (f"stopping at iteration {it}: {bad} non-finite losses in a row (lower --lr or "
                f"check the data); last good checkpoint: {last}")

    def _finish(self, it: int, elapsed: float, wait: float, last_val) -> dict:
        done = it - self.start
        speed = {"iterations_this_run": done, "processes": self.d.world,
                 "device": str(self.device), "seconds": round(elapsed, 3),
                 "it_per_s": round(done / elapsed, 4) if elapsed > 0 and done else None,
                 "data_wait_fraction": round(wait / elapsed, 4) if elapsed > 0 and done
                 else None}
        summary = _summary(self.cfg, self.model_config.arch, it, self.best, self.split,
                           self.intensity, last_val, speed)
        if self.d.main:
            save_model(self.run_dir / MODEL_FILE, self._eval_model, self.model_config,
                       intensity=self.intensity, provenance=self._provenance(it))
            log.info("wrote %s (%d iterations, val PSNR %s dB, bicubic %s dB)",
                     self.run_dir / MODEL_FILE, it, _db(last_val[0]), _db(last_val[1]))
            if last_val[0] is not None and last_val[1] is not None \
                    and last_val[0] < last_val[1]:
                log.warning("%s scores %.2f dB below bicubic on the validation scans: it is "
                            "not ready to use (more iterations, more data, or --init from a "
                            "trained model)", self.run_dir / MODEL_FILE,
                            last_val[1] - last_val[0])
        return summary


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


class _Window:
    """Losses and timings accumulated between two CSV rows."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = self.skipped = 0
        self.wait = self.total = 0.0

    def add(self, losses: dict | None, wait: float, total: float) -> None:
        self.wait += wait
        self.total += total
        if losses is None:
            self.skipped += 1
            return
        self.n += 1
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def row(self) -> dict:
        row = {k: v / self.n for k, v in self.sums.items()} if self.n else {}
        steps = self.n + self.skipped
        row.update(skipped=self.skipped,
                   it_per_s=steps / self.total if self.total > 0 else None,
                   data_wait=self.wait / self.total if self.total > 0 else None)
        return row


class _CsvLog:
    """RUN_DIR/train_log.csv; on resume, rows after the resumed iteration are dropped."""

    def __init__(self, path: Path, start: int):
        self.path = path
        rows = []
        if start > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f)
                        if (r.get("iteration") or "").isdigit() and int(r["iteration"]) <= start
                        and None not in r.values()]  # drops a row cut short by a kill
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def write(self, it: int, row: dict, lr: float, val: tuple) -> None:
        full = {"iteration": it, "lr": lr, "val_psnr": val[0], "bicubic_psnr": val[1], **row}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                 for k, v in full.items() if k in LOG_COLUMNS})
