"""Layers that compute what torchvision's do, faster on MNIST's small maps."""

from torch import Tensor, nn


class CentreTapConv2d(nn.Conv2d):
    """A 3x3 convolution (stride 1, padding 1) that, on a 1x1 map, multiplies only its centre tap:
    the other eight fall on padding, so the result and the gradients are the same. A 28x28 digit
    is 1x1 in the last stage of every ResNet here, where this made a ResNet18 training step 1.14x
    faster on a 2-core CPU (bench/README.md). Parameters and their names are Conv2d's."""

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        return isinstance(conv, nn.Conv2d) and (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))

    @classmethod
    def like(cls, conv: nn.Conv2d) -> "CentreTapConv2d":
        twin = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None, device="meta")
        twin.weight, twin.bias = conv.weight, conv.bias
        return twin

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == (1, 1):
            return nn.functional.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        return super().forward(x)
