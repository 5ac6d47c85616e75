"""LPIPS-VGG style perceptual distance for the PanoHead inversion.

VGG16 conv features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, each unit-normalised
over channels, squared differences weighted per channel by non-negative 1x1 "lin"
layers, averaged over space and summed over layers (Zhang et al. 2018, the metric the
official projector's vgg16.pt computes). Weights are not bundled: `load_perceptual_weights`
reads torchvision's vgg16 state dict and LPIPS' vgg lin weights (`weights_only=True`
or safetensors). Tests use random init and narrow widths.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError

# (convs per stage); torchvision's `features` indices follow from this layout.
_STAGES = (2, 2, 3, 3, 3)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class PerceptualLoss(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512, 512), resize_to: int | None = 256):
        super().__init__()
        if len(widths) != 5:
            raise ValueError("widths: one channel count per VGG16 stage (5)")
        self.widths, self.resize_to = tuple(widths), resize_to
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        layers: list[nn.Module] = []
        in_ch = 3
        self.taps: list[int] = []  # index in `features` after which a relu output is tapped
        for s, (n, w) in enumerate(zip(_STAGES, widths)):
            if s > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n):
                layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = w
            self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)
        for lin in self.lins:
            nn.init.constant_(lin.weight, 1.0 / lin.weight.shape[1])
        self.requires_grad_(False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
            if i == self.taps[-1]:
                break
        return out

    def prepare(self, img: torch.Tensor) -> list[torch.Tensor]:
        """img [B, 3, H, W] in [-1, 1] -> normalised features (reuse for a fixed target)."""
        if self.resize_to is not None and img.shape[-1] > self.resize_to:
            img = F.interpolate(img, size=(self.resize_to, self.resize_to), mode="area")
        return self._features(img)

    def forward(self, a: torch.Tensor | list, b: torch.Tensor | list) -> torch.Tensor:
        """Per-sample distance [B]; a, b are images in [-1, 1] or outputs of prepare()."""
        fa = a if isinstance(a, list) else self.prepare(a)
        fb = b if isinstance(b, list) else self.prepare(b)
        total = 0
        for lin, xa, xb in zip(self.lins, fa, fb):
            total = total + lin((xa - xb).square()).mean(dim=(1, 2, 3))
        return total


def _read(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"no perceptual weights at {path}", hint="portrait3d weights download fetches them")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unsafe or corrupt file
        raise WeightsError(f"refusing to load {path}: {e.__class__.__name__}") from None
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} is not a state dict")
    return sd


def load_perceptual_weights(net: PerceptualLoss, vgg_path, lin_path) -> PerceptualLoss:
    """torchvision vgg16 weights (keys features.N.weight/bias) + LPIPS v0.1 vgg lin weights
    (keys lin{k}.model.1.weight, [1, C, 1, 1])."""
    vgg = _read(Path(vgg_path))
    lin = _read(Path(lin_path))
    sd = {}
    convs = [i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)]
    for i in convs:
        for p in ("weight", "bias"):
            key = f"features.{i}.{p}"
            if key not in vgg:
                raise WeightsError(f"{vgg_path} lacks {key}", hint="expected torchvision's vgg16 state dict")
            sd[key] = vgg[key]
    for k in range(5):
        key = f"lin{k}.model.1.weight"
        if key not in lin:
            raise WeightsError(f"{lin_path} lacks {key}", hint="expected LPIPS v0.1 vgg.pth")
        sd[f"lins.{k}.weight"] = lin[key]
    sd["shift"], sd["scale"] = net.shift, net.scale
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"perceptual weights do not fit: {str(e).splitlines()[0]}") from None
    return net.requires_grad_(False).eval()
