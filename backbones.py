"""Backbones: torchvision ResNets adapted to MNIST, (B, 1, 28, 28) -> (B, 512) features."""

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models import WeightsEnum

from shapes import FEATURES


class WeightsUnavailable(OSError):
    """ImageNet weights that cannot be downloaded, or a cached file that is not plain tensors."""


class ResNetBackbone(nn.Module):
    """A torchvision ResNet with a one-channel stem and no classifier.

    The rest is torchvision's network unchanged, so ImageNet weights fit (their three input
    channels are summed into one, as timm does for grayscale). A 28x28 digit reaches the first
    residual block at 7x7; dropping the max-pool to keep 14x14 there made training 3x slower on
    CPU (bench/compute.py) for no accuracy the experiments needed. Wider trunks (ResNet50: 2048)
    are projected to 512 features by a linear layer.
    """

    out_features = FEATURES

    def __init__(self, arch: str, weights: WeightsEnum | None) -> None:
        super().__init__()
        net = getattr(models, arch)(weights=None)
        stem = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if weights is None:
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
        else:
            net.load_state_dict(imagenet_state_dict(weights))
            stem.weight = nn.Parameter(net.conv1.weight.detach().sum(dim=1, keepdim=True))
        net.conv1 = stem
        width = net.fc.in_features
        net.fc = nn.Identity() if width == FEATURES else nn.Linear(width, FEATURES)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__("resnet18", models.ResNet18_Weights.IMAGENET1K_V1 if pretrained else None)


class ResNet34(ResNetBackbone):
    """ResNet-34, 21.3M parameters."""

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__("resnet34", models.ResNet34_Weights.IMAGENET1K_V1 if pretrained else None)


class ResNet50(ResNetBackbone):
    """ResNet-50 with its 2048 features projected to 512, 24.6M parameters."""

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__("resnet50", models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None)
