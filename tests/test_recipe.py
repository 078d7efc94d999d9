"""The default model's recipe (examples/train_default_model.py): its data-making helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from microct_sr.checkpoint import load_model, save_model
from microct_sr.metrics.morphometry import morphometry
from microct_sr.models import build_model, preset
from microct_sr.volume import write_volume

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "train_default_model.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("train_default_model", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scaled_mask_magnifies_thickness_and_keeps_the_bone_fraction(tmp_path):
    """Plates 3 voxels thick every 12: magnified 2x they are 6 thick, BV/TV stays 0.25; the
    near and far crops are the two ends of the magnified volume."""
    z = np.arange(48)
    mask = np.zeros((48, 48, 48), np.uint8)
    mask[(z % 12) < 3] = 1
    path = tmp_path / "mask.tif"
    write_volume(path, mask, (10.0, 10.0, 10.0))
    rec = _recipe()
    whole = rec.scaled_mask(path, 2.0, 0, size=96)
    near, far = rec.scaled_mask(path, 2.0, 0, size=64), rec.scaled_mask(path, 2.0, 1, size=64)
    assert whole.shape == (96, 96, 96) and whole.dtype == np.uint8
    assert np.array_equal(near, whole[:64, :64, :64])
    assert np.array_equal(far, whole[32:, 32:, 32:])
    assert abs(whole.mean() - 0.25) < 0.03
    thick = morphometry(whole > 0, (10.0, 10.0, 10.0))["tb_th_um"]
    plain = morphometry(mask > 0, (10.0, 10.0, 10.0))["tb_th_um"]
    assert 1.7 < thick / plain < 2.3, (thick, plain)


def test_adding_the_magnified_vertebrae_keeps_every_other_scan_setting(tmp_path, monkeypatch):
    """The magnified vertebrae draw their settings from their own generator, so the earlier
    volumes' seeded settings (the shipped models' data) stay the same with them added."""
    rec = _recipe()
    monkeypatch.setattr(rec, "run", lambda cmd: "")  # record the settings, simulate nothing
    monkeypatch.setattr(rec, "N_HEAVY", {"vert": 0, "vs": 0, "ph": 0})  # the third model's data
    monkeypatch.setattr(rec, "N_NEAR", 0)
    base = {"vert1": (tmp_path / "vert1.tif", "train"), "ph1": (tmp_path / "ph1.tif", "train"),
            "vert6": (tmp_path / "vert6.tif", "val"), "vert7": (tmp_path / "vert7.tif", "test")}
    scaled = {**base, "vs1a": (tmp_path / "vs1a.tif", "train"),
              "vs1b": (tmp_path / "vs1b.tif", "train"), "vs6a": (tmp_path / "vs6a.tif", "val"),
              "vs7a": (tmp_path / "vs7a.tif", "test")}
    without = rec.simulate_all(tmp_path, base, 3, 3)
    with_vs = rec.simulate_all(tmp_path, scaled, 3, 3)
    assert [s for s in with_vs if not s["hr_name"].startswith("vs")] == without
    added = [s for s in with_vs if s["hr_name"].startswith("vs")]
    assert {s["scan_id"] for s in added if s["split"] == "train"} == {
        f"vs1{c}-{k}" for c in "ab" for k in ("rand0", "rand1", "wide0", "wide1")}
    assert {s["setting"] for s in added if s["hr_name"] == "vs7a"} == set(rec.VERT_TEST_SETTINGS)


def test_adding_heavily_smoothed_scans_keeps_every_other_scan_setting(tmp_path, monkeypatch):
    """The heavily smoothed scans (fourth model) come from their own generator, on training
    volumes only, N_HEAVY per kind, with sigma 1.8-4.5 LR px; every other scan is unchanged."""
    rec = _recipe()
    monkeypatch.setattr(rec, "run", lambda cmd: "")
    hrs = {n: (tmp_path / f"{n}.tif", split) for n, split in (
        ("vert1", "train"), ("vert2", "train"), ("ph1", "train"), ("vs1a", "train"),
        ("vert6", "val"), ("vs6a", "val"), ("vert7", "test"))}
    full = rec.simulate_all(tmp_path, hrs, 3, 3)
    monkeypatch.setattr(rec, "N_HEAVY", {"vert": 0, "vs": 0, "ph": 0})
    light = rec.simulate_all(tmp_path, hrs, 3, 3)
    assert [s for s in full if not s["setting"].startswith("heavy")] == light
    heavy = [s for s in full if s["setting"].startswith("heavy")]
    assert sorted(s["scan_id"] for s in heavy) == [
        "ph1-heavy0", "vert1-heavy0", "vert1-heavy1", "vert2-heavy0", "vert2-heavy1",
        "vs1a-heavy0"]
    assert all(1.8 <= s["smoothing"] <= 4.5 for s in heavy)
    assert len({s["smoothing"] for s in heavy}) == len(heavy)  # drawn, not one fixed value


def test_near_nominal_scans_are_extra_and_near_the_nominal_setting(tmp_path, monkeypatch):
    """The near-nominal candidate's scans (N_NEAR per training volume, their own generator)
    leave every other scan as it was, and lie around 225 views / Hamming / smoothing 0.5."""
    rec = _recipe()
    monkeypatch.setattr(rec, "run", lambda cmd: "")
    hrs = {n: (tmp_path / f"{n}.tif", split) for n, split in (
        ("vert1", "train"), ("ph1", "train"), ("vs1a", "train"), ("vert6", "val"),
        ("vert7", "test"))}
    full = rec.simulate_all(tmp_path, hrs, 3, 3)
    monkeypatch.setattr(rec, "N_NEAR", 0)
    assert [s for s in full if not s["setting"].startswith("near")] == rec.simulate_all(
        tmp_path, hrs, 3, 3)
    near = [s for s in full if s["setting"].startswith("near")]
    assert sorted(s["scan_id"] for s in near) == [
        f"{n}-near{k}" for n in ("ph1", "vert1", "vs1a") for k in range(2)]
    assert all(180 <= s["views"] <= 300 and 8000 <= s["photons"] <= 40000
               and 0.2 <= s["smoothing"] <= 0.9 and s["filter"] in ("hamming", "hann")
               for s in near), near
    assert len({s["smoothing"] for s in near}) > 1  # drawn, not one fixed value


def _saved_model(path: Path, seed: int, **overrides):
    """A tiny r2rcan with seeded random weights, saved as a model file at ``path``."""
    config = preset("r2rcan", "tiny", **overrides)
    torch.manual_seed(seed)
    model = build_model(config)
    save_model(path, model, config, intensity={"window": [0.0, 255.0], "dtype": "uint8"},
               provenance={"stage": "psnr"})
    return model


def test_grown_model_computes_the_same_function_and_then_trains(tmp_path):
    """Three RCAB groups more, appended after the last Res2 group with a zero closing conv: the
    same output as the source model, and the new closing convs get gradients (training moves
    them off zero, and then the new blocks learn)."""
    src = _saved_model(tmp_path / "src.pt", 3, n_rcab_groups=2, n_res2_groups=2)
    rec = _recipe()
    grown, ckpt = load_model(rec.grow_model(tmp_path / "src.pt", tmp_path / "big.pt", 5))
    assert ckpt["config"]["n_rcab_groups"] == 5 and len(grown.body) == len(src.body) + 3
    assert ckpt["provenance"]["grown_from"] == str(tmp_path / "src.pt")
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), grown.eval()(x))
    grown.train()
    grown(x).mean().backward()
    new = list(grown.body)[len(src.body):]
    assert all(g.conv.weight.grad.abs().sum() > 0 for g in new)
    with pytest.raises(ValueError, match="only add RCAB groups"):
        rec.grow_model(tmp_path / "src.pt", tmp_path / "less.pt", 1)


def test_add_refinement_keeps_the_function_and_makes_a_loadable_refine_model(tmp_path):
    """The refine candidate starts from the light model's exact function; its saved config
    names the refine upsampler, so `upscale --model` rebuilds it; a non-light model fails."""
    src = _saved_model(tmp_path / "src.pt", 4)
    rec = _recipe()
    refined, ckpt = load_model(rec.add_refinement(tmp_path / "src.pt", tmp_path / "ref.pt"))
    assert ckpt["config"]["upsampler"] == "refine"
    assert ckpt["provenance"]["refined_from"] == str(tmp_path / "src.pt")
    x = torch.rand(2, 1, 10, 12)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), refined.eval()(x))
    with pytest.raises(ValueError, match="not 'light'"):
        rec.add_refinement(tmp_path / "ref.pt", tmp_path / "again.pt")


def test_gray_stage_command_and_model(tmp_path, monkeypatch):
    """The fourth model's stage passes gray augmentation, EMA and the lr step to `train`, on
    every training scan (split.json), and returns the run's final (EMA) model.pt."""
    rec = _recipe()
    calls = []
    monkeypatch.setattr(rec, "run", lambda cmd: calls.append(cmd) or "")
    model = rec.train(tmp_path, 4500, "small", pixel_loss="mse", init=tmp_path / "third.pt",
                      split="split.json", name="_gray", extra=rec.GRAY_OPTIONS, pick_best=False)
    assert model == tmp_path / "run_small_gray" / "model.pt"
    (cmd,) = calls
    opts = {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--") and not b.startswith("--")}
    assert opts["--gray-augment"] == "1.0" and opts["--ema"] == "0.999"
    assert opts["--lr-step"] == "1500" and opts["--pixel-loss"] == "mse"
    assert opts["--split-file"] == str(tmp_path / "split.json")
    assert opts["--init"] == str(tmp_path / "third.pt") and opts["--iters"] == "4500"


def test_widened_model_computes_the_same_function_and_learns_from_neighbours(tmp_path):
    """The 2.5D candidate starts as the 2D model (neighbour weights zero, so the middle slice
    alone decides) and the neighbours' head weights get gradients."""
    src = _saved_model(tmp_path / "src.pt", 5)
    rec = _recipe()
    wide, ckpt = load_model(rec.widen_input(tmp_path / "src.pt", tmp_path / "wide.pt", 1))
    assert ckpt["config"]["in_channels"] == 3 and ckpt["provenance"]["context"] == 1
    x = torch.rand(2, 3, 10, 12)
    with torch.no_grad():
        assert torch.equal(src.eval()(x[:, 1:2]), wide.eval()(x))
    wide.train()
    wide(x).mean().backward()
    assert wide.head.weight.grad[:, [0, 2]].abs().sum() > 0
    with pytest.raises(ValueError, match="already takes 3"):
        rec.widen_input(tmp_path / "wide.pt", tmp_path / "again.pt", 1)


def test_context_pairs_are_the_neighbour_crops_of_the_lr_scan(tmp_path):
    """The 2.5D pair folder made from a 2D one: each LR patch becomes the crops of slices
    k-1, k, k+1 (clamped), its middle page the stored patch; HR patches and pairs.csv stay."""
    import csv

    import tifffile

    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (4, 12, 12), dtype=np.uint8)
    write_volume(tmp_path / "lr.tif", lr, (80.0, 80.0, 80.0))
    src = tmp_path / "pairs"
    (src / "lr").mkdir(parents=True)
    (src / "hr").mkdir()
    rows = []
    for n, (k, cx, cy) in enumerate([(0, 4, 6), (2, 8, 5), (3, 6, 8)]):
        pid = f"s1_{n:05d}"
        tifffile.imwrite(src / "lr" / f"{pid}.tif", lr[k, cy - 2:cy + 2, cx - 2:cx + 2])
        tifffile.imwrite(src / "hr" / f"{pid}.tif", rng.integers(0, 256, (32, 32), np.uint8))
        rows.append({"patch_id": pid, "scan_id": "s1", "lr_slice": k, "lr_x": cx, "lr_y": cy})
    with open(src / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (src / "registration.json").write_text('[{"scan_id": "s1"}]')
    rec = _recipe()
    out = rec.context_pairs(tmp_path, [{"scan_id": "s1", "lr": str(tmp_path / "lr.tif")}], 1)
    assert out == tmp_path / "pairs_ctx1" and (out / "pairs.csv").read_bytes() == \
        (src / "pairs.csv").read_bytes()
    for r in rows:
        k, cx, cy = r["lr_slice"], r["lr_x"], r["lr_y"]
        want = lr[[max(k - 1, 0), k, min(k + 1, 3)], cy - 2:cy + 2, cx - 2:cx + 2]
        assert np.array_equal(tifffile.imread(out / "lr" / f"{r['patch_id']}.tif"), want)
        assert (out / "hr" / f"{r['patch_id']}.tif").read_bytes() == \
            (src / "hr" / f"{r['patch_id']}.tif").read_bytes()
    assert '"context": 1' in (out / "registration.json").read_text()
