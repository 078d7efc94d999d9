"""2.5D models (`pair --context k`): LR stacks in the data, the network's input channels,
training from them, and upscale feeding each slice with the same clamped neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from _train_data import make_pair_folder
from _volume_files import ArrayVolume

from microct_sr.checkpoint import load_model
from microct_sr.data import PatchDataset, augment_pair, patch_format, read_pairs
from microct_sr.errors import UserError
from microct_sr.infer import context_index, input_context, upscale_volume
from microct_sr.models import build_model, preset
from microct_sr.train import TrainConfig, train


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    root = tmp_path_factory.mktemp("context_pairs")
    return str(make_pair_folder(root / "ctx1", ["rat1", "rat2", "rat3"], 3, lr_patch=4,
                                seed=1, context=1))


def test_context_index_clamps_at_both_ends():
    assert context_index(0, 3, 1, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]
    assert context_index(2, 4, 2, 5).tolist() == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 4]]
    assert context_index(1, 3, 0, 5).tolist() == [[1], [2]]


def test_dataset_gives_stacks_and_augments_every_page_alike(stacks):
    ds = PatchDataset([stacks], augment=True, window=(0, 255))
    lr, hr = ds.read_raw(0)
    assert lr.shape == (3, 4, 4) and hr.shape == (32, 32)
    assert patch_format(ds.pairs) == ("uint8", 3)
    for code in range(8):
        a_lr, a_hr = augment_pair(lr, hr, code)
        for page in range(3):  # each page moves exactly as a 2D patch would
            assert np.array_equal(a_lr[page], augment_pair(lr[page], hr, code)[0])
        assert np.array_equal(a_hr, augment_pair(lr[1], hr, code)[1])
        x, y = ds[(0, code)]
        assert x.shape == (3, 4, 4) and y.shape == (1, 32, 32)
        assert torch.allclose(x, torch.from_numpy(a_lr.astype(np.float32) / 255))


def test_mixed_and_even_depths_are_refused_naming_the_patch(stacks, tmp_path):
    flat = make_pair_folder(tmp_path / "flat", ["rat9"], 2, lr_patch=4, seed=3)
    with pytest.raises(UserError, match=r"mixed LR patch depths.*3 slice.*has 1.*--context"):
        patch_format(read_pairs([stacks, flat]))
    even = make_pair_folder(tmp_path / "even", ["rat8"], 2, lr_patch=4, seed=3, context=1)
    first = even / "lr" / "rat8_00000.tif"  # the patch the check reads
    tifffile.imwrite(first, tifffile.imread(first)[:2], photometric="minisblack")
    with pytest.raises(UserError, match=r"2 slices.*odd") as e:
        patch_format(read_pairs([even]))
    assert str(first) in str(e.value)


@pytest.mark.parametrize("arch", ["r2rcan", "srcnn"])
def test_networks_take_a_stack_and_keep_the_middle_slice_as_the_residual(arch):
    """A 3-slice network maps (N, 3, h, w) to one SR slice; SRCNN's residual is the bicubic
    of the middle slice (with a zeroed body the output is exactly that)."""
    torch.manual_seed(0)
    net = build_model(preset(arch, "tiny", in_channels=3)).eval()
    x = torch.rand(2, 3, 5, 6)
    with torch.no_grad():
        assert net(x).shape == (2, 1, 40, 48)
        if arch == "srcnn":
            torch.nn.init.zeros_(net.body[-1].weight)
            torch.nn.init.zeros_(net.body[-1].bias)
            bicubic = F.interpolate(x[:, 1:2], scale_factor=8, mode="bicubic",
                                    align_corners=False)
            assert torch.allclose(net(x), bicubic)


def test_an_even_channel_count_is_refused_by_upscale():
    net = build_model(preset("r2rcan", "tiny", in_channels=2))
    with pytest.raises(UserError, match="2 input channels"):
        input_context(net)
    assert input_context(build_model(preset("r2rcan", "tiny", in_channels=5))) == 2


class _Writer:
    def __init__(self):
        self.parts: list[np.ndarray] = []

    def write(self, a: np.ndarray) -> None:
        self.parts.append(np.asarray(a))


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_upscale_feeds_each_slice_with_its_clamped_neighbours_reading_each_once(batch_size):
    torch.manual_seed(0)
    net = build_model(preset("r2rcan", "tiny", in_channels=5)).eval()
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, (7, 6, 5), dtype=np.uint8)
    src, writer = ArrayVolume(vol), _Writer()
    upscale_volume(src, writer, net, intensity={"window": [0, 255], "dtype": "uint8"},
                   batch_size=batch_size, device="cpu", quiet=True)
    got = np.concatenate(writer.parts)
    x = torch.from_numpy(vol.astype(np.float32) / 255)[torch.from_numpy(context_index(0, 7, 2, 7))]
    with torch.no_grad():
        want = (net(x)[:, 0].clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    assert got.shape == (7, 48, 40)
    assert np.abs(got.astype(int) - want).max() <= 1  # float rounding at .5 only
    assert sum(z1 - z0 for z0, z1 in src.reads) == 7  # neighbours are kept, not re-read


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=data, out=str(out), preset="tiny", batch_size=2, workers=0, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def test_training_on_stacks_makes_a_model_upscale_runs(stacks, tmp_path):
    s = train(_cfg([stacks], tmp_path / "run", iters=2, val_every=2))
    assert s["val_psnr"] is not None and s["bicubic_val_psnr"] > 10
    model, ckpt = load_model(tmp_path / "run" / "model.pt")
    assert ckpt["config"]["in_channels"] == 3
    vol = np.random.default_rng(1).integers(0, 256, (4, 5, 5), dtype=np.uint8)
    writer = _Writer()
    upscale_volume(ArrayVolume(vol), writer, model.eval(), intensity=ckpt["intensity"],
                   device="cpu", quiet=True)
    assert np.concatenate(writer.parts).shape == (4, 40, 40)


def test_a_model_and_patches_of_another_depth_are_refused_before_training(stacks, tmp_path,
                                                                           run_cli):
    flat = make_pair_folder(tmp_path / "flat", ["rat1", "rat2"], 2, lr_patch=4, seed=3)
    train(_cfg([str(flat)], tmp_path / "flat_run", iters=1))
    r = run_cli("train", "--stage", "psnr", "--data", stacks, "--out", tmp_path / "ft",
                "--init", tmp_path / "flat_run" / "model.pt", "--iters", "1", "--batch-size",
                "2", "--workers", "0", "--quiet")
    assert r.exit_code == 2, r.stderr
    assert "takes 1 LR slice per patch" in r.stderr and "3 LR slices" in r.stderr
    assert "--context 0" in r.stderr and str(tmp_path / "flat_run" / "model.pt") in r.stderr
    assert not (tmp_path / "ft" / "model.pt").exists()


def test_the_shipped_default_fine_tunes_on_context_1_pairs_only(stacks, tmp_path, run_cli):
    """The README's fine-tuning path: `pair --context 1` patches train from weights/default.pt;
    2D patches are refused up front, the message giving the --context to pair with."""
    from microct_sr.checkpoint import default_model_path

    default = default_model_path()
    if not default.exists():
        pytest.skip(f"no shipped default model at {default}")
    args = ["train", "--stage", "psnr", "--init", default, "--iters", "2", "--batch-size", "2",
            "--workers", "0", "--val-every", "2", "--quiet"]
    r = run_cli(*args, "--data", stacks, "--out", tmp_path / "ft")
    assert r.exit_code == 0, r.stderr
    assert load_model(tmp_path / "ft" / "model.pt")[1]["config"]["in_channels"] == 3
    flat = make_pair_folder(tmp_path / "flat", ["rat1", "rat2"], 2, lr_patch=4, seed=3)
    r = run_cli(*args, "--data", flat, "--out", tmp_path / "ft2")
    assert r.exit_code == 2 and "pair with --context 1" in r.stderr
