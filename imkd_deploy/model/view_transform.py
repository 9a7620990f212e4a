"""Camera branch after the image encoder: depth distribution + context, lifted to BEV.

Lift-splat as in BEVDepth: per feature pixel a softmax over D depth bins and a C-channel
context vector; their outer product is pooled into BEV cells by imkd::bev_pool using the
precomputed geometry (an input, so the network has no calibration baked in).
"""

from __future__ import annotations

import torch
from torch import nn

from imkd_deploy.config import ModelConfig
from imkd_deploy.model.backbone import conv_bn_relu
from imkd_deploy.ops.bev_pool import bev_pool


class DepthNet(nn.Module):
    """(B*N, Cin, fH, fW) -> depth logits (B*N, D, fH, fW) and context (B*N, C, fH, fW)."""

    def __init__(self, in_channels: int, depth_bins: int, context_channels: int):
        super().__init__()
        self.depth_bins = depth_bins
        self.trunk = nn.Sequential(conv_bn_relu(in_channels, in_channels), conv_bn_relu(in_channels, in_channels))
        self.out = nn.Conv2d(in_channels, depth_bins + context_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.out(self.trunk(x))
        return y[:, : self.depth_bins], y[:, self.depth_bins :]


class LiftSplat(nn.Module):
    """Depth net + BEVPool: image features -> camera BEV (B, C, ny, nx) and depth logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_cams = cfg.num_cams
        self.bev_hw = (cfg.grid.ny, cfg.grid.nx)
        self.depth_net = DepthNet(cfg.fpn_channels, cfg.num_depth_bins, cfg.context_channels)

    def forward(self, feats: torch.Tensor, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths):
        bn, _, fh, fw = feats.shape
        n = self.num_cams
        b = bn // n
        depth_logits, context = self.depth_net(feats)
        depth = depth_logits.softmax(dim=1)
        depth = depth.view(b, n, -1, fh, fw)
        context = context.view(b, n, -1, fh, fw).permute(0, 1, 3, 4, 2).contiguous()
        cam_bev = bev_pool(depth, context, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                           self.bev_hw)
        return cam_bev, depth_logits.view(b, n, -1, fh, fw)
