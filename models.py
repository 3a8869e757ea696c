"""Models put a backbone, an adapter and a head together."""

from torch import Tensor, nn


class AdapterMismatch(ValueError):
    """The adapter does not take as many features as the backbone gives."""


class SimpleModel(nn.Module):
    """backbone -> adapter -> head: (B, 1, 28, 28) digits -> (B, 10) logits."""

    def __init__(self, backbone: nn.Module, adapter: nn.Module, head: nn.Module) -> None:
        super().__init__()
        width = getattr(backbone, "out_features", None)
        wanted = getattr(adapter, "in_features", None)
        if width is not None and wanted is not None and width != wanted:
            raise AdapterMismatch(f"the adapter takes {wanted} features but {type(backbone).__name__} gives {width}")
        self.backbone = backbone
        self.adapter = adapter
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.adapter(self.backbone(x)))
