"""RCAN (Zhang et al. 2018), 1 channel, x8: the Table 1 baseline of Yu et al. 2022.

Head conv3x3, ``n_rcab_groups`` residual groups of ``n_rcabs`` RCABs (each group closing
with a conv3x3 and a short skip, Zhang 2018 eq. 4), a body conv3x3 with the long skip
(eq. 3), then the shared upsampler (``models.blocks.make_upsampler``).
"""

from __future__ import annotations

import torch.nn as nn

from .blocks import RCAB, LongSkipSR, ResidualGroup, conv3x3


class RCAN(LongSkipSR):
    """(N, 1, h, w) in [0, 1] -> (N, 1, 8h, 8w)."""

    def __init__(self, config):
        c = config.n_feats
        groups = [ResidualGroup([RCAB(c, config.reduction) for _ in range(config.n_rcabs)], c)
                  for _ in range(config.n_rcab_groups)]
        super().__init__(config, nn.Sequential(*groups, conv3x3(c, c)))
