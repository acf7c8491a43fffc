"""Training-only augmentation on batched tensors (runs on the GPU when training does).

Small rotation, shift and scale in one affine resampling, then brightness and contrast. No horizontal
flip by default: the heart is on the left, and a flipped film is not a plausible input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cxr.config import AugmentConfig


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: (B, 1, H, W) float in [0, 1] -> augmented batch, same shape and range."""
    s = cfg.strength
    if s <= 0:
        return x
    b = x.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        r = torch.rand(b, generator=generator) * 2 - 1
        return (r * scale * s).to(x.device)

    angle = uniform(math.radians(cfg.rotation_deg))
    zoom = 1 + uniform(cfg.scale)
    tx, ty = uniform(cfg.shift) * 2, uniform(cfg.shift) * 2  # affine_grid units span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if cfg.hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
        theta[:, 0, 1] = torch.where(flip, -theta[:, 0, 1], theta[:, 0, 1])
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(cfg.brightness).view(b, 1, 1, 1).to(x.dtype)
    contrast = (1 + uniform(cfg.contrast)).view(b, 1, 1, 1).to(x.dtype)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    return out.clamp_(0.0, 1.0)
