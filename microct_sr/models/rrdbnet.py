"""RRDBNet (Wang et al. 2018, ESRGAN generator), 1 channel, x8. ESRGAN in Table 1 is this
network trained with the ``gan`` stage.

conv3x3 head, ``n_rrdb`` residual-in-residual dense blocks (three 5-conv dense blocks with
``growth`` channels, LeakyReLU 0.2, residual scaling 0.2; Wang 2018 sec. 3.1, Fig. 4), a trunk
conv3x3 with the long skip, then the shared upsampler (``models.blocks.make_upsampler``) in
place of ESRGAN's nearest-neighbour stages so every baseline shares one tail.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import LongSkipSR, conv3x3


class DenseBlock(nn.Module):
    """Five densely connected conv3x3 layers; output scaled by 0.2 and added to the input."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(channels + i * growth, growth) for i in range(4))
        self.last = conv3x3(channels + 4 * growth, channels)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(self.act(conv(torch.cat(feats, dim=1))))
        return x + 0.2 * self.last(torch.cat(feats, dim=1))


class RRDB(nn.Module):
    """Three dense blocks inside a scaled residual (Wang 2018, Fig. 4)."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.blocks = nn.Sequential(*(DenseBlock(channels, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBNet(LongSkipSR):
    """(N, 1, h, w) in [0, 1] -> (N, 1, 8h, 8w)."""

    def __init__(self, config):
        c = config.n_feats
        super().__init__(config, nn.Sequential(
            *(RRDB(c, config.growth) for _ in range(config.n_rrdb)), conv3x3(c, c)))
