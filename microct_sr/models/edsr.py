"""EDSR (Lim et al. 2017), 1 channel, x8: a Table 1 baseline of Yu et al. 2022.

Head conv3x3, ``n_resblocks`` residual blocks (conv3x3, ReLU, conv3x3, scaled by
``res_scale``; no batch norm, Lim 2017 sec. 3.1), a body conv3x3 with the long skip, then the
shared upsampler (``models.blocks.make_upsampler``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import LongSkipSR, conv3x3


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale * conv(relu(conv(x)))."""

    def __init__(self, channels: int, res_scale: float):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.conv2(torch.relu(self.conv1(x)))


class EDSR(LongSkipSR):
    """(N, 1, h, w) in [0, 1] -> (N, 1, 8h, 8w)."""

    def __init__(self, config):
        c = config.n_feats
        blocks = [ResBlock(c, config.res_scale) for _ in range(config.n_resblocks)]
        super().__init__(config, nn.Sequential(*blocks, conv3x3(c, c)))
