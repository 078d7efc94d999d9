"""losses.py: relativistic average GAN (Eqs. 5-6), VGG19 perceptual loss at the issue's
layers, and clear errors when VGG weights are missing."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from microct_sr import losses
from microct_sr.errors import UserError
from microct_sr.losses import (VGGPerceptualLoss, ragan_d_loss, ragan_g_loss,
                               resolve_vgg_weights)


def _ragan_reference(real, fake):
    """Eqs. 5-6 written out with sigmoid and log."""
    d_rf = torch.sigmoid(real - fake.mean())
    d_fr = torch.sigmoid(fake - real.mean())
    l_d = -torch.log(d_rf).mean() - torch.log(1 - d_fr).mean()
    l_g = -torch.log(1 - d_rf).mean() - torch.log(d_fr).mean()
    return l_d, l_g


def test_ragan_matches_equations():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    l_d, l_g = _ragan_reference(real, fake)
    assert torch.allclose(ragan_d_loss(real, fake), l_d, atol=1e-6)
    assert torch.allclose(ragan_g_loss(real, fake), l_g, atol=1e-6)
    # a discriminator that separates real from fake has a low loss; the generator a high one
    assert ragan_d_loss(real + 5, fake - 5) < 0.05 < 5 < ragan_g_loss(real + 5, fake - 5)


def test_vgg_layers_are_torchvision_convs_before_relu(tmp_path):
    tv = make_layers(cfgs["E"])  # torchvision's vgg19().features, random init
    for idx in losses.PERCEPTUAL_LAYERS:
        assert isinstance(tv[idx], torch.nn.Conv2d) and isinstance(tv[idx + 1], torch.nn.ReLU)
    assert [tv[i].out_channels for i in sorted(losses.PERCEPTUAL_LAYERS)] == [64, 128, 256,
                                                                               512, 512]
    f = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in tv.state_dict().items()}, f)
    loss = VGGPerceptualLoss(f)
    assert torch.equal(loss.features[34].weight, tv[34].weight)  # conv5_4 loaded
    x = torch.rand(1, 1, 32, 32)
    ref = (x.repeat(1, 3, 1, 1) - loss.mean) / loss.std
    assert torch.allclose(loss._feats(x)[0], tv[:3](ref), atol=1e-5)  # conv1_2, pre-ReLU


def test_perceptual_loss_behaviour():
    torch.manual_seed(0)
    loss = VGGPerceptualLoss(None, test_only_random_weights=True)
    hr = torch.rand(2, 1, 32, 32)
    assert float(loss(hr, hr)) == 0.0
    sr = (hr + 0.1 * torch.randn_like(hr)).requires_grad_(True)
    value = loss(sr, hr)
    value.backward()
    assert value > 0 and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())  # VGG stays frozen
    loss.train()
    assert not loss.training


def test_missing_vgg_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(dest):
        raise OSError("no internet")

    monkeypatch.setattr(losses, "_download_vgg", offline)
    with pytest.raises(UserError, match="--vgg-weights"):
        resolve_vgg_weights(None)
    with pytest.raises(UserError, match="not found"):
        resolve_vgg_weights(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="not torchvision VGG19"):
        VGGPerceptualLoss(bad)
    with pytest.raises(ValueError, match="weights file"):
        VGGPerceptualLoss(None)  # random weights only through the explicit test switch
    cached = tmp_path / "hub" / "checkpoints" / losses.VGG19_FILE
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x")
    assert resolve_vgg_weights(None) == cached  # torchvision's cache is used as is
