"""Training losses (Yu et al. 2022, sec. 2.3-2.4): L1, relativistic average GAN (Eqs. 5-6)
and a VGG19 perceptual loss.

VGG19 weights are torchvision's ImageNet file (``vgg19-dcbb9e9d.pth``) from torchvision's
standard cache (``$TORCH_HOME/hub/checkpoints``, downloaded there once where there is internet)
or an explicit file. :func:`resolve_vgg_weights` runs before training starts and raises a
:class:`~microct_sr.errors.UserError` when neither is available. Random VGG weights exist only
for tests, through ``VGGPerceptualLoss(None, test_only_random_weights=True)`` (the trainer's
``TrainConfig.test_only_random_vgg``; no command-line option reaches it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

log = logging.getLogger(__name__)

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_FILE = "vgg19-dcbb9e9d.pth"
# torchvision's vgg19 "features": channels per conv, "M" = max-pool (Simonyan 2015, config E)
_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512]
# indices in vgg19.features of conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 (before ReLU)
PERCEPTUAL_LAYERS = {2: 1.0, 7: 0.5, 16: 0.1, 25: 0.1, 34: 0.1}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def l1_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (the psnr stage's only loss)."""
    return F.l1_loss(sr, hr)


def mse_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean squared error: the PSNR-optimal pixel loss (its minimiser is the conditional mean).
    L1's is the conditional median, which loses PSNR where the LR leaves the HR uncertain."""
    return F.mse_loss(sr, hr)


def ragan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss, Eq. 5: -E[log D_Ra(x_r, x_f)] - E[log(1 - D_Ra(x_f, x_r))] with
    D_Ra(a, b) = sigmoid(C(a) - E[C(b)]); E over the batch and (U-Net) pixels."""
    real_rel = real_logits - fake_logits.mean()
    fake_rel = fake_logits - real_logits.mean()
    return (F.binary_cross_entropy_with_logits(real_rel, torch.ones_like(real_rel))
            + F.binary_cross_entropy_with_logits(fake_rel, torch.zeros_like(fake_rel)))


def ragan_g_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss, Eq. 6: -E[log(1 - D_Ra(x_r, x_f))] - E[log D_Ra(x_f, x_r)]."""
    real_rel = real_logits - fake_logits.mean()
    fake_rel = fake_logits - real_logits.mean()
    return (F.binary_cross_entropy_with_logits(real_rel, torch.zeros_like(real_rel))
            + F.binary_cross_entropy_with_logits(fake_rel, torch.ones_like(fake_rel)))


def _vgg19_features(n_layers: int) -> nn.Sequential:
    """The first ``n_layers`` modules of torchvision's ``vgg19().features`` (same indices)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers[:n_layers])


def _download_vgg(dest: Path) -> None:
    """Fetch torchvision's VGG19 file into ``dest`` (raises OSError without internet)."""
    import socket

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torch.hub.download_url_to_file(VGG19_URL, str(dest), progress=False)
    finally:
        socket.setdefaulttimeout(old)


def resolve_vgg_weights(path: str | Path | None) -> Path:
    """The VGG19 weights file to use: ``path`` if given, else torchvision's cache (downloading
    there once if possible). Raises UserError with what to do when there is none."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError("VGG19 weights file not found (--vgg-weights)", p)
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
    if cached.is_file():
        return cached
    log.info("VGG19 weights not in %s; downloading %s", cached.parent, VGG19_URL)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _download_vgg(cached)
    except Exception as e:  # noqa: BLE001 - any failure means "no weights", told clearly
        raise UserError(
            f"the gan stage needs torchvision's ImageNet VGG19 weights ({VGG19_FILE}) for the "
            f"perceptual loss: not in torchvision's cache {cached.parent} and the download from "
            f"{VGG19_URL} failed ({type(e).__name__}: {e}). Download that file on a machine "
            f"with internet and pass --vgg-weights FILE, or put it in {cached.parent} (or "
            f"train without the perceptual term: --percep-weight 0)") from e
    return cached


def _load_vgg_state(path: Path, features: nn.Sequential) -> None:
    """Load the ``features.*`` weights of a torchvision VGG19 file into ``features``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read VGG19 weights ({type(e).__name__}: {e})", path) from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = features.state_dict()
    picked = {}
    for key in own:
        for cand in (f"features.{key}", key):
            if cand in state:
                picked[key] = state[cand]
                break
    missing = [k for k in own if k not in picked]
    if missing or any(picked[k].shape != own[k].shape for k in picked):
        raise UserError("not torchvision VGG19 weights (missing or misshaped features.* "
                        f"entries, e.g. {(missing or list(picked))[0]})", path)
    features.load_state_dict(picked)


class VGGPerceptualLoss(nn.Module):
    """Sum over conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 (before ReLU) of weight * MSE of
    the feature maps (weights 1, 0.5, 0.1, 0.1, 0.1). Grayscale in [0, 1] is repeated to 3
    channels and ImageNet-normalised. The VGG is frozen and always in eval mode."""

    def __init__(self, weights: Path | str | None, layers: dict[int, float] | None = None, *,
                 test_only_random_weights: bool = False):
        super().__init__()
        self.layers = dict(PERCEPTUAL_LAYERS if layers is None else layers)
        with torch.random.fork_rng(devices=[]):  # same random init in every run (tests)
            torch.manual_seed(0)
            self.features = _vgg19_features(max(self.layers) + 1)
        if weights is not None:
            _load_vgg_state(Path(weights), self.features)
        elif test_only_random_weights:
            log.warning("perceptual loss uses RANDOM VGG19 weights (test-only switch)")
        else:
            raise ValueError("VGGPerceptualLoss needs a weights file (see resolve_vgg_weights)")
        self.features.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval()

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        return super().train(False)

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                out.append(x)
        return out

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self._feats(hr)
        loss = sr.new_zeros(())
        weights = [self.layers[i] for i in sorted(self.layers)]
        for w, f_sr, f_hr in zip(weights, self._feats(sr), target):
            loss = loss + w * F.mse_loss(f_sr, f_hr)
        return loss
