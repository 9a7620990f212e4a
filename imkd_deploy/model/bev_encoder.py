"""BEV encoder shared by the student (on the fused BEV) and the teacher (on the LiDAR BEV).

Two residual stages (full and half resolution) merged back at full resolution, as in
SECOND/CenterPoint's BEV backbone: the half-resolution stage widens the receptive field
to whole vehicles, the full-resolution one keeps the cell-accurate centres the head needs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from imkd_deploy.model.backbone import BasicBlock, conv_bn_relu


class BEVEncoder(nn.Module):
    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.full = nn.Sequential(BasicBlock(in_channels, channels), BasicBlock(channels, channels))
        self.coarse = nn.Sequential(BasicBlock(channels, 2 * channels, stride=2), BasicBlock(2 * channels, 2 * channels))
        self.merge = conv_bn_relu(3 * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.full(x)
        coarse = self.coarse(full)
        up = F.interpolate(coarse, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return self.merge(torch.cat([full, up], dim=1))
