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


def _subpixel_taps(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, list[tuple]]:
    """Rewrite conv3x3 ``weight`` (O, C, 3, 3) on an r-times pixel-shuffled map as a matrix on
    the unshuffled map's C*r*r channels: rows grouped by LR offset (di, dj) in {-1, 0, 1}^2,
    each group covering output phases a in [a0, a1), b in [b0, b1). Returns (matrix (M, C*r*r),
    [(di, dj, a0, a1, b0, b1, row0, row1), ...])."""
    o, c = weight.shape[:2]
    blocks: dict[tuple[int, int], torch.Tensor] = {}
    for a in range(r):
        for dy in range(3):
            di, ap = divmod(a + dy - 1, r)  # HR row r*i + a + dy - 1 = LR row i + di, phase ap
            for b in range(r):
                for dx in range(3):
                    dj, bp = divmod(b + dx - 1, r)
                    if (di, dj) not in blocks:
                        blocks[di, dj] = weight.new_zeros(o, r, r, c, r, r)
                    blocks[di, dj][:, a, b, :, ap, bp] = weight[:, :, dy, dx]
    rows, groups, row0 = [], [], 0
    for (di, dj), blk in sorted(blocks.items()):
        a0, a1 = (0, 1) if di < 0 else ((r - 1, r) if di > 0 else (0, r))
        b0, b1 = (0, 1) if dj < 0 else ((r - 1, r) if dj > 0 else (0, r))
        m = blk[:, a0:a1, b0:b1].reshape(-1, c * r * r)
        rows.append(m)
        groups.append((di, dj, a0, a1, b0, b1, row0, row0 + m.shape[0]))
        row0 += m.shape[0]
    return torch.cat(rows), groups


def subpixel_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     r: int, pre_weight: torch.Tensor | None = None,
                     pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(pixel_shuffle(x, r), weight, bias, padding=1)`` computed at x's size.

    HR pixel (r*i + a, r*j + b) only sees LR pixels (i + di, j + dj), di, dj in {-1, 0, 1}, so
    the conv is one linear map of x's channels per pixel (a column per LR offset and output
    phase: 16 columns for r = 2) followed by nine shifted adds and a shuffle of only
    O*r*r channels. With ``pre_weight`` (a conv3x3 producing x from the given map, no
    activation in between, as in the paper's upsampler) the per-pixel map is folded into that
    conv, which then makes 16 channels instead of 4C. Exact, zero padding included.
    """
    o = weight.shape[0]
    mat, groups = _subpixel_taps(weight, r)
    if pre_weight is None:
        y = F.linear(x.permute(0, 2, 3, 1), mat)  # (n, h, w, M): one GEMM on channels_last
    else:
        w2 = (mat @ pre_weight.flatten(1)).view(mat.shape[0], *pre_weight.shape[1:])
        b2 = None if pre_bias is None else mat @ pre_bias
        y = F.conv2d(x, w2, b2, padding=1).permute(0, 2, 3, 1)  # x's memory format
    n, h, w = y.shape[:3]
    out = y.new_zeros(n, h, w, o, r, r)
    for di, dj, a0, a1, b0, b1, m0, m1 in groups:
        i0, i1, j0, j1 = max(0, -di), min(h, h - di), max(0, -dj), min(w, w - dj)
        out[:, i0:i1, j0:j1, :, a0:a1, b0:b1] += y[:, i0 + di:i1 + di, j0 + dj:j1 + dj,
                                                   m0:m1].reshape(n, i1 - i0, j1 - j0, o,
                                                                  a1 - a0, b1 - b0)
    if bias is not None:
        out += bias.view(1, 1, 1, o, 1, 1)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(n, o, h * r, w * r)


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
    PixelShuffle(2) (ESPCN, Shi 2016, eq. 4), then a conv3x3 to ``out_channels`` at HR size.

    With ``fuse_last`` (default) the last stage's conv, shuffle and the HR conv run as one
    conv3x3 to 16 channels plus shifted adds (:func:`subpixel_conv3x3`): the same function
    (nothing but linear maps in between), about 15x fewer MACs for that stage, the same
    parameters and state-dict keys. :func:`~microct_sr.models.count_macs` counts the plain
    layout; :meth:`fused_mac_change` says what the fusion saves."""

    def __init__(self, channels: int, scale: int, out_channels: int, fuse_last: bool = True):
        stages = int(round(math.log2(scale)))
        if 2 ** stages != scale:
            raise ValueError(f"pixelshuffle upsampler needs a power-of-two scale, got {scale}")
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [conv3x3(channels, 4 * channels), nn.PixelShuffle(2)]
        layers.append(conv3x3(channels, out_channels))
        super().__init__(*layers)
        self.fuse_last = fuse_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fuse_last:
            return super().forward(x)
        *stages, last_up, _shuffle, final = self
        for layer in stages:
            x = layer(x)
        return subpixel_conv3x3(x, final.weight, final.bias, 2, last_up.weight, last_up.bias)

    def fused_mac_change(self, lr_hw: tuple[int, int]) -> int:
        """Executed minus nominal MACs of the fused last stage for one ``lr_hw`` LR map."""
        *_, last_up, _shuffle, final = self
        h, w = (s * 2 ** ((len(self) - 1) // 2 - 1) for s in lr_hw)  # the last stage's input
        c, o = last_up.in_channels, final.out_channels
        nominal = h * w * 9 * c * last_up.out_channels + 4 * h * w * 9 * c * o
        fused_cols = 16 * o  # (1 + 2 + 1)^2 (offset, phase) pairs per output channel, r = 2
        return h * w * 9 * c * fused_cols - nominal


class LightUpsampler(nn.Sequential):
    """One sub-pixel step at LR size (ESPCN, Shi 2016, sec. 2.2, eq. 4): conv3x3 (C ->
    scale^2 * out) + PixelShuffle(scale). For CPU presets: the paper's three HR-size stages
    cost about 2/3 of a small model's MACs; this costs C*9*scale^2 MACs per LR pixel."""

    def __init__(self, channels: int, scale: int, out_channels: int):
        super().__init__(conv3x3(channels, out_channels * scale * scale), nn.PixelShuffle(scale))


class RefineUpsampler(nn.Module):
    """:class:`LightUpsampler` plus a small residual refinement at HR size, for CPU presets.

    The light step maps each LR pixel's 3x3 feature neighbourhood linearly to its own 8x8 HR
    block, so no nonlinearity ever sees two blocks at once. Here a second sub-pixel conv gives
    ``hint`` HR-size feature maps, and conv3x3 -> LeakyReLU -> conv3x3 on [light output,
    hints] adds a correction: y = y0 + R([y0, PS(conv(f))]). The last conv starts at zero, so a
    light model's weights (``tail.0.*`` -> ``tail.light.0.*``) give the same function."""

    def __init__(self, channels: int, scale: int, out_channels: int, hint: int = 4,
                 hidden: int = 16):
        super().__init__()
        self.light = LightUpsampler(channels, scale, out_channels)
        self.hints = nn.Sequential(conv3x3(channels, hint * scale * scale),
                                   nn.PixelShuffle(scale))
        self.refine = nn.Sequential(conv3x3(out_channels + hint, hidden),
                                    nn.LeakyReLU(0.2, inplace=True),
                                    conv3x3(hidden, out_channels))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        y0 = self.light(f)
        return y0 + self.refine(torch.cat([y0, self.hints(f)], dim=1))


UPSAMPLERS = ("pixelshuffle", "light", "refine")


def make_upsampler(config) -> nn.Module:
    """Tail of a generator: (N, n_feats, h, w) -> (N, out_channels, scale*h, scale*w).

    ``config.upsampler`` is "pixelshuffle" (the paper), "light" (one LR-size sub-pixel conv)
    or "refine" (light plus an HR-size residual refinement).
    """
    if config.upsampler == "pixelshuffle":
        return PixelShuffleUpsampler(config.n_feats, config.scale, config.out_channels)
    if config.upsampler == "light":
        return LightUpsampler(config.n_feats, config.scale, config.out_channels)
    if config.upsampler == "refine":
        return RefineUpsampler(config.n_feats, config.scale, config.out_channels)
    raise ValueError(f"unknown upsampler {config.upsampler!r}; choose one of {UPSAMPLERS}")


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
