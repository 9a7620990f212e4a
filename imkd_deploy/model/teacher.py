"""The LiDAR teacher: pillars with return intensity as a point feature, and the student's
BEV encoder and head classes (so its encoder feature is directly comparable at level 2)."""

from __future__ import annotations

import torch
from torch import nn

from imkd_deploy.config import ModelConfig
from imkd_deploy.model.bev_encoder import BEVEncoder
from imkd_deploy.model.head import CenterHead
from imkd_deploy.model.pillars import LIDAR_SPEC, PillarEncoder, lidar_intensity_map


class TeacherNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.ny, self.nx = cfg.grid.ny, cfg.grid.nx
        self.lidar_encoder = PillarEncoder(LIDAR_SPEC.num_features, cfg.lidar_channels, cfg.grid)
        self.bev_encoder = BEVEncoder(cfg.lidar_channels, cfg.bev_encoder_channels)
        self.head = CenterHead(cfg.bev_encoder_channels, cfg.head_channels, cfg.num_classes)

    def forward_train(self, lidar_pillars: torch.Tensor, lidar_coords: torch.Tensor, batch: int,
                      structure_intensity: bool = False) -> dict[str, torch.Tensor]:
        """Heads plus what distillation reads. ``structure_intensity`` picks the I_L variant
        (above-ground structure only, ``DistillConfig.lidar_weight="structure"``)."""
        lidar_bev = self.lidar_encoder(lidar_pillars, lidar_coords, batch)
        feature = self.bev_encoder(lidar_bev)
        out = self.head(feature)
        out.update(
            lidar_bev=lidar_bev, feature=feature,
            lidar_intensity=lidar_intensity_map(lidar_pillars, lidar_coords, batch, self.ny, self.nx,
                                                self.cfg.grid.z_range if structure_intensity else None),
        )
        return out

    def forward(self, lidar_pillars: torch.Tensor, lidar_coords: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
        out = self.forward_train(lidar_pillars, lidar_coords, batch)
        return {k: out[k] for k in ("heatmap", "offset", "height", "dims", "rot", "vel")}
