"""Building blocks shared by the generators (R2-RCAN, RCAN, EDSR, RRDBNet).

References: Yu et al. 2022 (R2-RCANGAN, section 2.2 "generator" and 3.2 "implementation");
Zhang et al. 2018 (RCAN, section 3.3 eq. 4-7 and 3.4 eq. 8-9); Gao et al. 2019 (Res2Net,
section 3.1 eq. 1); Hu et al. 2018 (squeeze-and-excitation, section 3); Shi et al. 2016
(ESPCN sub-pixel convolution, section 2.2 eq. 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 convolution with 'same' zero padding."""
    return nn.Conv2d(c_in, c_out, 3, padding=1)


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    """1x1 convolution (where channels change scale)."""
    return nn.Conv2d(c_in, c_out, 1)


class ChannelAttention(nn.Module):
    """RCAN channel attention (Zhang 2018, sec. 3.4, eq. 8-9): global average pool,
    1x1 conv down by ``reduction``, ReLU, 1x1 conv up, sigmoid, rescale the input.

    Also serves as the squeeze-and-excitation of the Res2Net block (Hu 2018, sec. 3): the two
    are the same computation. The 1x1 convs act on pooled (N, C) vectors, so they run as
    matrix products (same parameters as ``nn.Conv2d``; a 1x1-map conv takes a slow path).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = conv1x1(channels, hidden)
        self.up = conv1x1(hidden, channels)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel scales (N, C, 1, 1) in (0, 1) for ``x``."""
        s = x.mean(dim=(2, 3))
        h = torch.relu(F.linear(s, self.down.weight.flatten(1), self.down.bias))
        return torch.sigmoid(F.linear(h, self.up.weight.flatten(1), self.up.bias))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class RCAB(nn.Module):
    """Residual channel attention block (Zhang 2018, sec. 3.3, eq. 6-7; Yu 2022, sec. 2.2):
    conv3x3, ReLU, conv3x3, channel attention, plus the block's skip (skip + y * CA(y) in one
    ``addcmul`` pass)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        self.ca = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu_(self.conv1(x)))
        return torch.addcmul(x, y, self.ca.weights(y))


class Res2Block(nn.Module):
    """Res2Net block with squeeze-excitation (Gao 2019, sec. 3.1, eq. 1; Yu 2022, sec. 2.2):
    1x1 conv, split into ``scales`` groups, hierarchical 3x3 convs (y1 = x1, y2 = K2(x2),
    yi = Ki(xi + y(i-1))), concat, 1x1 conv, SE, plus the block's skip. No batch norm
    (as usual in SR networks)."""

    def __init__(self, channels: int, scales: int = 4, reduction: int = 16):
        super().__init__()
        if channels % scales:
            raise ValueError(f"channels {channels} not divisible by res2 scales {scales}")
        width = channels // scales
        self.scales = scales
        self.reduce = conv1x1(channels, channels)
        self.convs = nn.ModuleList(conv3x3(width, width) for _ in range(scales - 1))
        self.expand = conv1x1(channels, channels)
        self.se = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(torch.relu_(self.reduce(x)), self.scales, dim=1)
        ys = [parts[0]]
        prev = None
        for conv, xi in zip(self.convs, parts[1:]):
            prev = torch.relu_(conv(xi if prev is None else xi + prev))
            ys.append(prev)
        e = self.expand(torch.cat(ys, dim=1))
        return torch.addcmul(x, e, self.se.weights(e))


class ResidualGroup(nn.Module):
    """A group of blocks with a short skip (Zhang 2018, sec. 3.2, eq. 4: F_g = F_{g-1} +
    W_g * body): the blocks, an optional closing conv3x3 (RCAN groups have one), the skip."""

    def __init__(self, blocks: list[nn.Module], channels: int, closing_conv: bool = True):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.conv = conv3x3(channels, channels) if closing_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.blocks(x))


class PixelShuffleUpsampler(nn.Sequential):
    """The paper's upsampler (Yu 2022, sec. 2.2): log2(scale) stages of conv3x3 (C -> 4C) +
    PixelShuffle(2) (ESPCN, Shi 2016, eq. 4), then a conv3x3 to ``out_channels`` at HR size."""

    def __init__(self, channels: int, scale: int, out_channels: int):
        stages = int(round(math.log2(scale)))
        if 2 ** stages != scale:
            raise ValueError(f"pixelshuffle upsampler needs a power-of-two scale, got {scale}")
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [conv3x3(channels, 4 * channels), nn.PixelShuffle(2)]
        layers.append(conv3x3(channels, out_channels))
        super().__init__(*layers)


class LightUpsampler(nn.Sequential):
    """One sub-pixel step at LR size (ESPCN, Shi 2016, sec. 2.2, eq. 4): conv3x3 (C ->
    scale^2 * out) + PixelShuffle(scale). For CPU presets: the paper's three HR-size stages
    cost about 2/3 of a small model's MACs; this costs C*9*scale^2 MACs per LR pixel."""

    def __init__(self, channels: int, scale: int, out_channels: int):
        super().__init__(conv3x3(channels, out_channels * scale * scale), nn.PixelShuffle(scale))


def make_upsampler(config) -> nn.Module:
    """Tail of a generator: (N, n_feats, h, w) -> (N, out_channels, scale*h, scale*w).

    ``config.upsampler`` is "pixelshuffle" (the paper) or "light" (one LR-size sub-pixel conv).
    """
    if config.upsampler == "pixelshuffle":
        return PixelShuffleUpsampler(config.n_feats, config.scale, config.out_channels)
    if config.upsampler == "light":
        return LightUpsampler(config.n_feats, config.scale, config.out_channels)
    raise ValueError(f"unknown upsampler {config.upsampler!r}; choose 'pixelshuffle' or 'light'")


class LongSkipSR(nn.Module):
    """The generators' common layout (RCAN eqs. 1-3): a conv3x3 head, a deep ``body`` with a
    long skip over it, and the upsampler tail. Subclasses only build the body."""

    def __init__(self, config, body: nn.Module):
        super().__init__()
        self.config = config
        self.head = conv3x3(config.in_channels, config.n_feats)
        self.body = body
        self.tail = make_upsampler(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.head(x)
        return self.tail(shallow + self.body(shallow))
