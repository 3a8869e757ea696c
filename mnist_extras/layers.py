"""Convolutions that compute what torch's do, faster on MNIST's small maps, and the callback that puts them in
(`callbacks.centre_taps` in configs/callbacks/speed.yaml and the recipes)."""

import pytorch_lightning as pl
from torch import Tensor, nn


class CentreTapConv2d(nn.Conv2d):
    """A 3x3 convolution (stride 1, padding 1) that, on a 1x1 map, multiplies only its centre tap:
    the other eight fall on padding, so the result and the gradients are the same. A 28x28 digit
    is 1x1 in the last stage of every ResNet here (bench/README.md measures the gain)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == (1, 1):
            return nn.functional.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        return super().forward(x)


class CentreTaps(pl.Callback):
    """Swaps the task's model's convolutions when a stage is set up, before the optimizer sees the parameters."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        swap_centre_taps(pl_module)


def swap_centre_taps(model: nn.Module) -> int:
    """Puts a CentreTapConv2d in place of every plain 3x3 convolution (stride 1, padding 1) of `model`, holding
    the same Parameters under the same names: checkpoints are those of the plain model. Returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, conv in list(module.named_children()):
            shape = type(conv) is nn.Conv2d and (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
            if shape == ((3, 3), (1, 1), (1, 1), (1, 1)) and conv.groups == 1 and conv.padding_mode == "zeros":
                bias = conv.bias is not None
                twin = CentreTapConv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=bias, device="meta")
                twin.weight, twin.bias = conv.weight, conv.bias  # nothing is copied
                setattr(module, name, twin)
                swapped += 1
    return swapped
