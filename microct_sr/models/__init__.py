"""Networks: one small file per architecture, one config dataclass, one explicit factory.

``ModelConfig`` is serialised into every checkpoint (``dataclasses.asdict``) so a model file
rebuilds its network alone. Presets hold the paper's values by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

ARCHS = ("r2rcan", "rcan", "edsr", "srcnn", "rrdbnet")


@dataclass
class ModelConfig:
    """Hyper-parameters of a generator. Fields unused by an arch are ignored by it."""

    arch: str = "r2rcan"
    # 1: one LR slice; 2k + 1: the slice and k neighbours on each side (2.5D, `pair --context
    # k`), stacked as channels, the slice itself in the middle; set by `train` from the data
    in_channels: int = 1
    out_channels: int = 1
    scale: int = 8
    n_feats: int = 64
    # RCAN part: residual groups of RCABs (R2-RCAN interleaves them with Res2 groups)
    n_rcab_groups: int = 10
    n_rcabs: int = 20
    reduction: int = 16
    # Res2Net part
    n_res2_groups: int = 10
    n_res2_blocks: int = 5
    res2_scales: int = 4
    # EDSR / RRDBNet / SRCNN
    n_resblocks: int = 32
    res_scale: float = 0.1
    n_rrdb: int = 23
    growth: int = 32
    # "pixelshuffle": log2(scale) stages of conv3x3 (C -> 4C) + PixelShuffle(2) (the paper);
    # "light": one conv3x3 (C -> scale^2 * out) + PixelShuffle(scale) at LR size (ESPCN-style);
    # "refine": light plus a small residual refinement at HR size (blocks.RefineUpsampler)
    upsampler: str = "pixelshuffle"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


# Named presets per arch. "paper" is exactly section 2.2/3.2 of Yu et al. 2022.
PRESETS: dict[str, dict[str, ModelConfig]] = {
    "r2rcan": {
        "paper": ModelConfig(),
        "small": ModelConfig(n_feats=32, n_rcab_groups=3, n_rcabs=4, n_res2_groups=3,
                             n_res2_blocks=2, reduction=8, upsampler="light"),
        "tiny": ModelConfig(n_feats=16, n_rcab_groups=1, n_rcabs=1, n_res2_groups=1,
                            n_res2_blocks=1, reduction=4, upsampler="light"),
    },
    "rcan": {
        "paper": ModelConfig(arch="rcan", n_rcab_groups=10, n_rcabs=20),
        "small": ModelConfig(arch="rcan", n_feats=32, n_rcab_groups=3, n_rcabs=4, reduction=8,
                             upsampler="light"),
        "tiny": ModelConfig(arch="rcan", n_feats=16, n_rcab_groups=1, n_rcabs=1, reduction=4,
                            upsampler="light"),
    },
    "edsr": {
        "paper": ModelConfig(arch="edsr", n_feats=256, n_resblocks=32, res_scale=0.1),
        "small": ModelConfig(arch="edsr", n_feats=32, n_resblocks=8, res_scale=1.0,
                             upsampler="light"),
        "tiny": ModelConfig(arch="edsr", n_feats=16, n_resblocks=1, res_scale=1.0,
                            upsampler="light"),
    },
    "srcnn": {
        "paper": ModelConfig(arch="srcnn", n_feats=64),
        "small": ModelConfig(arch="srcnn", n_feats=64),
        "tiny": ModelConfig(arch="srcnn", n_feats=16),
    },
    "rrdbnet": {
        "paper": ModelConfig(arch="rrdbnet", n_feats=64, n_rrdb=23, growth=32),
        "small": ModelConfig(arch="rrdbnet", n_feats=32, n_rrdb=3, growth=16, upsampler="light"),
        "tiny": ModelConfig(arch="rrdbnet", n_feats=16, n_rrdb=1, growth=8, upsampler="light"),
    },
}


def preset(arch: str, name: str, **overrides) -> ModelConfig:
    """A copy of preset ``name`` for ``arch`` with ``overrides`` applied."""
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if name not in PRESETS[arch]:
        raise ValueError(f"unknown preset {name!r} for {arch}; choose one of "
                         f"{', '.join(PRESETS[arch])}")
    return dataclasses.replace(PRESETS[arch][name], **overrides)


def build_model(config: ModelConfig) -> nn.Module:
    """The generator described by ``config`` (explicit dispatch, no registry)."""
    if config.arch == "r2rcan":
        from .r2rcan import R2RCAN as net
    elif config.arch == "rcan":
        from .rcan import RCAN as net
    elif config.arch == "edsr":
        from .edsr import EDSR as net
    elif config.arch == "srcnn":
        from .srcnn import SRCNN as net
    elif config.arch == "rrdbnet":
        from .rrdbnet import RRDBNet as net
    else:
        raise ValueError(f"unknown arch {config.arch!r}; choose one of {', '.join(ARCHS)}")
    return net(config)


def count_macs(model: nn.Module, lr_hw: tuple[int, int], in_channels: int = 1) -> dict[str, int]:
    """Multiply-accumulates of every conv for one (1, in_channels, h, w) input, by top-level
    child name plus ``"total"``: the network as specified (fused inference paths such as
    ``PixelShuffleUpsampler.fuse_last`` are counted unfused). Runs one forward on the meta
    device (no memory, no time)."""
    import copy

    if all(p.is_meta for p in model.parameters()):
        meta = model
    elif isinstance(getattr(model, "config", None), ModelConfig):
        with torch.device("meta"):  # rebuild from the config: cheaper than a deep copy
            meta = build_model(model.config)
    else:
        meta = copy.deepcopy(model).to("meta")
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: nn.Conv2d, inp, out) -> None:
            k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
            macs[name] = macs.get(name, 0) + out.numel() * k
        return fn

    handles = [m.register_forward_hook(hook(top)) for top, child in meta.named_children()
               for m in child.modules() if isinstance(m, nn.Conv2d)]
    fused = [m for m in meta.modules() if getattr(m, "fuse_last", False)]
    for m in fused:
        m.fuse_last = False
    try:
        with torch.no_grad():
            meta(torch.empty(1, in_channels, *lr_hw, device="meta"))
    finally:
        for h in handles:
            h.remove()
        for m in fused:
            m.fuse_last = True
    macs["total"] = sum(macs.values())
    return macs
