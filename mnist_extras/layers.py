"""Convolutions that compute what torch's do, faster on MNIST's small maps, and the callback that puts them in.

    callbacks:
      centre_taps:
        _target_: mnist_extras.layers.CentreTaps      (configs/callbacks/speed.yaml, the recipes)
"""

import pytorch_lightning as pl
from torch import Tensor, nn


class CentreTapConv2d(nn.Conv2d):
    """A 3x3 convolution (stride 1, padding 1) that, on a 1x1 map, multiplies only its centre tap:
    the other eight fall on padding, so the result and the gradients are the same. A 28x28 digit
    is 1x1 in the last stage of every ResNet here (bench/README.md measures the gain). Parameters
    and their names are Conv2d's."""

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv2d
            and (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 3), (1, 1), (1, 1), (1, 1))
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )  # fmt: skip

    @classmethod
    def like(cls, conv: nn.Conv2d) -> "CentreTapConv2d":
        twin = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None, device="meta")
        twin.weight, twin.bias = conv.weight, conv.bias  # the same Parameters: nothing is copied
        return twin

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == (1, 1):
            return nn.functional.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        return super().forward(x)


class CentreTaps(pl.Callback):
    """Swaps every fitting 3x3 convolution of the task's model for a CentreTapConv2d when a stage is
    set up, before the optimizer sees the parameters. Names and parameters stay, so checkpoints are
    those of the plain model; a model with no such convolution is left as it is."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        swap_centre_taps(pl_module)


def swap_centre_taps(model: nn.Module) -> int:
    """Puts a CentreTapConv2d in place of every fitting convolution of `model`; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if CentreTapConv2d.fits(child):
                setattr(module, name, CentreTapConv2d.like(child))
                swapped += 1
    return swapped
