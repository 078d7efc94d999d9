"""infer.upscale_volume: batching, tiling, precision, intensity window, threads.

Uses in-memory stand-ins for the volume and the writer (``ArrayVolume``, ``CollectingWriter``)
so the numerics are checked without file I/O; tests/test_upscale_cli.py covers real files.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn
import torch.nn.functional as F
from _volume_files import ArrayVolume

from microct_sr import infer
from microct_sr.errors import UserError
from microct_sr.infer import (
    PrecisionState,
    output_geometry,
    ramp,
    resolve_window,
    scale_mismatch,
    self_ensemble,
    sr_forward,
    tile_starts,
    upscale_volume,
)
from microct_sr.models import build_model, preset


class CollectingWriter:
    """In-memory stand-in for volume.VolumeWriter: keeps what is written, in order."""

    def __init__(self, fail: bool = False):
        self.parts: list[np.ndarray] = []
        self.fail = fail

    def write(self, slices: np.ndarray) -> None:
        if self.fail:
            raise OSError("disk full")
        self.parts.append(np.asarray(slices))

    def result(self) -> np.ndarray:
        return np.concatenate(self.parts)


class NearestX8(nn.Module):
    """A parameter-free 'model' that repeats each pixel 8x8: exposes the intensity mapping."""

    config = preset("r2rcan", "tiny")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=8, mode="nearest")


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(preset("r2rcan", "tiny")).eval()


def lr_volume(dtype, z=6, y=10, x=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else 1.0
    vol = rng.uniform(0, hi, (z, y, x))
    return vol.astype(dtype) if np.dtype(dtype).kind == "u" else vol.astype(np.float32)


def run(array, model=None, **kw):
    intensity = kw.pop("intensity", {"window": [0, 255], "dtype": str(array.dtype)})
    writer = CollectingWriter()
    stats = upscale_volume(ArrayVolume(array), writer, model or tiny_model(),
                           intensity=intensity, device="cpu", quiet=True, **kw)
    return writer.result(), stats


@pytest.mark.parametrize("dtype,window", [(np.uint8, [0, 255]), (np.uint16, [0, 65535])])
def test_shape_and_dtype_kept(dtype, window):
    vol = lr_volume(dtype)
    out, stats = run(vol, intensity={"window": window, "dtype": np.dtype(dtype).name},
                     batch_size=4)
    assert out.shape == (6, 80, 96) and out.dtype == dtype
    assert stats["slices"] == 6 and stats["precision"] == "fp32" and stats["device"] == "cpu"


def test_output_geometry_keeps_z_and_divides_in_plane_spacing():
    assert output_geometry((500, 160, 160), (80.0, 80.0, 80.0), 8) == \
        ((500, 1280, 1280), (80.0, 10.0, 10.0))
    assert output_geometry((3, 4, 5), None, 8) == ((3, 32, 40), None)


def test_window_maps_back_to_input_units():
    """Nearest-neighbour 'model': values inside the window come back exactly, outside clipped."""
    vol = np.full((3, 4, 5), 2000, np.uint16)
    vol[0, 0, 0], vol[1, 1, 1], vol[2, 2, 2] = 1000, 3000, 60000
    out, stats = run(vol, model=NearestX8(), window=(1000, 3000),
                     intensity={"window": [0, 255], "dtype": "uint8"})
    assert stats["window"] == [1000.0, 3000.0]
    assert out.dtype == np.uint16
    expect = np.clip(vol, 1000, 3000).repeat(8, 1).repeat(8, 2)
    np.testing.assert_array_equal(out, expect)


def test_checkpoint_window_rescaled_for_other_integer_dtype(caplog):
    with caplog.at_level(logging.WARNING):
        lo, hi = resolve_window({"window": [0, 255], "dtype": "uint8"}, None, np.dtype("uint16"))
    assert (lo, hi) == (0, 65535) and "--window" in caplog.text
    assert resolve_window({"window": [10, 200], "dtype": "uint8"}, None, np.uint8) == (10, 200)
    with pytest.raises(UserError, match="empty"):
        resolve_window({"window": [0, 255], "dtype": "uint8"}, (5, 5), np.uint8)


@pytest.mark.parametrize("window", [(5, 5), (200, 10)])
def test_an_empty_window_given_is_refused_naming_the_option(window):
    """LO equal to HI or above it: the error names --window and both values as given (not the
    generic 'intensity window' message, which does not say which option to change)."""
    lo, hi = window
    with pytest.raises(UserError) as e:
        resolve_window({"window": [0, 255], "dtype": "uint8"}, window, np.uint8)
    assert str(e.value) == f"--window {lo} {hi}: the window is empty (LO must be below HI)"
    assert resolve_window({"window": [0, 255], "dtype": "uint8"}, (5, 5.5), np.uint8) == (5, 5.5)


def test_batch_size_invariance():
    vol = lr_volume(np.float32, z=5)
    intensity = {"window": [0, 1], "dtype": "float32"}
    a, _ = run(vol, batch_size=1, intensity=intensity)
    b, _ = run(vol, batch_size=4, intensity=intensity)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_reads_in_z_batches_in_order():
    vol = ArrayVolume(lr_volume(np.uint8, z=7))
    writer = CollectingWriter()
    upscale_volume(vol, writer, tiny_model(), intensity={"window": [0, 255], "dtype": "uint8"},
                   batch_size=3, device="cpu", quiet=True)
    assert vol.reads == [(0, 3), (3, 6), (6, 7)]
    assert [len(p) for p in writer.parts] == [3, 3, 1]


# Seam bound, relative to the output's range, for the tiny preset (random weights) on 40x40 LR
# slices cut into 20 px tiles overlapping by 8: measured 0.6 % max, 0.02 % mean
# (docs/upscale.md has the figures for the small preset).
SEAM_MAX_REL, SEAM_MEAN_REL = 0.015, 5e-4


@pytest.mark.parametrize("yx", [(40, 40), (24, 40), (40, 24), (16, 40)])
def test_tiled_matches_untiled_within_seam_bound(yx):
    """Non-square slices too (tile positions per axis; 16 rows fit in one tile)."""
    vol = lr_volume(np.float32, z=2, y=yx[0], x=yx[1], seed=3)
    intensity = {"window": [0, 1], "dtype": "float32"}
    whole, _ = run(vol, intensity=intensity)
    tiled, _ = run(vol, intensity=intensity, tile=20, tile_overlap=8)
    err = np.abs(tiled - whole) / np.ptp(whole)
    assert err.max() < SEAM_MAX_REL and err.mean() < SEAM_MEAN_REL
    assert err.max() > 0  # channel attention does see different statistics per tile


def test_tile_geometry():
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    assert tile_starts(10, 16, 4) == [0]
    w = ramp(12, 8, lead=True, trail=False)  # 2 px at weight 0, ramp over 4 px, then 1
    assert w[:2].eq(0).all() and w[6:].eq(1).all() and 0 < w[2] < w[3] < w[5] < 1
    both = ramp(8, 8, lead=True, trail=True)
    assert torch.allclose(both + both.flip(0), 2 * both)  # symmetric
    a, b = ramp(16, 8, False, True)[8:], ramp(16, 8, True, False)[:8]
    assert torch.allclose(a + b, torch.ones(8))  # two tiles overlapping by 8 sum to 1
    assert ramp(8, 4, lead=False, trail=False).eq(1).all()


def test_bad_tiling_options():
    with pytest.raises(UserError, match="overlap"):
        run(lr_volume(np.uint8), tile=8, tile_overlap=8)


def nan_in_fp16_precision_step(model, x, precision):
    """Test double of infer.forward_at_precision: fp16 'overflows' to NaN, fp32 is real."""
    y = model(x)
    return torch.full_like(y, float("nan")) if precision == "fp16" else y


def test_nan_fp16_batch_recomputed_in_fp32_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(infer, "forward_at_precision", nan_in_fp16_precision_step)
    vol = lr_volume(np.float32, z=5)
    intensity = {"window": [0, 1], "dtype": "float32"}
    ref, _ = run(vol, intensity=intensity, precision="fp32")
    with caplog.at_level(logging.WARNING, logger="microct_sr.infer"):
        out, stats = run(vol, intensity=intensity, precision="fp16", batch_size=2)
    assert stats["fp16_fallbacks"] == 3
    assert caplog.text.count("recomputing") == 1
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_sr_forward_fp32_never_checks_or_falls_back():
    state = PrecisionState()
    y = sr_forward(tiny_model(), torch.rand(1, 1, 4, 4), precision="fp32", state=state,
                   step=nan_in_fp16_precision_step)
    assert torch.isfinite(y).all() and state.fallbacks == 0


def test_real_fp16_autocast_on_cpu_close_to_fp32():
    """fp16 numerics for real (CPU autocast): convs run in half, result close to fp32."""
    model = tiny_model()
    dtypes = set()
    model.head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    vol = lr_volume(np.float32, z=2, y=8, x=8)
    intensity = {"window": [0, 1], "dtype": "float32"}
    fp16, s16 = run(vol, model=model, intensity=intensity, precision="fp16")
    fp32, _ = run(vol, model=model, intensity=intensity, precision="fp32")
    assert torch.float16 in dtypes and torch.float32 in dtypes
    assert s16["precision"] == "fp16" and s16["fp16_fallbacks"] == 0
    err = np.abs(fp16 - fp32)
    assert 0 < err.max() < 2e-2


def test_reader_error_propagates():
    with pytest.raises(OSError, match="disk on fire"):
        upscale_volume(ArrayVolume(lr_volume(np.uint8, z=8), fail_at=4), CollectingWriter(),
                       tiny_model(), intensity={"window": [0, 255], "dtype": "uint8"},
                       batch_size=2, device="cpu", quiet=True)


def test_non_finite_input_slice_is_a_user_error_naming_the_volume_and_slice():
    """One NaN voxel would turn its whole output slice into NaN (written as 0): refused,
    naming the first bad slice, and nothing after it is computed or written."""
    vol = lr_volume(np.uint8, z=8).astype(np.float32)
    vol[5, 3, 4] = np.nan
    writer = CollectingWriter()
    with pytest.raises(UserError, match=r"memory\.tif: slice 5 holds NaN or Inf"):
        upscale_volume(ArrayVolume(vol), writer, NearestX8(),
                       intensity={"window": [0, 255], "dtype": "float32"}, batch_size=2,
                       device="cpu", quiet=True)
    assert sum(len(p) for p in writer.parts) <= 4
    vol[5, 3, 4] = np.inf
    with pytest.raises(UserError, match="slice 5"):
        run(vol, NearestX8(), batch_size=3)
    vol[5, 3, 4] = 7.0
    out, _ = run(vol, NearestX8(), batch_size=3)
    assert np.isfinite(out).all()


def test_upscale_cli_refuses_nan_input_and_leaves_no_output(tmp_path, run_cli):
    vol = lr_volume(np.uint8, z=4, y=16, x=16).astype(np.float32)
    vol[2, 0, 0] = np.nan
    src, dst = tmp_path / "lr.tif", tmp_path / "out" / "sr.tif"
    dst.parent.mkdir()
    tifffile.imwrite(src, vol, photometric="minisblack")
    r = run_cli("upscale", src, dst, "--window", "0", "255", "--quiet")
    assert r.exit_code == 2 and str(src) in r.stderr and "slice 2" in r.stderr
    assert list(dst.parent.iterdir()) == []  # no output, no temporary file


def test_writer_error_propagates():
    with pytest.raises(OSError, match="disk full"):
        upscale_volume(ArrayVolume(lr_volume(np.uint8, z=8)), CollectingWriter(fail=True),
                       tiny_model(), intensity={"window": [0, 255], "dtype": "uint8"},
                       batch_size=2, device="cpu", quiet=True)


def test_auto_device_and_precision_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only defaults; this machine has CUDA")
    assert infer.resolve_device("auto").type == "cpu"
    assert infer.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert infer.default_batch_size(torch.device("cpu")) == 1
    assert infer.default_batch_size(torch.device("cuda")) == 8
    _, stats = run(lr_volume(np.uint8, z=3))
    assert stats["batch_size"] == 1
    with pytest.raises(UserError, match="CUDA"):
        infer.resolve_device("cuda")


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    t = torch.rot90(x, k, (2, 3))
    return t.flip(3) if flip else t


@pytest.mark.parametrize("hw", [(5, 5), (4, 7)])
def test_self_ensemble_is_equivariant_and_exact_for_equivariant_nets(hw):
    """A net that depends on position (not equivariant) becomes equivariant under the
    ensemble: ensemble(T x) = T ensemble(x) on the SR grid for all 8 symmetries T; a net that
    already is (nearest 8x) is left unchanged."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, *hw)

    def lopsided(t: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(t, scale_factor=8, mode="nearest")
        col = torch.arange(up.shape[-1], dtype=torch.float32) / up.shape[-1]
        return up * (1 + col) + 0.1 * up.roll(3, dims=2)

    ens = self_ensemble(lopsided, x)
    assert ens.shape == (2, 1, 8 * hw[0], 8 * hw[1])
    assert not torch.allclose(ens, lopsided(x))
    for k in range(4):
        for flip in (False, True):
            got = self_ensemble(lopsided, _dihedral(x, k, flip))
            assert torch.allclose(got, _dihedral(ens, k, flip), atol=1e-6), (k, flip)
    near = NearestX8()
    assert torch.allclose(self_ensemble(near, x), near(x))


def test_upscale_volume_self_ensemble_averages_the_model():
    vol = lr_volume(np.uint8, z=3, y=9, x=11)
    model = tiny_model(3)
    plain, stats = run(vol, model)
    ens, stats_e = run(vol, model, ensemble=True)
    assert stats_e["self_ensemble"] and not stats["self_ensemble"]
    x = torch.from_numpy(vol.astype(np.float32) / 255.0)[:, None]
    with torch.no_grad():
        want = self_ensemble(model, x)[:, 0].numpy()
    expected = np.clip(np.rint(want * 255.0), 0, 255)
    assert np.abs(ens.astype(float) - expected).max() <= 1  # rounding of float noise only
    assert np.abs(ens.astype(float) - plain.astype(float)).max() > 1
    tiled, _ = run(vol, model, ensemble=True, tile=6, tile_overlap=4)  # per tile, blended
    assert tiled.shape == ens.shape
    # the ensemble per tile: near the untiled ensemble (seams only), far from the plain model
    d_ens = np.abs(tiled.astype(float) - ens.astype(float)).mean()
    d_plain = np.abs(tiled.astype(float) - plain.astype(float)).mean()
    assert d_ens < 3 and d_plain > 5 * d_ens, (d_ens, d_plain)


def test_scale_mismatch_only_outside_the_training_voxel_size():
    """The warning's test: in-plane voxel size (geometric mean of y and x) more than 1.5x
    outside the model's training range; silent when either size is unknown or malformed."""
    assert scale_mismatch([80.0, 80.0], (80.0, 80.0, 80.0)) is None
    assert scale_mismatch([80.0, 80.0], (10.0, 54.0, 54.0)) is None   # within 1.5x
    assert scale_mismatch([80.0, 80.0], (10.0, 120.0, 120.0)) is None
    small = scale_mismatch([80.0, 80.0], (80.0, 20.0, 20.0))
    assert small is not None and "20 um" in small and "4.0x larger" in small
    big = scale_mismatch([60.0, 100.0], (80.0, 200.0, 200.0))
    assert big is not None and "60-100 um" in big and "2.0x smaller" in big
    assert scale_mismatch([80.0, 80.0], (80.0, 80.0, 20.0)) is not None  # sqrt(80*20) = 40
    for trained, spacing in ((None, (1.0, 20.0, 20.0)), ([80.0, 80.0], None),
                             (["x"], (1.0, 20.0, 20.0)), ([0.0, 80.0], (1.0, 20.0, 20.0))):
        assert scale_mismatch(trained, spacing) is None


def test_output_origin_moves_half_an_lr_pixel_less_half_an_sr_pixel():
    """Identity direction, 80 um pixels, x8: SR pixel 0's centre is 7/16 LR pixel (35 um)
    before LR pixel 0's in x and y; z stays; unknown pieces give None."""
    from microct_sr.infer import output_origin

    eye = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    got = output_origin((1.0, 2.0, 3.0), eye, (80.0, 80.0, 80.0), 8)
    assert got == pytest.approx((1.0 - 0.035, 2.0 - 0.035, 3.0))
    flipped_x = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert output_origin((1.0, 2.0, 3.0), flipped_x, (80.0, 40.0, 80.0), 8) == pytest.approx(
        (1.0 + 0.035, 2.0 - 0.0175, 3.0))
    assert output_origin(None, eye, (80.0, 80.0, 80.0), 8) is None
    assert output_origin((1.0, 2.0, 3.0), None, (80.0, 80.0, 80.0), 8) is None
    assert output_origin((1.0, 2.0, 3.0), eye, None, 8) is None
    assert output_origin((1.0, 2.0), (1.0, 0.0, 0.0, 1.0), (80.0, 80.0, 80.0), 8) is None
