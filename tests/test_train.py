"""train.py / `microct-sr train`: both stages for every arch, checkpoints that upscale loads,
exact resume, split by scan, non-finite losses, DDP with 2 gloo processes, clear errors."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from _train_data import make_16_bit_copy, make_pair_folder
from microct_sr import losses, train as train_mod
from microct_sr.checkpoint import load_checkpoint, load_model
from microct_sr.data import make_split
from microct_sr.errors import UserError
from microct_sr.models import ARCHS
from microct_sr.train import TrainConfig, train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_pairs")
    a = make_pair_folder(root / "a", ["rat1", "rat2", "rat3"], 3, lr_patch=4, seed=1)
    b = make_pair_folder(root / "b", ["rat4", "rat5"], 3, lr_patch=4, seed=2)
    return [str(a), str(b)]


def _cfg(pairs, out, **kw) -> TrainConfig:
    base = dict(data=pairs, out=str(out), preset="tiny", batch_size=2, workers=0, log_every=1,
                quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def _log(run_dir) -> list[dict]:
    with open(run_dir / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_model_file(run_dir, stage, iters):
    model, ckpt = load_model(run_dir / "model.pt")  # what `upscale --model` does
    assert ckpt["intensity"] == {"window": [0.0, 255.0], "dtype": "uint8"}
    assert ckpt["provenance"]["stage"] == stage and ckpt["provenance"]["iterations"] == iters
    assert "train_state" not in ckpt
    with torch.no_grad():
        out = model(torch.rand(1, 1, 8, 8))
    assert out.shape == (1, 1, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_psnr_then_gan_stage_for_each_arch(pairs, tmp_path, arch):
    s = train(_cfg(pairs, tmp_path / "psnr", arch=arch, iters=3, val_every=3, save_every=2))
    run = tmp_path / "psnr"
    rows = _log(run)
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert all(float(r["l1"]) > 0 and r["loss"] != "nan" for r in rows)
    assert s["val_psnr"] is not None and s["bicubic_val_psnr"] > 10
    assert (run / "checkpoints" / "iter_00000003.pt").is_file()
    ckpt = load_checkpoint(run / "checkpoints" / "iter_00000002.pt")
    assert ckpt["train_state"]["iteration"] == 2 and "optimizer_g" in ckpt["train_state"]
    _check_model_file(run, "psnr", 3)

    g = train(_cfg(pairs, tmp_path / "gan", arch="srcnn", stage="gan", iters=2, val_every=2,
                   init=str(run / "model.pt"), test_only_random_vgg=True))
    assert g["arch"] == arch  # the network comes from --init
    rows = _log(tmp_path / "gan")
    for r in rows:
        for k in ("loss", "l1", "gan", "percep", "d_loss"):
            assert torch.isfinite(torch.tensor(float(r[k]))), (k, r)
    state = load_checkpoint(tmp_path / "gan" / "checkpoints" / "iter_00000002.pt")["train_state"]
    assert "discriminator" in state and "optimizer_d" in state
    _check_model_file(tmp_path / "gan", "gan", 2)


def test_resume_of_a_checkpoint_that_does_not_fit_is_a_clear_error(pairs, tmp_path):
    """A GAN checkpoint whose discriminator has other layers (an older microct-sr's, with
    biases on the refining convs) is refused by name, not with a raw state_dict error."""
    train(_cfg(pairs, tmp_path / "init", iters=1))
    run = tmp_path / "gan"
    train(_cfg(pairs, run, stage="gan", iters=1, init=str(tmp_path / "init" / "model.pt"),
               test_only_random_vgg=True))
    path = run / "checkpoints" / "iter_00000001.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_state"]["discriminator"]["refine.0.bias"] = torch.zeros(64)
    torch.save(ckpt, path)
    (run / "model.pt").unlink()  # an unfinished run
    with pytest.raises(UserError, match=r"training state does not fit.*refine\.0\.bias"):
        train(_cfg(pairs, run, stage="gan", iters=2, resume=True,
                   init=str(tmp_path / "init" / "model.pt"), test_only_random_vgg=True))


def test_gan_resume_on_another_process_count_warns(pairs, tmp_path, caplog):
    """The relativistic loss's batch means are per process, so a gan run resumed under
    another number of torchrun processes changes objective: said, not silent."""
    train(_cfg(pairs, tmp_path / "init", arch="srcnn", iters=1))
    run, init = tmp_path / "gan", str(tmp_path / "init" / "model.pt")
    train(_cfg(pairs, run, stage="gan", iters=1, init=init, w_percep=0.0))
    path = run / "checkpoints" / "iter_00000001.pt"
    assert load_checkpoint(path)["train_state"]["processes"] == 1
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_state"]["processes"] = 2  # as if written under torchrun --nproc_per_node 2
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="microct_sr.train"):
        train(_cfg(pairs, run, stage="gan", iters=2, resume=True, init=init, w_percep=0.0))
    assert "trained on 2 process(es), now 1" in caplog.text


def test_psnr_resume_on_another_process_count_does_not_warn(pairs, tmp_path, caplog):
    """The psnr stage has no batch-mean term: its resume on another process count continues
    the same objective, so it says nothing (only the gan stage's relativistic loss changes)."""
    run = tmp_path / "psnr"
    train(_cfg(pairs, run, arch="srcnn", iters=1))
    path = run / "checkpoints" / "iter_00000001.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["train_state"]["processes"] == 1
    ckpt["train_state"]["processes"] = 2
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="microct_sr.train"):
        summary = train(_cfg(pairs, run, arch="srcnn", iters=2, resume=True))
    assert summary["iterations"] == 2 and "process(es)" not in caplog.text


def test_global_batch_not_divisible_by_world_size_is_refused_in_process(pairs, tmp_path,
                                                                       monkeypatch):
    """The WORLD_SIZE check runs before any process group or file: a new run names the
    global batch, a resumed one says the batch is the run's (it cannot be changed there)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as e:
        train(_cfg(pairs, tmp_path / "odd", arch="srcnn", iters=1, batch_size=3))
    assert str(e.value).startswith("--batch-size 3 (global batch) is not divisible by the 2 "
                                   "torchrun processes")
    assert not (tmp_path / "odd").exists()
    monkeypatch.delenv("WORLD_SIZE")
    run = tmp_path / "run"
    train(_cfg(pairs, run, arch="srcnn", iters=1, batch_size=3))
    before = sorted(p.name for p in run.rglob("*"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as e:
        train(_cfg(pairs, run, arch="srcnn", iters=2, batch_size=3, resume=True))
    assert str(e.value).startswith("--batch-size 3 (the run's global batch) is not divisible "
                                   "by the 2 torchrun processes")
    assert sorted(p.name for p in run.rglob("*")) == before


def _kill_at(monkeypatch, n_calls: int) -> None:
    """Make the n-th optimisation step raise, as a killed process would stop."""
    real = train_mod._Trainer._step
    calls = {"n": 0}

    def step(self, lr, hr):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise KeyboardInterrupt("killed")
        return real(self, lr, hr)

    monkeypatch.setattr(train_mod._Trainer, "_step", step)


def _scaler(monkeypatch, **kw) -> None:
    """Start the GradScaler of the next runs with ``kw`` (e.g. a huge init_scale)."""
    real = train_mod._Trainer._setup_amp

    def setup(self):
        real(self)
        assert self.scaler.is_enabled()
        self.scaler = torch.amp.GradScaler(self.device.type, **kw)

    monkeypatch.setattr(train_mod._Trainer, "_setup_amp", setup)


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize("stage,ema,amp", [("psnr", 0.0, False), ("gan", 0.0, False),
                                           ("psnr", 0.9, False), ("psnr", 0.0, True)])
def test_resume_equals_uninterrupted_run(pairs, tmp_path, monkeypatch, stage, ema, amp):
    """Killed in iteration 3 and resumed from the checkpoint of iteration 2, a run ends as the
    uninterrupted one: same log, weights, and optimiser, scheduler, GradScaler, EMA and
    discriminator states. lr_step 3 makes the resumed part cross a schedule step (the lr
    halves after iteration 3), so a scheduler that is not restored shows."""
    extra = {}
    if stage == "gan":
        train(_cfg(pairs, tmp_path / "init", arch="rcan", iters=1))
        extra = dict(init=str(tmp_path / "init" / "model.pt"), test_only_random_vgg=True)
    if amp:  # CPU fp16 AMP with a scale that grows 4x a step until fp16 overflows (the step
        # is skipped, the scale halves): the resumed run must go on with the saved scale
        _scaler(monkeypatch, init_scale=2.0**17, growth_factor=4.0, growth_interval=1)
        extra = dict(test_only_cpu_amp=True)
    kw = dict(arch="rcan", stage=stage, iters=4, save_every=2, val_every=4, deterministic=True,
              ema=ema, lr_step=3, **extra)
    train(_cfg(pairs, tmp_path / "straight", **kw))
    with monkeypatch.context() as m:
        _kill_at(m, 3)  # dies in iteration 3, after the checkpoint of iteration 2
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(pairs, tmp_path / "killed", **kw))
    with open(tmp_path / "killed" / "train_log.csv", "a") as f:
        f.write("3,0.1")  # a row cut short by the kill
    s = train(_cfg(pairs, tmp_path / "killed", resume=True, **kw))
    assert s["iterations_this_run"] == 2
    a, b = _log(tmp_path / "straight"), _log(tmp_path / "killed")
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "l1", "gan", "percep", "d_loss", "lr", "val_psnr"):
            if ra[k]:
                assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-4, abs=1e-6), (k, ra)
    sa = load_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    sb = load_checkpoint(tmp_path / "killed" / "model.pt")["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    last = Path("checkpoints") / "iter_00000004.pt"
    ta = load_checkpoint(tmp_path / "straight" / last)["train_state"]
    tb = load_checkpoint(tmp_path / "killed" / last)["train_state"]
    assert ta["scaler"] == tb["scaler"] and bool(ta["scaler"]) == amp
    # the lr is logged after each step: 1e-4 * 0.5 ** (iteration // 3)
    assert [float(r["lr"]) for r in a] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5])
    states = ["optimizer_g", "scheduler_g"]
    if stage == "gan":
        states += ["discriminator", "optimizer_d", "scheduler_d"]
    assert set(states) <= set(ta) and ("discriminator" in ta) == (stage == "gan")
    for key in states:  # Adam moments and step counts, schedule position, the discriminator
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"train_state[{key!r}]: {m}")
    if amp:  # x4 or x1/2 a step: the scale saved at iteration 2 is not the initial one
        mid = load_checkpoint(tmp_path / "killed" / "checkpoints" / "iter_00000002.pt")
        assert mid["train_state"]["scaler"]["scale"] != 2.0**17
    if ema:  # the EMA (model.pt above) and the raw weights both continue exactly
        assert ta["ema"] == tb["ema"] == {"decay": ema, "updates": 4}
        for k in ta["model"]:
            torch.testing.assert_close(ta["model"][k], tb["model"][k], rtol=1e-5, atol=1e-6)


def test_weight_ema_recurrence_with_warm_up():
    net = torch.nn.Linear(3, 2)
    net.register_buffer("count", torch.zeros(()))
    ema = train_mod.WeightEMA(net, 0.5)
    assert [ema.decay_at(t) for t in (0, 1, 8, 100)] == [0.1, 2 / 11, 0.5, 0.5]
    assert train_mod.WeightEMA(net, 0.999).decay_at(10**6) == 0.999
    expect = {k: v.double() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for t in range(12):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            net.count += 1
        ema.update(net)
        d = min(0.5, (1 + t) / (10 + t))
        expect = {k: d * expect[k] + (1 - d) * v.double() for k, v in net.named_parameters()}
        got = dict(ema.module.named_parameters())
        for k in expect:
            torch.testing.assert_close(got[k].double(), expect[k], rtol=1e-6, atol=1e-6)
        assert not torch.equal(got["weight"], net.weight)
    assert ema.updates == 12 and float(ema.module.count) == 12  # buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_weights_in_checkpoints_and_model_file(pairs, tmp_path):
    train(_cfg(pairs, tmp_path / "init", arch="srcnn", iters=1))
    kw = dict(arch="srcnn", iters=3, save_every=1, val_every=1,
              init=str(tmp_path / "init" / "model.pt"))
    train(_cfg(pairs, tmp_path / "plain", **kw))
    s = train(_cfg(pairs, tmp_path / "ema", ema=0.9, **kw))
    assert s["ema_decay"] == 0.9
    avg = load_checkpoint(tmp_path / "init" / "model.pt")["state_dict"]  # EMA starts at --init
    for t in range(3):
        ckpt = load_checkpoint(tmp_path / "ema" / "checkpoints" / f"iter_{t + 1:08d}.pt")
        raw, d = ckpt["train_state"]["model"], min(0.9, (1 + t) / (10 + t))
        avg = {k: d * avg[k] + (1 - d) * raw[k] for k in raw}  # the file holds the average
        for k in raw:
            torch.testing.assert_close(ckpt["state_dict"][k], avg[k], rtol=1e-5, atol=1e-6)
        assert ckpt["train_state"]["ema"] == {"decay": 0.9, "updates": t + 1}
    assert any(not torch.equal(avg[k], raw[k]) for k in raw)
    model, final = load_model(tmp_path / "ema" / "model.pt")  # what upscale/evaluate load
    assert final["provenance"]["weights"] == "ema" and final["provenance"]["ema_decay"] == 0.9
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, avg[k], rtol=1e-5, atol=1e-6)
    plain = load_checkpoint(tmp_path / "plain" / "model.pt")  # EMA leaves training as it was
    assert "weights" not in plain["provenance"]
    for k in raw:
        torch.testing.assert_close(plain["state_dict"][k], raw[k], rtol=1e-6, atol=1e-7)


def test_split_by_scan_is_saved_and_followed(pairs, tmp_path):
    train(_cfg(pairs, tmp_path / "r1", arch="srcnn", iters=1, seed=4))
    split = json.loads((tmp_path / "r1" / "split.json").read_text())
    assert split == make_split(["rat1", "rat2", "rat3", "rat4", "rat5"], 4)
    assert load_checkpoint(tmp_path / "r1" / "model.pt")["provenance"]["split"] == split
    chosen = {"train": ["rat5"], "val": ["rat1", "rat2"], "test": ["rat3", "rat4"]}
    (tmp_path / "split.json").write_text(json.dumps(chosen))
    trainer = train_mod._Trainer(_cfg(pairs, tmp_path / "r2", arch="srcnn", iters=1,
                                      split_file=str(tmp_path / "split.json")).resolved(),
                                 train_mod._Dist())
    assert json.loads((tmp_path / "r2" / "split.json").read_text()) == chosen
    assert {p.scan_id for p in trainer.train_ds.pairs} == {"rat5"}
    assert {p.scan_id for p in trainer.val_ds.pairs} == {"rat1", "rat2"}


def test_non_finite_losses_skip_then_stop(pairs, tmp_path, monkeypatch):
    real_l1 = train_mod.l1_loss
    calls = {"n": 0}

    def flaky(sr, hr):  # one NaN at iteration 2, then NaN from iteration 5 on
        calls["n"] += 1
        loss = real_l1(sr, hr)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 5 else loss

    monkeypatch.setattr(train_mod, "l1_loss", flaky)
    with pytest.raises(train_mod._NonFiniteLossError, match="iter_00000004.pt"):
        train(_cfg(pairs, tmp_path / "nan", arch="srcnn", iters=20, save_every=2,
                   max_bad_steps=3))
    rows = _log(tmp_path / "nan")
    assert [int(r["skipped"]) for r in rows[:4]] == [0, 1, 0, 0]
    # no checkpoint at a skipped step (2) or inside the failing run (6)
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == [
        "iter_00000004.pt"]
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_single_scan_trains_without_validation(tmp_path):
    one = make_pair_folder(tmp_path / "one", ["rat9"], 2, lr_patch=4)
    s = train(_cfg([str(one)], tmp_path / "r", arch="srcnn", iters=2, val_every=1))
    assert s["split"] == {"train": 1, "val": 0, "test": 0} and s["val_psnr"] is None
    assert (tmp_path / "r" / "model.pt").is_file()


def test_cpu_threads_leave_cores_to_workers(pairs, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    train(_cfg(pairs, tmp_path / "t", arch="srcnn", iters=1, workers=1, device="cpu"))
    assert "using 1 torch thread(s) beside 1 data worker(s)" in caplog.text
    assert torch.get_num_threads() == 2  # restored after the run


def _run_recording_dtypes(cfg: TrainConfig) -> tuple[dict, dict[str, set]]:
    """Train like ``train`` does; also return the output dtypes of the first conv of the
    generator, discriminator and VGG19 (those that exist)."""
    trainer = train_mod._Trainer(cfg.resolved(), train_mod._Dist())
    dtypes: dict[str, set] = {}
    for name in ("model", "disc", "perceptual"):
        net = getattr(trainer, name)
        if net is not None:
            conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
            seen = dtypes.setdefault(name, set())
            conv.register_forward_hook(lambda mod, args, out, seen=seen: seen.add(out.dtype))
    return trainer.run(), dtypes


def test_amp_is_cuda_only(pairs, tmp_path, caplog):
    """Production: --amp on the CPU warns and trains in float32 without a GradScaler."""
    s, dtypes = _run_recording_dtypes(_cfg(pairs, tmp_path / "amp", arch="srcnn", iters=1,
                                           amp=True, device="cpu"))
    assert s["iterations"] == 1 and "CUDA only" in caplog.text
    assert dtypes == {"model": {torch.float32}}
    ckpt = load_checkpoint(tmp_path / "amp" / "checkpoints" / "iter_00000001.pt")
    assert ckpt["train_state"]["scaler"] == {}


def test_cpu_fp16_amp_trains_both_stages(pairs, tmp_path, caplog):
    """The CUDA fp16 path (autocast + GradScaler) with real fp16 numerics on the CPU."""
    s, dtypes = _run_recording_dtypes(_cfg(pairs, tmp_path / "psnr", arch="rcan", iters=3,
                                           val_every=3, test_only_cpu_amp=True))
    assert "CUDA only" not in caplog.text
    assert dtypes == {"model": {torch.float16}}  # training and validation forwards
    g, gan_dtypes = _run_recording_dtypes(_cfg(
        pairs, tmp_path / "gan", stage="gan", iters=2, val_every=2, test_only_cpu_amp=True,
        init=str(tmp_path / "psnr" / "model.pt"), test_only_random_vgg=True))
    assert gan_dtypes == {k: {torch.float16} for k in ("model", "disc", "perceptual")}
    for stage, iters, summary in (("psnr", 3, s), ("gan", 2, g)):
        run = tmp_path / stage
        assert summary["iterations"] == iters and np.isfinite(summary["val_psnr"])
        for r in _log(run):
            assert int(r["skipped"]) == 0
            for k in ("loss", "l1", "gan", "percep", "d_loss"):
                if k in ("loss", "l1") or stage == "gan":
                    assert np.isfinite(float(r[k])), (stage, k, r)
        ckpt = load_checkpoint(run / "checkpoints" / f"iter_{iters:08d}.pt")
        scaler = ckpt["train_state"]["scaler"]
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] == iters  # no overflow
        assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values()
                   if v.is_floating_point())  # fp32 master weights
        _check_model_file(run, stage, iters)  # loads with load_model, finite fp32 output


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step")
def test_cpu_fp16_overflow_skips_the_step_and_halves_the_scale(pairs, tmp_path, monkeypatch):
    """Scaled gradients that overflow fp16 (finite loss): the GradScaler skips the optimiser
    step and halves its scale; that is neither a skipped step in the log nor divergence."""
    # L1's gradient is +-scale/N at each of the N = 2 * 32 * 32 = 2**11 output pixels: at a
    # scale of 2**27 it is 2**16 > 65504, the fp16 maximum, in the last conv's fp16 output
    _scaler(monkeypatch, init_scale=2.0**27)
    kw = dict(arch="srcnn", iters=16, save_every=1, keep=16, val_every=16, max_bad_steps=1,
              test_only_cpu_amp=True)
    before = train_mod._Trainer(_cfg(pairs, tmp_path / "init", **kw).resolved(),
                                train_mod._Dist()).model.state_dict()  # the seeded init
    train(_cfg(pairs, tmp_path / "run", **kw))  # max_bad_steps=1: no NaN-loss skip at all
    rows = _log(tmp_path / "run")
    assert [int(r["skipped"]) for r in rows] == [0] * 16
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    scale, overflows = 2.0**27, 0
    for t in range(1, 17):
        state = load_checkpoint(tmp_path / "run" / "checkpoints" / f"iter_{t:08d}.pt")
        weights, new_scale = state["state_dict"], state["train_state"]["scaler"]["scale"]
        same = all(torch.equal(weights[k], before[k]) for k in weights)
        if new_scale < scale:  # an fp16 overflow: step skipped, scale halved, weights kept
            assert new_scale == scale / 2 and same, t
            overflows += 1
        else:  # a real step (growth_interval 2000: the scale stays)
            assert new_scale == scale and not same, t
        adam = state["train_state"]["optimizer_g"]["state"]  # Adam never saw skipped steps
        assert {int(v["step"]) for v in adam.values()} == ({t - overflows} if t > overflows
                                                            else set()), t
        scale, before = new_scale, weights
    assert overflows >= 1 and overflows < 16  # it overflowed, then recovered and trained


def test_resume_turns_the_grad_scaler_on_and_off(pairs, tmp_path):
    """A float32 run resumed with fp16 AMP starts a fresh GradScaler (its saved state is
    empty); an AMP run resumed in float32 ignores the saved scaler state."""
    kw = dict(arch="srcnn", save_every=1)
    train(_cfg(pairs, tmp_path / "r", iters=1, **kw))
    train(_cfg(pairs, tmp_path / "r", iters=2, resume=True, test_only_cpu_amp=True, **kw))
    train(_cfg(pairs, tmp_path / "r", iters=3, resume=True, **kw))
    scalers = [load_checkpoint(tmp_path / "r" / "checkpoints" / f"iter_{t:08d}.pt")[
        "train_state"]["scaler"] for t in (1, 2, 3)]
    assert scalers[0] == scalers[2] == {} and scalers[1]["_growth_tracker"] == 1


def test_keeps_newest_and_best(pairs, tmp_path):
    train(_cfg(pairs, tmp_path / "k", arch="srcnn", iters=6, save_every=1, val_every=2, keep=2))
    best = load_checkpoint(tmp_path / "k" / "model.pt")["provenance"]["best_iteration"]
    names = {p.name for p in (tmp_path / "k" / "checkpoints").iterdir()}
    assert names == {"iter_00000005.pt", "iter_00000006.pt", f"iter_{best:08d}.pt"}


def test_cli_errors(pairs, tmp_path, run_cli, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("train", "--stage", "psnr", "--data", empty, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "pairs.csv" in r.stderr and str(empty) in r.stderr

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run_cli("train", "--stage", "psnr", "--data", pairs[0], "--out", tmp_path / "o",
                "--init", bad)
    assert r.exit_code == 2 and str(bad) in r.stderr

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(losses, "_download_vgg", lambda dest: (_ for _ in ()).throw(
        OSError("no internet")))
    r = run_cli("train", "--stage", "gan", "--data", pairs[0], "--out", tmp_path / "o",
                "--init", bad)
    assert r.exit_code == 2 and "VGG19" in r.stderr and "--vgg-weights" in r.stderr
    assert "--percep-weight 0" in r.stderr
    assert not (tmp_path / "o").exists()  # stopped before any work

    vgg = tmp_path / "vgg19.pth"  # any file passes the existence check; --init is checked next
    vgg.write_bytes(b"x")
    r = run_cli("train", "--stage", "gan", "--data", pairs[0], "--out", tmp_path / "o2",
                "--vgg-weights", vgg)
    assert r.exit_code == 2 and "--init" in r.stderr


def test_cli_init_warns_naming_the_network_options_it_ignores(pairs, tmp_path, run_cli):
    """--init trains the file's network: an --arch or model option given on the command line
    that differs from it is named in a warning (it used to be an INFO line that named neither);
    options equal to the file's, and an --arch left at its default, are not."""
    train(_cfg(pairs, tmp_path / "init", arch="srcnn", iters=1))
    args = ["train", "--stage", "psnr", "--data", pairs[0], "--preset", "tiny", "--iters", "1",
            "--batch-size", "2", "--workers", "0", "--quiet", "--init",
            tmp_path / "init" / "model.pt"]
    r = run_cli(*args, "--out", tmp_path / "a", "--arch", "rcan", "--n-feats", "8",
                "--n-rcabs", "20")  # the file's value (unused by srcnn)
    assert r.exit_code == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "ignored" in ln)
    assert line.startswith("WARNING") and "--arch rcan (the file's: srcnn)" in line
    assert "--n-feats 8 (the file's: 16)" in line and "--n-rcabs" not in line
    assert load_checkpoint(tmp_path / "a" / "model.pt")["config"]["arch"] == "srcnn"
    r = run_cli(*args, "--out", tmp_path / "b")  # the default --arch r2rcan was not asked for
    assert r.exit_code == 0 and "ignored" not in r.stderr, r.stderr


def test_cli_resume_with_another_ema_is_refused(pairs, tmp_path, run_cli):
    args = ["train", "--stage", "psnr", "--data", pairs[0], "--arch", "srcnn", "--preset", "tiny",
            "--batch-size", "2", "--workers", "0", "--quiet", "--out"]
    run = tmp_path / "run"
    r = run_cli(*args, run, "--iters", "1", "--ema", "0.9")
    assert r.exit_code == 0, r.stderr
    r = run_cli(*args, run, "--iters", "2", "--resume", "--ema", "0")
    assert r.exit_code == 2 and str(run) in r.stderr and "--ema: saved 0.9, given 0" in r.stderr
    r = run_cli(*args, run, "--iters", "2", "--resume")  # not given: the run's 0.9
    assert r.exit_code == 0, r.stderr
    assert load_model(run / "model.pt")[1]["provenance"]["ema_decay"] == 0.9
    r = run_cli(*args, tmp_path / "bad", "--ema", "1")
    assert r.exit_code == 2 and "[0, 1)" in r.stderr and not (tmp_path / "bad").exists()


def _newest_state(run_dir) -> dict:
    """The train_state of the newest checkpoint in ``run_dir``."""
    return load_checkpoint(max((run_dir / "checkpoints").glob("iter_*.pt")))["train_state"]


def test_cli_resume_keeps_the_runs_options_and_refuses_others(pairs, tmp_path, run_cli):
    """--resume with only --stage/--data/--out continues a run started with other than the
    default options; options that define the run and differ are listed and refused (nothing
    is written); --iters, --workers, --keep, --val-every may change."""
    run = tmp_path / "run"
    base = ["train", "--stage", "psnr", "--data", pairs[0], "--out", run, "--quiet"]
    r = run_cli(*base, "--arch", "srcnn", "--preset", "tiny", "--batch-size", "2", "--lr", "1e-3",
                "--pixel-loss", "mse", "--seed", "3", "--iters", "2", "--workers", "0")
    assert r.exit_code == 0, r.stderr
    r = run_cli(*base, "--resume", "--iters", "3", "--workers", "0", "--keep", "5",
                "--val-every", "1", "--lr", "0.001")  # the same lr, spelled otherwise
    assert r.exit_code == 0, r.stderr
    state = _newest_state(run)
    saved = state["train_config"]
    assert state["iteration"] == 3 and saved["iters"] == 3 and saved["keep"] == 5
    assert (saved["arch"], saved["preset"], saved["batch_size"], saved["lr"],
            saved["pixel_loss"], saved["seed"]) == ("srcnn", "tiny", 2, 1e-3, "mse", 3)
    prov = load_model(run / "model.pt")[1]["provenance"]
    assert prov["preset"] == "tiny" and prov["pixel_loss"] == "mse"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = run_cli(*base, "--resume", "--iters", "5", "--workers", "0", "--preset", "small",
                "--pixel-loss", "l1", "--arch", "rcan", "--n-feats", "8", "--lr", "0.01",
                "--batch-size", "4", "--data", pairs[1])
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2
    for diff in ("--preset: saved tiny, given small", "--pixel-loss: saved mse, given l1",
                 "--arch: saved srcnn, given rcan", "given 8", "--lr: saved 0.001, given 0.01",
                 "--batch-size: saved 2, given 4",
                 f"--data: saved {pairs[0]}, given {pairs[0]} {pairs[1]}"):
        assert diff in error, diff
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert _newest_state(run)["iteration"] == 3


def test_library_resume_compares_every_run_option(pairs, tmp_path):
    """TrainConfig callers pass the whole config: every run-defining field is compared."""
    kw = {"arch": "srcnn", "iters": 1}
    train(_cfg(pairs, tmp_path / "r", **kw))
    with pytest.raises(UserError,
                       match="--gray-augment: saved 0, given 0.5; --seed: saved 0, given 1"):
        train(_cfg(pairs, tmp_path / "r", resume=True, seed=1, gray_augment=0.5, **kw))
    with pytest.raises(UserError, match="lr_gamma: saved 0.5, given 0.1"):
        train(_cfg(pairs, tmp_path / "r", resume=True, lr_gamma=0.1, **kw))
    s = train(_cfg(pairs, tmp_path / "r", resume=True, **dict(kw, iters=2), workers=1))
    assert s["iterations_this_run"] == 1


def test_resume_of_a_finished_run_reports_it_and_writes_nothing(pairs, tmp_path):
    """A finished run resumed again is a no-op (raise iters to extend it); a run whose last
    checkpoint is final but model.pt is missing gets model.pt; iters below it are refused."""
    run = tmp_path / "r"
    kw = {"arch": "srcnn", "iters": 2, "val_every": 1}
    first = train(_cfg(pairs, run, **kw))
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = train(_cfg(pairs, run, resume=True, **kw))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert again["iterations"] == 2 and again["iterations_this_run"] == 0
    for k in ("val_psnr", "bicubic_val_psnr"):
        assert again[k] == pytest.approx(first[k], rel=1e-5)
    assert {k: again[k] for k in ("best_val_psnr", "best_iteration", "split", "intensity",
                                  "arch")} == {k: first[k] for k in ("best_val_psnr",
                                                                     "best_iteration", "split",
                                                                     "intensity", "arch")}
    (run / "model.pt").unlink()  # killed after the last checkpoint, before model.pt
    s = train(_cfg(pairs, run, resume=True, **kw))
    assert s["iterations_this_run"] == 0 and s["val_psnr"] == pytest.approx(first["val_psnr"])
    assert load_model(run / "model.pt")[1]["provenance"]["iterations"] == 2
    with pytest.raises(UserError, match="--iters 1: the run is already at iteration 2"):
        train(_cfg(pairs, run, resume=True, **dict(kw, iters=1)))
    assert train(_cfg(pairs, run, resume=True, **dict(kw, iters=3)))["iterations_this_run"] == 1


def test_mixed_8_and_16_bit_data_is_refused_up_front(pairs, tmp_path, run_cli):
    """Pooled uint8 and uint16 patches would get one window and the wrong dtype: exit 2
    naming both folders; a resumed run whose patches changed dtype is refused too."""
    p16 = make_16_bit_copy(Path(pairs[1]), tmp_path / "p16")
    args = ["train", "--stage", "psnr", "--preset", "tiny", "--workers", "0", "--iters", "1",
            "--batch-size", "2", "--arch", "srcnn", "--quiet"]
    r = run_cli(*args, "--data", pairs[0], "--data", p16, "--out", tmp_path / "mix")
    assert r.exit_code == 2 and "mixed patch dtypes" in r.stderr
    assert all(s in r.stderr for s in (pairs[0], str(p16), "uint8", "uint16"))
    assert not (tmp_path / "mix").exists()
    data = tmp_path / "data"
    shutil.copytree(pairs[1], data)
    assert run_cli(*args, "--data", data, "--out", tmp_path / "run").exit_code == 0
    shutil.rmtree(data)
    make_16_bit_copy(Path(pairs[1]), data)
    r = run_cli(*args, "--data", data, "--out", tmp_path / "run", "--resume", "--iters", "2")
    assert r.exit_code == 2 and "the patches are uint16, the run trained on uint8" in r.stderr


def test_16_bit_run_records_the_training_patches_window(pairs, tmp_path):
    """On uint16 patches model.pt's intensity is uint16 with the window that data.py
    documents: the min and max over the training scans' LR and HR patches (here all of them,
    fewer than 256), read back from the files, not 8-bit's [0, 255]. The held-out scans sit
    higher (offset 30000), so a window taken over every scan would show."""
    data = [make_16_bit_copy(Path(pairs[0]), tmp_path / "a16"),                # rat1-3
            make_16_bit_copy(Path(pairs[1]), tmp_path / "b16", offset=30000)]  # rat4-5
    (tmp_path / "split.json").write_text(json.dumps(
        {"train": ["rat1", "rat2", "rat3"], "val": ["rat4"], "test": ["rat5"]}))
    s = train(_cfg([str(d) for d in data], tmp_path / "run", arch="srcnn", iters=1,
                   split_file=str(tmp_path / "split.json")))
    with open(data[0] / "pairs.csv", newline="") as f:
        ids = [r["patch_id"] for r in csv.DictReader(f)]
    patches = [tifffile.imread(data[0] / sub / f"{i}.tif") for i in ids for sub in ("lr", "hr")]
    assert len(patches) == 2 * 9 and all(a.dtype == np.uint16 for a in patches)
    window = [float(min(a.min() for a in patches)), float(max(a.max() for a in patches))]
    assert 1000 <= window[0] < window[1] <= 1000 + 100 * 255 < 30000  # gain 100
    _, ckpt = load_model(tmp_path / "run" / "model.pt")
    assert ckpt["intensity"] == s["intensity"] == {"window": window, "dtype": "uint16"}


def test_same_data_folder_twice_is_counted_once(pairs, tmp_path, run_cli):
    """a, a again and the parent of a and b pool the patches of a and b once each."""
    args = ["train", "--stage", "psnr", "--preset", "tiny", "--workers", "0", "--iters", "1",
            "--batch-size", "2", "--arch", "srcnn", "--quiet", "--data", pairs[0]]
    runs = [run_cli(*args, *more, "--out", tmp_path / name) for name, more in (
        ("ab", ["--data", pairs[1]]),
        ("twice", ["--data", pairs[0], "--data", Path(pairs[0]).parent]))]
    assert [r.exit_code for r in runs] == [0, 0], runs[1].stderr
    counts = [re.search(r"\d+ train / \d+ val patches", r.stderr).group() for r in runs]
    assert counts[0] == counts[1] and "given more than once" in runs[1].stderr


def test_out_under_a_file_is_refused_before_any_work(pairs, tmp_path, run_cli):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli("train", "--stage", "psnr", "--data", pairs[0], "--out", afile / "sub",
                "--preset", "tiny", "--workers", "0", "--quiet")
    assert r.exit_code == 2 and f"{afile}: is a file" in r.stderr


def test_a_second_run_into_a_folder_another_run_is_writing_is_refused(pairs, tmp_path,
                                                                    run_cli):
    """Two `train --out RUN` started together both passed the 'no checkpoint yet' check and
    wrote their checkpoints and logs into one folder. The folder is locked for a run's life
    (here held as a running train holds it); the lock goes with the run."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    args = ["train", "--stage", "psnr", "--data", pairs[0], "--out", run, "--preset", "tiny",
            "--iters", "1", "--batch-size", "2", "--workers", "0", "--quiet"]
    with open(run / ".microct-sr-train.lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_cli(*args)
    assert r.exit_code == 2 and "another `microct-sr train` is writing" in r.stderr, r.stderr
    assert not (run / "model.pt").exists() and not (run / "checkpoints").exists()
    assert run_cli(*args).exit_code == 0  # the other run is gone: this one runs
    r = run_cli(*args[:-1], "--resume", "--iters", "2", "--quiet")  # and a resume after it
    assert r.exit_code == 0, r.stderr


def test_the_run_folder_is_locked_while_the_run_trains_and_released_after(pairs, tmp_path,
                                                                           monkeypatch):
    """The lock is held for the run's whole life (not only while it is taken): another
    process's attempt during a training step is refused; after the run it succeeds."""
    import fcntl

    run, seen = tmp_path / "run", []
    real = train_mod._Trainer._step

    def step(self, lr, hr):
        if not seen:
            with open(run / ".microct-sr-train.lock", "a+") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("free")
                except BlockingIOError:
                    seen.append("held")
        return real(self, lr, hr)

    monkeypatch.setattr(train_mod._Trainer, "_step", step)
    train(_cfg(pairs, run, arch="srcnn", iters=2))
    assert seen == ["held"]
    with open(run / ".microct-sr-train.lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: no BlockingIOError


def test_a_run_another_run_finished_while_this_one_started_is_not_clobbered(pairs, tmp_path,
                                                                            monkeypatch):
    """The 'no run here yet' check and taking the lock are two steps: a run that finished in
    between (its model.pt now in RUN_DIR) is found again under the lock and kept."""
    run = tmp_path / "run"
    real = train_mod._init_distributed

    def other_run_finishes_meanwhile(cfg):
        run.mkdir(parents=True, exist_ok=True)
        (run / "model.pt").write_bytes(b"the other run")
        return real(cfg)

    monkeypatch.setattr(train_mod, "_init_distributed", other_run_finishes_meanwhile)
    with pytest.raises(UserError, match="already holds a training run") as e:
        train(_cfg(pairs, run, arch="srcnn", iters=1))
    assert e.value.path == str(run)
    assert (run / "model.pt").read_bytes() == b"the other run"
    assert not (run / "checkpoints").exists() and not (run / "split.json").exists()


def test_cli_runs_and_refuses_to_clobber(pairs, tmp_path, run_cli):
    args = ["train", "--stage", "psnr", "--data", pairs[0], "--data", pairs[1], "--out",
            tmp_path / "run", "--arch", "edsr", "--preset", "tiny", "--n-feats", "8",
            "--iters", "2", "--batch-size", "2", "--workers", "0", "--json"]
    r = run_cli(*args)
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["iterations"] == 2 and summary["split"] == {"train": 3, "val": 1, "test": 1}
    assert load_model(tmp_path / "run" / "model.pt")[1]["config"]["n_feats"] == 8
    r = run_cli(*args)
    assert r.exit_code == 2 and "--resume" in r.stderr

    lr_scan = tmp_path / "lr.tif"  # the trained model file works in `upscale` as is
    tifffile.imwrite(lr_scan, np.stack([tifffile.imread(p) for p in
                                        sorted((Path(pairs[0]) / "lr").glob("*.tif"))[:3]]),
                     photometric="minisblack")
    r = run_cli("upscale", lr_scan, tmp_path / "sr.tif", "--model", tmp_path / "run" / "model.pt",
                "--spacing-um", "80,80,80", "--quiet")
    assert r.exit_code == 0, r.stderr
    sr = tifffile.imread(tmp_path / "sr.tif")
    assert sr.shape == (3, 32, 32) and sr.dtype == np.uint8


def test_cli_lr_step_and_gray_augment_reach_the_run(pairs, tmp_path, run_cli):
    r = run_cli("train", "--stage", "psnr", "--data", pairs[0], "--out", tmp_path / "run",
                "--arch", "srcnn", "--preset", "tiny", "--iters", "5", "--batch-size", "2",
                "--lr", "1e-3", "--lr-step", "2", "--gray-augment", "0.5", "--workers", "0",
                "--quiet")
    assert r.exit_code == 0, r.stderr
    state = load_checkpoint(sorted((tmp_path / "run" / "checkpoints").glob("iter_*.pt"))[-1])
    assert state["train_state"]["train_config"]["lr_step"] == 2
    assert state["train_state"]["train_config"]["gray_augment"] == 0.5
    # halved after iterations 2 and 4
    assert state["train_state"]["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(2.5e-4)
    r = run_cli("train", "--stage", "psnr", "--data", pairs[0], "--out", tmp_path / "bad",
                "--preset", "tiny", "--lr-step", "0")
    assert r.exit_code != 0 and "lr_step must be at least 1" in r.stderr


def _torchrun(nproc: int, *args: str | Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N microct-sr train ARGS`` on the CPU (gloo,
    one thread per process); skips when the console script is not installed."""
    exe = shutil.which("microct-sr")
    if exe is None:
        pytest.skip("the microct-sr console script is not on PATH (package not installed)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "--no-python", exe, "train", *(str(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


_DDP_ARGS = ("--stage", "psnr", "--arch", "rcan", "--preset", "tiny", "--workers", "0",
             "--device", "cpu", "--quiet")


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_torchrun_two_gloo_processes_match_one(pairs, tmp_path, ema):
    p = _torchrun(2, "--out", tmp_path / "ddp", "--data", pairs[0], "--data", pairs[1],
                  *_DDP_ARGS, "--iters", "3", "--batch-size", "4", "--val-every", "1",
                  "--ema", str(ema), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)  # exactly one JSON document: only rank 0 reports
    assert summary["processes"] == 2
    train(_cfg(pairs, tmp_path / "single", arch="rcan", iters=3, batch_size=4, device="cpu",
               ema=ema))
    a = load_checkpoint(tmp_path / "ddp" / "model.pt")
    b = load_checkpoint(tmp_path / "single" / "model.pt")
    for k in a["state_dict"]:  # per-process batch 2 x 2 processes = one process with batch 4
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-6)
    # the CSV logs the loss of the whole batch (averaged over the processes), not rank 0's half
    rows_a, rows_b = _log(tmp_path / "ddp"), _log(tmp_path / "single")
    assert [r["iteration"] for r in rows_a] == [r["iteration"] for r in rows_b] == ["1", "2", "3"]
    for ra, rb in zip(rows_a, rows_b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4)
    if ema:  # the average of the unwrapped module, kept alike on both ranks, is what rank 0 wrote
        assert a["provenance"]["weights"] == "ema" and a["provenance"]["ema_updates"] == 3
        raw = load_checkpoint(sorted((tmp_path / "ddp" / "checkpoints").glob("*.pt"))[-1])
        assert any(not torch.equal(raw["train_state"]["model"][k], a["state_dict"][k])
                   for k in a["state_dict"])


@pytest.mark.slow
def test_torchrun_batch_that_does_not_divide_is_refused_and_resume_takes_another_nproc(
        pairs, tmp_path):
    """A global batch the processes cannot share is refused by every rank before any file is
    written; a run resumed under another process count continues as one process would."""
    data = ("--data", pairs[0], "--data", pairs[1])
    p = _torchrun(2, "--out", tmp_path / "odd", *data, *_DDP_ARGS, "--iters", "2",
                  "--batch-size", "3")
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all("--batch-size 3 (global batch) is not divisible by the 2 torchrun "
                          "processes" in ln for ln in errors), p.stderr[-3000:]
    assert not (tmp_path / "odd").exists()
    train(_cfg(pairs, tmp_path / "run", arch="rcan", iters=2, batch_size=3, device="cpu"))
    p = _torchrun(3, "--out", tmp_path / "run", *data, *_DDP_ARGS, "--iters", "4", "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    train(_cfg(pairs, tmp_path / "straight", arch="rcan", iters=4, batch_size=3, device="cpu"))
    a = load_checkpoint(tmp_path / "run" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_weights(pairs, tmp_path):
    exe = shutil.which("microct-sr")
    if exe is None:
        pytest.skip("the microct-sr console script is not on PATH (package not installed)")
    args = [exe, "train", "--stage", "psnr", "--data", pairs[0], "--arch", "srcnn",
            "--preset", "tiny", "--iters", "12", "--batch-size", "2", "--workers", "0",
            "--val-every", "12", "--keep", "2", "--deterministic", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = subprocess.run([*args, "--out", str(tmp_path / "straight")],
                              capture_output=True, text=True, timeout=300, env=env)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed), "--save-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while proc.poll() is None and not (killed / "checkpoints" / "iter_00000003.pt").exists():
            time.sleep(0.005)
        proc.kill()  # SIGKILL: no handler runs, files are as the kill left them
    finally:
        proc.wait()
    if (killed / "model.pt").exists():
        pytest.skip("the run finished before the kill (machine too fast for this check)")
    resumed = subprocess.run([*args, "--out", str(killed), "--resume"], capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    sa = load_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    sb = load_checkpoint(killed / "model.pt")["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_mse_and_l1_minimisers_are_the_mean_and_the_median():
    """Why --pixel-loss mse exists: where the HR is uncertain (here a pixel that is bone in one
    of four equally likely HR patches) the L1-optimal output is the median, the MSE-optimal
    (PSNR-optimal) one the mean."""
    hr = torch.tensor([0.0, 0.0, 0.0, 1.0])
    costs = {c: (losses.l1_loss(torch.full_like(hr, c), hr).item(),
                 losses.mse_loss(torch.full_like(hr, c), hr).item())
             for c in (0.0, 0.25, 0.5)}
    assert min(costs, key=lambda c: costs[c][0]) == 0.0    # median
    assert min(costs, key=lambda c: costs[c][1]) == 0.25   # mean
    assert costs[0.25][1] == pytest.approx(0.1875)


@pytest.mark.parametrize("pixel_loss", ["l1", "mse"])
def test_pixel_loss_option(pairs, tmp_path, pixel_loss):
    run_dir = tmp_path / pixel_loss
    train(_cfg(pairs, run_dir, iters=3, seed=0, pixel_loss=pixel_loss))
    rows = [r for r in _log(run_dir) if r["loss"]]
    assert rows
    for r in rows:  # the l1 column is L1 either way; the loss is the objective
        loss, l1 = float(r["loss"]), float(r["l1"])
        assert 0 < loss and (loss == l1 if pixel_loss == "l1" else loss < l1)
    _, ckpt = load_model(run_dir / "model.pt")
    assert ckpt["provenance"]["pixel_loss"] == pixel_loss


def test_model_file_records_the_training_lr_voxel_size(tmp_path):
    """`upscale` warns about scans at another scale from this entry; it comes from the pair
    folders' registration.json (what `pair` writes), training scans only."""
    import json

    folder = make_pair_folder(tmp_path / "p", ["rat1", "rat2", "rat3"], 3, lr_patch=4, seed=1)
    (folder / "registration.json").write_text(json.dumps(
        [{"scan_id": f"rat{i}", "hr_pixel_um": 10.0 + i, "factor": 8} for i in (1, 2, 3)]))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["rat1", "rat2"], "val": ["rat3"], "test": []}))
    train(_cfg([str(folder)], tmp_path / "run", iters=1, split_file=str(split)))
    _, ckpt = load_model(tmp_path / "run" / "model.pt")
    assert ckpt["provenance"]["lr_pixel_um"] == [88.0, 96.0]


def test_unknown_pixel_loss_is_a_clear_error(pairs, tmp_path):
    with pytest.raises(UserError, match="pixel loss 'huber'"):
        train(_cfg(pairs, tmp_path / "x", iters=1, pixel_loss="huber"))


def test_gray_augment_changes_the_batches_and_is_recorded(pairs, tmp_path):
    """The same seed with and without gray augmentation: the first step's loss differs (other
    gray levels), both are finite, and the model file says which was used."""
    runs = {}
    for p in (0.0, 1.0):
        run_dir = tmp_path / f"gray{p}"
        train(_cfg(pairs, run_dir, iters=2, seed=0, gray_augment=p))
        runs[p] = [float(r["loss"]) for r in _log(run_dir) if r["loss"]]
        assert load_model(run_dir / "model.pt")[1]["provenance"]["gray_augment"] == p
    assert all(np.isfinite(runs[0.0] + runs[1.0])) and runs[0.0][0] != runs[1.0][0]
    with pytest.raises(UserError, match="--gray-augment 1.5"):
        train(_cfg(pairs, tmp_path / "bad", iters=1, gray_augment=1.5))


@pytest.mark.parametrize("option,value,message", [
    ("--iters", "0", "iters must be at least 1"), ("--lr", "nan", "'--lr': 'nan'"),
    ("--lr", "-1", "'--lr': '-1' is not > 0"), ("--lr", "0", "'--lr': '0' is not > 0"),
    ("--gan-weight", "inf", "'--gan-weight': 'inf'"), ("--ema", "nan", "'--ema'"),
    ("--res-scale", "nan", "'--res-scale'"), ("--device", "gpu", "'--device': 'gpu'"),
    ("--workers", "-1", "--workers -1")])
def test_bad_numbers_are_refused_before_any_work(pairs, tmp_path, run_cli, option, value,
                                                message):
    """0 iterations is not "the preset's", a NaN or negative learning rate is not a rate."""
    r = run_cli("train", "--stage", "psnr", "--data", pairs[0], "--out", tmp_path / "o",
                "--preset", "tiny", "--workers", "0", "--quiet", option, value)
    assert r.exit_code == 2 and message in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,value,message", [
    ("lr", float("nan"), "--lr nan"), ("lr", -1e-4, "positive"), ("w_gan", -1.0, "loss weights"),
    ("w_percep", float("nan"), "loss weights"), ("iters", 0, "iters must be at least 1")])
def test_library_config_checks_what_the_cli_checks(pairs, tmp_path, field, value, message):
    """TrainConfig callers that bypass click get the same refusals."""
    with pytest.raises(UserError, match=message):
        _cfg(pairs, tmp_path, **{field: value}).resolved()


def test_missing_or_corrupt_patch_is_named(pairs, tmp_path, run_cli):
    """A patch missing anywhere in pairs.csv is found before training; a corrupt one read in
    a loader worker process comes back as one line naming the file."""
    data = tmp_path / "data"
    shutil.copytree(pairs[0], data)
    rows = list(csv.DictReader(open(data / "pairs.csv", newline="")))
    middle = data / "hr" / f"{rows[len(rows) // 2]['patch_id']}.tif"
    assert middle.is_file()
    middle.rename(tmp_path / "moved.tif")
    r = run_cli("train", "--stage", "psnr", "--data", data, "--out", tmp_path / "o",
                "--preset", "tiny", "--workers", "0", "--quiet")
    assert r.exit_code == 2 and f"{middle}: patch" in r.stderr and "missing" in r.stderr
    middle.write_bytes(b"not a TIFF at all")
    r = run_cli("train", "--stage", "psnr", "--data", data, "--out", tmp_path / "o2",
                "--preset", "tiny", "--iters", "30", "--batch-size", "4", "--workers", "1",
                "--quiet")
    assert r.exit_code == 2 and f"{middle}: cannot read this patch" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gan_stage_without_perceptual_term_needs_no_vgg(pairs, tmp_path, run_cli, monkeypatch):
    """--percep-weight 0: the gan stage runs where no VGG19 weights can be had (the loss is
    L1 + w_gan RaGAN), logs no perceptual loss and records both weights; negative weights are
    refused."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(losses, "_download_vgg", lambda dest: (_ for _ in ()).throw(
        OSError("no internet")))
    psnr = tmp_path / "psnr"
    train(_cfg(pairs, psnr, arch="srcnn", iters=1))
    args = ["train", "--stage", "gan", "--data", pairs[0], "--data", pairs[1], "--arch", "srcnn",
            "--preset", "tiny", "--iters", "2", "--batch-size", "2", "--workers", "0",
            "--init", psnr / "model.pt", "--quiet", "--percep-weight"]
    r = run_cli(*args, "0", "--gan-weight", "0.2", "--disc-feats", "4", "--out", tmp_path / "gan")
    assert r.exit_code == 0, r.stderr
    (ckpt,) = sorted((tmp_path / "gan" / "checkpoints").glob("iter_*.pt"))
    disc = torch.load(ckpt, weights_only=True)["train_state"]["discriminator"]
    assert disc["conv0.weight"].shape[0] == 4  # --disc-feats sets the U-Net's width
    rows = [row for row in _log(tmp_path / "gan") if row["loss"]]
    assert rows and all(row["percep"] == "" and float(row["gan"]) > 0 for row in rows)
    for row in rows:  # the objective is exactly L1 + 0.2 L_G
        assert float(row["loss"]) == pytest.approx(float(row["l1"]) + 0.2 * float(row["gan"]),
                                                   rel=1e-5)
    prov = load_model(tmp_path / "gan" / "model.pt")[1]["provenance"]
    assert prov["w_percep"] == 0 and prov["w_gan"] == 0.2
    r = run_cli(*args, "-1", "--out", tmp_path / "neg")
    assert r.exit_code == 2 and "'--percep-weight': '-1' is not >= 0" in r.stderr
    r = run_cli(*args, "0", "--disc-feats", "-2", "--out", tmp_path / "neg")
    assert r.exit_code == 2 and "disc_feats must be at least 1" in r.stderr


def test_a_model_below_bicubic_and_too_few_scans_are_flagged(pairs, tmp_path, caplog):
    """One iteration from random weights on two training scans: the log says the model is
    below bicubic (with the gap, to 2 decimals) and that two scans are few."""
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["rat1", "rat2"], "val": ["rat3"], "test": []}))
    with caplog.at_level(logging.INFO, logger="microct_sr.train"):
        s = train(_cfg(pairs, tmp_path / "run", iters=1, split_file=str(split)))
    gap = s["bicubic_val_psnr"] - s["val_psnr"]
    assert gap > 0  # the setup: an untrained network is far below bicubic
    assert f"scores {gap:.2f} dB below bicubic" in caplog.text
    assert "only 2 training scan(s)" in caplog.text
    assert re.search(r"val PSNR \d+\.\d\d dB, bicubic \d+\.\d\d dB\)", caplog.text)
