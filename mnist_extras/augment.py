"""Batch augmentation on the device, a data module named by `_target_` (configs/experiment/mnist_995.yaml)."""

from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from data_modules import MNISTDataModule


class AugmentedMNISTDataModule(MNISTDataModule):
    """Training batches warped on their device: `augment=True` moves, turns and scales each digit a little,
    `elastic` (pixels) bends it too, as handwriting varies (Simard et al. 2003). The draws come from a
    generator seeded with the run's seed plus the global rank (under DDP each rank warps its own), whose
    state goes into checkpoints: a resumed run draws what the uninterrupted one would have."""

    def __init__(self, *args: Any, augment: bool = False, elastic: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.augment = augment
        self.elastic = elastic
        self.generator: torch.Generator | None = None
        self.saved: dict[str, Any] = {}  # a checkpoint's state, until the first batch says which device

    def setup(self, stage: str | None = None) -> None:
        if self.elastic and not self.augment and self.train_set is None:
            rank_zero_info(f"elastic={self.elastic} has no effect: digits are bent only with augment=true")
        super().setup(stage)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment and not isinstance(batch, Tensor) and self.trainer is not None and self.trainer.training:
            images, labels = batch
            images = random_warp(images.float(), elastic=self.elastic, generator=self.generator_on(images.device))
            batch = images, labels
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def generator_on(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            rank = self.trainer.global_rank
            self.generator = torch.Generator(device=device)
            if self.saved.get("rank") == rank:
                self.generator.set_state(self.saved["state"])
            else:
                # A fresh run; or, resuming under DDP, a rank other than 0 whose stream the checkpoint
                # (written by rank 0) does not hold: a stream of its own that starts at this step.
                offset = self.trainer.world_size * self.trainer.global_step if self.saved else 0
                self.generator.manual_seed(torch.initial_seed() + rank + offset)
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        if self.generator is None:
            return dict(self.saved)  # no batch drawn yet: what was loaded, if anything
        return {"rank": self.trainer.global_rank, "state": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = dict(state_dict)
        self.generator = None


def random_warp(images: Tensor, degrees=10.0, shift=0.1, scale=0.1, elastic=0.0, generator=None) -> Tensor:
    """A float batch (B, 1, H, W), each image turned by up to `degrees`, shifted by up to `shift` of its
    size, scaled by 1 +- `scale` and bent by about `elastic` pixels, in one `grid_sample`; the border
    stays black. `generator` (torch's default if None) must be on the images' device."""
    batch, _, height, width = images.shape
    device, g = images.device, generator
    angle = torch.empty(batch, device=device).uniform_(-degrees, degrees, generator=g).deg2rad_()
    zoom = torch.empty(batch, device=device).uniform_(1 - scale, 1 + scale, generator=g)
    offset = torch.empty(batch, 2, device=device).uniform_(-2 * shift, 2 * shift, generator=g)  # grid spans [-1, 1]
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if elastic:
        # Random displacements on a 4x4 lattice, interpolated to every pixel: smooth over about a
        # quarter of the digit, as a Gaussian-filtered noise field would be, at a fraction of the cost.
        coarse = torch.randn(batch, 2, 4, 4, device=device, generator=g) * elastic
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 1) * (2 / torch.tensor([width, height], device=device))
    return F.grid_sample(images, grid, align_corners=False)
