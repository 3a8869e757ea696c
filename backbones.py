"""Backbones: torchvision ResNets adapted to MNIST, (B, 1, 28, 28) -> (B, 512) features."""

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models import WeightsEnum

FEATURES = 512  # what every backbone gives, and what adapters/linear_512_10 takes
STEMS = ("imagenet", "digits", "digits14")


class WeightsUnavailable(OSError):
    """ImageNet weights that cannot be downloaded, or a cached file that is not plain tensors."""


class ResNetBackbone(nn.Module):
    """A torchvision ResNet with a one-channel stem and no classifier; ImageNet weights fit (their three
    input channels summed into one, as timm does). `stem="digits"`: two 3x3 convolutions for 28x28 strokes
    instead of the 7x7 stem; `"digits14"` also drops the max-pool, so the blocks see 14x14, not 7x7 (four
    times the work a step). Wider trunks (ResNet50: 2048) are projected to 512 features.
    """

    out_features = FEATURES

    def __init__(self, arch: str, weights: WeightsEnum | None, stem: str = "imagenet") -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r}: one of {', '.join(STEMS)}")
        net = getattr(models, arch)(weights=None)
        if weights is not None:
            net.load_state_dict(imagenet_state_dict(weights))
        net.conv1 = imagenet_stem(net.conv1, weights is not None) if stem == "imagenet" else digits_stem()
        if stem == "digits14":
            net.maxpool = nn.Identity()
        width = net.fc.in_features
        net.fc = nn.Identity() if width == FEATURES else nn.Linear(width, FEATURES)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def imagenet_stem(conv1: nn.Conv2d, pretrained: bool) -> nn.Conv2d:
    """torchvision's 7x7 stride-2 convolution on one channel (ImageNet's three summed into one)."""
    stem = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained:
        stem.weight = nn.Parameter(conv1.weight.detach().sum(dim=1, keepdim=True))
    else:
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    return stem


def digits_stem() -> nn.Sequential:
    """Two 3x3 convolutions, the second of stride 2, for 28x28 strokes a pixel or two wide; the
    trunk then sees the same 14x14 (7x7 after the max-pool) as with the ImageNet stem."""
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1, bias=False),
    )


def imagenet_state_dict(weights: WeightsEnum) -> dict[str, Tensor]:
    """torchvision's ImageNet weights from the torch hub cache, downloaded there if missing."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        # torch.hub would unpickle with weights_only=False: a cached file could then run any code.
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsUnavailable(
            f"{path} holds more than plain tensors, so it was not loaded ({str(err).splitlines()[0]}); "
            f"delete it to download it again"
        ) from err
    except OSError as err:  # URLError, refused connection, no route: all OSError
        raise WeightsUnavailable(
            f"the ImageNet weights could not be downloaded from {weights.url} ({err}); put that file at {path}"
        ) from err


class ResNet18(ResNetBackbone):
    """ResNet-18, 11.2M parameters."""

    def __init__(self, pretrained: bool = False, stem: str = "imagenet") -> None:
        super().__init__("resnet18", models.ResNet18_Weights.IMAGENET1K_V1 if pretrained else None, stem)


class ResNet34(ResNetBackbone):
    """ResNet-34, 21.3M parameters."""

    def __init__(self, pretrained: bool = False, stem: str = "imagenet") -> None:
        super().__init__("resnet34", models.ResNet34_Weights.IMAGENET1K_V1 if pretrained else None, stem)


class ResNet50(ResNetBackbone):
    """ResNet-50 with its 2048 features projected to 512, 24.6M parameters."""

    def __init__(self, pretrained: bool = False, stem: str = "imagenet") -> None:
        super().__init__("resnet50", models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None, stem)
