"""SRCNN (Dong et al. 2014), 1 channel, x8: the pre-upsampling Table 1 baseline.

Bicubic x8 interpolation (``align_corners=False``, which matches the SR grid of
docs/architecture.md), then 9x9 (``n_feats``) -> 5x5 (``n_feats // 2``) -> 5x5 (1) convolutions
with ReLU in between (Dong 2014, sec. 3.1, the 9-5-5 variant). The network predicts the
residual to the bicubic image, which trains far faster than the original direct output and
computes the same family of functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SRCNN(nn.Module):
    """(N, C, h, w) in [0, 1] -> (N, 1, 8h, 8w); C = 1, or 2k+1 slices of a 2.5D stack."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config.n_feats
        self.scale = config.scale
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, c, 9, padding=4), nn.ReLU(inplace=True),
            nn.Conv2d(c, c // 2, 5, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(c // 2, config.out_channels, 5, padding=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        centre = x.shape[1] // 2  # the residual is on the LR slice itself (2.5D: the middle one)
        return up[:, centre:centre + 1] + self.body(up)
