"""R2-RCAN: the paper preset's structure and size, blocks, presets, upsamplers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from microct_sr.models import PRESETS, ModelConfig, build_model, count_macs, preset
from microct_sr.models.blocks import (
    RCAB,
    ChannelAttention,
    LightUpsampler,
    PixelShuffleUpsampler,
    RefineUpsampler,
    Res2Block,
    ResidualGroup,
    make_upsampler,
    subpixel_conv3x3,
)
from microct_sr.models.r2rcan import R2RCAN, body_layout, cost_summary


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


# Parameter count of the paper's network, derived by hand from section 2.2 / 3.2 (C = 64):
CA = conv_params(64, 4, 1) + conv_params(4, 64, 1)                       # reduction 16
RCAB_P = 2 * conv_params(64, 64, 3) + CA
RCAB_GROUP = 20 * RCAB_P + conv_params(64, 64, 3)                        # + closing conv
RES2_P = 2 * conv_params(64, 64, 1) + 3 * conv_params(16, 16, 3) + CA   # 4 scales of 16
RES2_GROUP = 5 * RES2_P
UPSAMPLER = 3 * conv_params(64, 256, 3) + conv_params(64, 1, 3)
PAPER_PARAMS = conv_params(1, 64, 3) + 10 * RCAB_GROUP + 10 * RES2_GROUP + UPSAMPLER


@pytest.fixture(scope="module")
def paper() -> R2RCAN:
    return build_model(preset("r2rcan", "paper"))


def test_paper_parameter_count(paper):
    assert n_params(paper) == PAPER_PARAMS == 16_493_833


def test_paper_body_alternates_ten_rcab_and_ten_res2_groups(paper):
    groups = list(paper.body)
    assert len(groups) == 20
    for i, g in enumerate(groups):
        assert isinstance(g, ResidualGroup)
        blocks = list(g.blocks)
        if i % 2 == 0:  # RCAB group: 20 RCABs + closing conv3x3
            assert len(blocks) == 20 and all(isinstance(b, RCAB) for b in blocks)
            assert isinstance(g.conv, nn.Conv2d) and g.conv.kernel_size == (3, 3)
        else:           # Res2 group: 5 Res2Net+SE blocks
            assert len(blocks) == 5 and all(isinstance(b, Res2Block) for b in blocks)
            assert isinstance(g.conv, nn.Identity)
    assert body_layout(paper.config) == ["rcab", "res2"] * 10


def test_paper_block_structure(paper):
    rcab = paper.body[0].blocks[0]
    assert [rcab.conv1.kernel_size, rcab.conv2.kernel_size] == [(3, 3), (3, 3)]
    assert (rcab.ca.down.in_channels, rcab.ca.down.out_channels) == (64, 4)
    assert rcab.ca.up.kernel_size == (1, 1)
    res2 = paper.body[1].blocks[0]
    assert res2.reduce.kernel_size == (1, 1) and res2.expand.kernel_size == (1, 1)
    assert len(res2.convs) == 3 and all(c.in_channels == 16 and c.kernel_size == (3, 3)
                                        for c in res2.convs)
    assert isinstance(res2.se, ChannelAttention)
    assert paper.head.in_channels == 1 and paper.head.out_channels == 64


def test_paper_upsampler_is_three_x2_pixelshuffle_stages(paper):
    tail = paper.tail
    assert isinstance(tail, PixelShuffleUpsampler)
    shuffles = [m for m in tail if isinstance(m, nn.PixelShuffle)]
    convs = [m for m in tail if isinstance(m, nn.Conv2d)]
    assert [s.upscale_factor for s in shuffles] == [2, 2, 2]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 256)] * 3 + [(64, 1)]


def test_paper_cost_per_160px_slice(paper):
    macs = count_macs(paper, (160, 160))
    assert 2 * macs["total"] / 1e9 == pytest.approx(973, abs=1)


@pytest.mark.parametrize("arch_preset", ["small", "tiny"])
def test_cpu_presets_use_light_upsampler_which_costs_far_less(arch_preset):
    cfg = preset("r2rcan", arch_preset)
    light = count_macs(build_model(cfg), (40, 40))
    heavy = count_macs(build_model(preset("r2rcan", arch_preset, upsampler="pixelshuffle")),
                       (40, 40))
    assert cfg.upsampler == "light"
    assert heavy["tail"] / heavy["total"] > 0.6  # the paper upsampler dominates small models
    assert light["tail"] < heavy["tail"] / 20


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_forward_shape_and_grid(name):
    model = build_model(preset("r2rcan", name)).eval()
    x = torch.rand(2, 1, 6, 5)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, 48, 40) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_blocks_keep_shape_and_skip():
    x = torch.randn(2, 8, 5, 7)
    for block in (RCAB(8, 4), Res2Block(8, 4, 4), ChannelAttention(8, 4)):
        assert block(x).shape == x.shape
    rcab = RCAB(8, 4)
    nn.init.zeros_(rcab.conv2.weight), nn.init.zeros_(rcab.conv2.bias)
    assert torch.equal(rcab(x), x)  # a zero residual branch leaves the skip alone


def test_res2_block_hierarchy_links_scales():
    """Res2Block's forward is Gao 2019 eq. 1 as its docstring writes it, computed by hand from
    its own layers: ReLU(1x1 conv), split into 4 channel groups x1..x4, y1 = x1, y2 = K2(x2),
    y3 = K3(x3 + y2), y4 = K4(x4 + y3) (Ki = 3x3 conv + ReLU), concat, 1x1 conv to e, SE
    e * sigmoid(up(ReLU(down(mean(e))))), plus the input."""
    torch.manual_seed(0)
    blk = Res2Block(16, 4, 4).eval()
    x = torch.randn(2, 16, 6, 7)
    with torch.no_grad():
        r = torch.relu(blk.reduce(x))
        x1, x2, x3, x4 = (r[:, 4 * i:4 * (i + 1)] for i in range(4))
        k2, k3, k4 = (lambda t, conv=conv: torch.relu(conv(t)) for conv in blk.convs)
        y2 = k2(x2)
        y3 = k3(x3 + y2)
        y4 = k4(x4 + y3)
        e = blk.expand(torch.cat([x1, y2, y3, y4], dim=1))
        se = torch.sigmoid(blk.se.up(torch.relu(blk.se.down(e.mean(dim=(2, 3), keepdim=True)))))
        expected = x + e * se
        got = blk(x)
        # the same without the hierarchical links: far from the block's output
        e_flat = blk.expand(torch.cat([x1, y2, k3(x3), k4(x4)], dim=1))
        flat = x + e_flat * blk.se.weights(e_flat)
    torch.testing.assert_close(got, expected)
    assert (got - flat).abs().max() > 1e-3


@pytest.mark.parametrize("kind,cls", [("pixelshuffle", PixelShuffleUpsampler),
                                      ("light", LightUpsampler),
                                      ("refine", RefineUpsampler)])
def test_make_upsampler_reusable(kind, cls):
    cfg = ModelConfig(n_feats=12, scale=8, out_channels=1, upsampler=kind)
    up = make_upsampler(cfg)
    assert isinstance(up, cls)
    assert up(torch.rand(1, 12, 3, 4)).shape == (1, 1, 24, 32)
    with pytest.raises(ValueError, match="upsampler"):
        make_upsampler(ModelConfig(upsampler="bogus"))


def test_refine_upsampler_starts_as_the_light_step_and_then_learns():
    """Zero last conv: the refine tail equals its light step exactly; the zero conv still gets
    a gradient (it sees the hint maps), and once it moves the output depends on neighbouring
    LR pixels' features through the HR-size convs."""
    torch.manual_seed(0)
    up = RefineUpsampler(12, 8, 1)
    f = torch.rand(2, 12, 5, 6)
    assert torch.equal(up(f), up.light(f))
    up(f).square().mean().backward()
    assert up.refine[-1].weight.grad.abs().sum() > 0
    assert up.hints[0].weight.grad is None or up.hints[0].weight.grad.abs().sum() == 0
    with torch.no_grad():
        nn.init.normal_(up.refine[-1].weight, std=0.1)
        base = up(f)
        g = f.clone()
        g[:, :, 2, 3] += 1.0  # one LR pixel's features
        diff = (up(g) - base).abs()[0, 0]
    # the light step alone changes only the 3x3 LR neighbourhood's blocks (rows 8..31,
    # cols 16..39); the refinement's two HR-size 3x3 convs reach 2 HR pixels further
    assert diff[8:32, 16:40].abs().sum() > 0
    assert diff[6:8, 16:40].abs().sum() > 0 and diff[:6].abs().sum() == 0
    assert not torch.equal(up(f), up.light(f))


def test_presets_round_trip_through_dict():
    for name, cfg in PRESETS["r2rcan"].items():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg, name
    with pytest.raises(ValueError, match="unknown"):
        preset("r2rcan", "huge")


def test_cost_summary_matches_the_documented_table():
    paper, small = cost_summary(preset("r2rcan", "paper")), cost_summary(preset("r2rcan", "small"))
    assert paper["params"] == PAPER_PARAMS
    assert paper["gflop"] == pytest.approx(973.0, abs=0.5)
    assert paper["upsampler_share"] == pytest.approx(0.165, abs=0.005)
    assert small["gflop"] == pytest.approx(14.86, abs=0.05)
    heavy = cost_summary(preset("r2rcan", "small", upsampler="pixelshuffle"))
    assert heavy["gflop"] == pytest.approx(54.5, abs=0.1) and heavy["upsampler_share"] > 0.7


def test_channel_attention_equals_pool_conv_formula():
    """The matrix-product form equals eq. 8-9 written with pooling and 1x1 convs."""
    torch.manual_seed(0)
    ca, x = ChannelAttention(16, 4), torch.randn(2, 16, 5, 7)
    ref = x * torch.sigmoid(ca.up(torch.relu(ca.down(x.mean(dim=(2, 3), keepdim=True)))))
    torch.testing.assert_close(ca(x), ref)
    rcab = RCAB(16, 4)
    y = rcab.conv2(torch.relu(rcab.conv1(x)))
    torch.testing.assert_close(rcab(x), x + ca.__class__.forward(rcab.ca, y))


def test_training_backward_through_inplace_relus():
    model = build_model(preset("r2rcan", "tiny"))
    model(torch.rand(2, 1, 6, 6)).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- inference fusions: same function, less work --------------------------------------------

@pytest.mark.parametrize("r,c,o,bias", [(2, 3, 1, True), (2, 2, 3, False), (3, 2, 2, True)])
def test_subpixel_conv3x3_equals_conv_after_pixel_shuffle(r, c, o, bias):
    g = torch.Generator().manual_seed(r * 10 + o)
    x = torch.randn(2, c * r * r, 5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(o, c, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    ref = nn.functional.conv2d(nn.functional.pixel_shuffle(x, r), w, b, padding=1)
    got = subpixel_conv3x3(x, w, b, r)
    assert got.shape == ref.shape == (2, o, 5 * r, 7 * r)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)  # borders included


def _paper_tail(seed: int = 0) -> PixelShuffleUpsampler:
    torch.manual_seed(seed)
    return PixelShuffleUpsampler(8, 8, 1).double()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fused_upsampler_equals_the_plain_layout_in_values_and_gradients(fmt):
    tail = _paper_tail().to(memory_format=fmt)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64).contiguous(memory_format=fmt)
    results = {}
    for fused in (True, False):
        tail.fuse_last = fused
        tail.zero_grad()
        y = tail(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results[fused] = (y.detach(), [p.grad.clone() for p in tail.parameters()])
    assert results[True][0].shape == (2, 1, 48, 40)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-12)
    for g_fused, g_plain in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-9, atol=1e-12)


def test_fused_upsampler_under_fp16_autocast_stays_close_to_fp32():
    tail = _paper_tail(1).float()
    x = torch.randn(1, 8, 6, 6)
    ref = tail(x)
    with torch.autocast("cpu", dtype=torch.float16):
        half = tail(x)
    assert half.dtype == torch.float16  # really computed in half precision
    err = (half.float() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 5e-3


def test_mac_count_is_the_plain_layouts_and_the_fusion_saving_is_stated(paper):
    assert paper.tail.fuse_last
    macs = count_macs(paper, (160, 160))["tail"]
    paper.tail.fuse_last = False
    try:
        assert count_macs(paper, (160, 160))["tail"] == macs
    finally:
        paper.tail.fuse_last = True
    last_up = 640 * 640 * 9 * 64 * 256
    final = 1280 * 1280 * 9 * 64 * 1
    fused = 640 * 640 * 9 * 64 * 16
    assert paper.tail.fused_mac_change((160, 160)) == fused - last_up - final
