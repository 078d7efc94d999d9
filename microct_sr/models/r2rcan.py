"""R2-RCAN generator (Yu et al. 2022, section 2.2 and 3.2).

Shallow conv3x3 (1 -> C), a deep body of RCAB groups and Res2 groups alternating (RCAB group
first), each group with a short skip, a long skip over the body, then the upsampler and the
last conv to 1 channel (both in :func:`~microct_sr.models.blocks.make_upsampler`).

At inference the paper upsampler's last stage (conv3x3 64 -> 256 at 640 x 640, shuffle, conv3x3
64 -> 1 at 1280 x 1280) runs fused into one conv3x3 64 -> 16 plus shifted adds, the same
function with 115 GFLOP less work per slice (``blocks.PixelShuffleUpsampler``); the costs below
count the network as specified.

The ``paper`` preset is exactly the paper's network: C = 64, 10 RCAB groups of 20 RCABs with a
closing conv3x3, 10 Res2 groups of 5 Res2Net blocks (4 scales, SE), channel-attention
reduction 16, three x2 stages of conv3x3 (64 -> 256) + PixelShuffle(2), conv3x3 (64 -> 1).
:func:`body_layout` lists the groups in order, which the tests check against the paper.

Cost per 160 x 160 LR slice (conv MACs x 2, :func:`cost_summary`; docs/performance.md):

| preset | C  | body                              | upsampler    | params | GFLOP | upsampler |
|--------|----|-----------------------------------|--------------|--------|-------|-----------|
| paper  | 64 | 10 x 20 RCAB + 10 x 5 Res2        | 3 x (x2 PS)  | 16.5 M | 973   | 16 %      |
| small  | 32 | 3 x 4 RCAB + 3 x 2 Res2 (red. 8)  | light (x8)   | 0.30 M | 14.9  | 6 %       |
| tiny   | 16 | 1 x 1 RCAB + 1 x 1 Res2 (red. 4)  | light (x8)   | 0.02 M | 0.88  | 53 %      |

With the paper's upsampler `small` would cost 54.5 GFLOP per slice, three quarters of it
(40.6) in the upsampler, whose last stage runs at 640 x 640 with 4C channels; the light
upsampler (one conv3x3 to 64 channels at LR size + PixelShuffle(8)) costs 0.9 GFLOP. The issue's
"about 994 GFLOP" for `paper` also counts a closing conv3x3 on each Res2 group and over the
body (11 more 64 -> 64 convs, 21 GFLOP); the text of section 2.2 we follow gives the closing
conv to RCAB groups only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import RCAB, LongSkipSR, Res2Block, ResidualGroup


def rcab_group(channels: int, n_blocks: int, reduction: int) -> ResidualGroup:
    """``n_blocks`` RCABs, a closing conv3x3 and the group's short skip (RCAN, eq. 4)."""
    blocks = [RCAB(channels, reduction) for _ in range(n_blocks)]
    return ResidualGroup(blocks, channels, closing_conv=True)


def res2_group(channels: int, n_blocks: int, scales: int, reduction: int) -> ResidualGroup:
    """``n_blocks`` Res2Net+SE blocks and the group's short skip (no closing conv)."""
    blocks = [Res2Block(channels, scales, reduction) for _ in range(n_blocks)]
    return ResidualGroup(blocks, channels, closing_conv=False)


def body_layout(config) -> list[str]:
    """Group kinds in body order: "rcab" and "res2" alternate, RCAB first; the longer list's
    surplus (if the counts differ) goes at the end."""
    n_r, n_s = config.n_rcab_groups, config.n_res2_groups
    layout: list[str] = []
    for i in range(max(n_r, n_s)):
        if i < n_r:
            layout.append("rcab")
        if i < n_s:
            layout.append("res2")
    return layout


class R2RCAN(LongSkipSR):
    """R2-RCAN: (N, in_channels, h, w) in [0, 1] -> (N, out_channels, scale*h, scale*w)."""

    def __init__(self, config):
        c = config.n_feats
        groups = []
        for kind in body_layout(config):
            if kind == "rcab":
                groups.append(rcab_group(c, config.n_rcabs, config.reduction))
            else:
                groups.append(res2_group(c, config.n_res2_blocks, config.res2_scales,
                                         config.reduction))
        super().__init__(config, nn.Sequential(*groups))  # long skip over the body


def cost_summary(config, lr_hw: tuple[int, int] = (160, 160)) -> dict:
    """Parameters and conv GFLOP (2 x MACs) of ``config`` for one ``lr_hw`` LR slice, with
    the upsampler's share; computed on the meta device (no memory, no time)."""
    from . import count_macs

    with torch.device("meta"):  # no weight initialisation work, no memory
        model = R2RCAN(config)
    macs = count_macs(model, lr_hw, config.in_channels)
    return {"params": sum(p.numel() for p in model.parameters()),
            "gflop": 2 * macs["total"] / 1e9,
            "body_gflop": 2 * macs.get("body", 0) / 1e9,
            "upsampler_gflop": 2 * macs.get("tail", 0) / 1e9,
            "upsampler_share": macs.get("tail", 0) / macs["total"]}
