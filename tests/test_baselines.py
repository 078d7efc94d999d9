"""The Table 1 baselines (RCAN, EDSR, SRCNN, RRDBNet) and the U-Net discriminator: shapes,
the SR grid, parameter counts of the paper presets, and that each can learn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microct_sr.models import build_model, preset
from microct_sr.models.discriminator import UNetDiscriminatorSN

BASELINES = ["rcan", "edsr", "srcnn", "rrdbnet"]


@pytest.mark.parametrize("arch", BASELINES)
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_maps_lr_to_8x(arch, name):
    model = build_model(preset(arch, name))
    assert model.config.scale == 8  # upscale reads the factor from model.config
    out = model(torch.rand(2, 1, 6, 10))
    assert out.shape == (2, 1, 48, 80) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch,millions", [("rcan", 15.7), ("edsr", 45.4), ("rrdbnet", 17.0),
                                           ("srcnn", 0.057)])
def test_paper_presets_have_the_published_size(arch, millions):
    # RCAN 10x20 RCABs ~15.6M (Zhang 2018), EDSR 32x256 ~43M + x8 tail, RRDBNet 23 RRDB
    # ~16.7M (Wang 2018), SRCNN 9-5-5 with 64/32 filters
    n = sum(p.numel() for p in build_model(preset(arch, "paper")).parameters())
    assert abs(n / 1e6 - millions) / millions < 0.03


def test_srcnn_starts_from_bicubic_on_the_sr_grid():
    model = build_model(preset("srcnn", "tiny"))
    for p in model.body[-1].parameters():
        torch.nn.init.zeros_(p)
    x = torch.rand(1, 1, 5, 5)
    assert torch.allclose(model(x), F.interpolate(x, scale_factor=8, mode="bicubic",
                                                  align_corners=False))


@pytest.mark.parametrize("arch", BASELINES)
def test_learns_a_fixed_pair(arch):
    torch.manual_seed(0)
    model = build_model(preset(arch, "tiny"))
    lr = torch.rand(2, 1, 4, 4)
    hr = F.interpolate(lr, scale_factor=8, mode="nearest")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    first = None
    for _ in range(40):
        loss = F.l1_loss(model(lr), hr)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first


def test_unet_discriminator_shapes_and_spectral_norm():
    """Real-ESRGAN's U-Net discriminator: logits at the input's size, spectral norm on the 8
    inner convs, biases only on the first and last conv, and its size for 1 channel, width 64."""
    d = UNetDiscriminatorSN(1, 8)
    out = d(torch.rand(2, 1, 40, 44))
    assert out.shape == (2, 1, 40, 44)
    names = [k for k in d.state_dict() if k.endswith("weight_orig")]
    assert len(names) == 8  # 3 down + 3 up + 2 refining convs are spectrally normalised
    assert [k for k in d.state_dict() if k.endswith("bias")] == ["conv0.bias", "out.bias"]
    # Real-ESRGAN's UNetDiscriminatorSN(num_in_ch=1, num_feat=64) (xinntao/Real-ESRGAN,
    # realesrgan/archs/discriminator_arch.py): conv0 3x3 1->c with bias; conv1-3 4x4 stride 2
    # c->2c->4c->8c, conv4-6 3x3 8c->4c->2c->c, conv7-8 3x3 c->c, all bias=False; conv9 3x3
    # c->1 with bias
    c = 64
    ref = (9 * c + c + 16 * (c * 2 * c + 2 * c * 4 * c + 4 * c * 8 * c)
           + 9 * (8 * c * 4 * c + 4 * c * 2 * c + 2 * c * c) + 2 * 9 * c * c + 9 * c + 1)
    assert ref == 4_375_745
    assert sum(p.numel() for p in UNetDiscriminatorSN().parameters()) == ref
