"""U-Net discriminator with spectral normalisation (Real-ESRGAN, Wang et al. 2021, sec. 3.3
and Fig. 6), for 1-channel HR patches.

Three stride-2 4x4 convolutions down, three bilinear x2 steps up with skips from the same
scale, two refining conv3x3 and a conv3x3 to one logit per pixel. Spectral normalisation
(Miyato et al. 2018) on every convolution but the first and the last, and biases on those two
only, as in Real-ESRGAN's ``UNetDiscriminatorSN`` (realesrgan/archs/discriminator_arch.py).
Patch sizes need not be multiples of 8: each up step resizes to its skip's size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm


def _sn_conv(c_in: int, c_out: int, k: int, stride: int = 1, bias: bool = False) -> nn.Module:
    return spectral_norm(nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2 if k == 3 else 1,
                                   bias=bias))


class UNetDiscriminatorSN(nn.Module):
    """(N, 1, H, W) in [0, 1] -> (N, 1, H, W) realness logits."""

    def __init__(self, in_channels: int = 1, n_feats: int = 64):
        super().__init__()
        c = n_feats
        self.conv0 = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down = nn.ModuleList([_sn_conv(c, 2 * c, 4, 2), _sn_conv(2 * c, 4 * c, 4, 2),
                                   _sn_conv(4 * c, 8 * c, 4, 2)])
        self.up = nn.ModuleList([_sn_conv(8 * c, 4 * c, 3), _sn_conv(4 * c, 2 * c, 3),
                                 _sn_conv(2 * c, c, 3)])
        self.refine = nn.Sequential(_sn_conv(c, c, 3), nn.LeakyReLU(0.2, True),
                                    _sn_conv(c, c, 3), nn.LeakyReLU(0.2, True))
        self.out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        skips = [act(self.conv0(x))]
        for conv in self.down:
            skips.append(act(conv(skips[-1])))
        y = skips.pop()
        for conv in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = act(conv(y)) + skip
        return self.out(self.refine(y))
