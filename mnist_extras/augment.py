"""Batch augmentation on the device: each training digit moved, turned, scaled and bent a little."""

import torch
import torch.nn.functional as F
from torch import Tensor

from data_modules import MNISTDataModule


def random_warp(
    images: Tensor, degrees: float = 10.0, shift: float = 0.1, scale: float = 0.1, elastic: float = 0.0
) -> Tensor:
    """Each image of a float batch (B, 1, H, W) rotated by up to `degrees`, shifted by up to `shift`
    of its size, scaled by 1 +- `scale` and bent by a smooth field of about `elastic` pixels, in one
    `grid_sample` call; the border stays black."""
    batch, _, height, width = images.shape
    angle = torch.empty(batch, device=images.device).uniform_(-degrees, degrees).deg2rad_()
    zoom = torch.empty(batch, device=images.device).uniform_(1 - scale, 1 + scale)
    offset = torch.empty(batch, 2, device=images.device).uniform_(-2 * shift, 2 * shift)  # grid spans [-1, 1]
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if elastic:
        # Random displacements on a 4x4 lattice, interpolated to every pixel: smooth over about a
        # quarter of the digit, as a Gaussian-filtered noise field would be, at a fraction of the cost.
        coarse = torch.randn(batch, 2, 4, 4, device=images.device) * elastic
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 1) * (2 / torch.tensor([width, height], device=images.device))
    return F.grid_sample(images, grid, align_corners=False)
