"""The camera+radar student: the network that is trained, exported and deployed.

``forward`` is the export signature: tensors in, a dict of head maps out, every size from
the config, no data-dependent Python control flow. ``forward_train`` runs the same graph
and also returns the intermediate BEV maps the IMKD losses compare with the teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from imkd_deploy.config import ModelConfig
from imkd_deploy.model.backbone import ImageEncoder
from imkd_deploy.model.bev_encoder import BEVEncoder
from imkd_deploy.model.head import CenterHead
from imkd_deploy.model.pillars import RADAR_SPEC, PillarEncoder, occupancy_map, radar_intensity_map
from imkd_deploy.model.view_transform import LiftSplat
from imkd_deploy.ops.intensity_fusion import IntensityFusion


class StudentNet(nn.Module):
    def __init__(self, cfg: ModelConfig, use_intensity: bool = True):
        super().__init__()
        self.cfg = cfg
        self.ny, self.nx = cfg.grid.ny, cfg.grid.nx
        self.image_encoder = ImageEncoder(cfg)
        self.lift = LiftSplat(cfg)
        self.radar_encoder = PillarEncoder(RADAR_SPEC.num_features, cfg.radar_channels, cfg.grid)
        # level 3: the radar intensity prior feeds the gate (zeros when ablated)
        self.fusion = IntensityFusion(cfg.context_channels, cfg.radar_channels, cfg.fused_channels, use_intensity=use_intensity)
        self.fusion_post = nn.Sequential(nn.BatchNorm2d(cfg.fused_channels), nn.ReLU(inplace=True))
        self.bev_encoder = BEVEncoder(cfg.fused_channels, cfg.bev_encoder_channels)
        self.head = CenterHead(cfg.bev_encoder_channels, cfg.head_channels, cfg.num_classes)

    def forward_train(self, images, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                      radar_pillars, radar_coords) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        feats = self.image_encoder(images.flatten(0, 1))
        cam_bev, depth_logits = self.lift(feats, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths)
        radar_bev = self.radar_encoder(radar_pillars, radar_coords, b)
        radar_intensity = radar_intensity_map(radar_pillars, radar_coords, b, self.ny, self.nx)
        fused = self.fusion_post(self.fusion(cam_bev, radar_bev, radar_intensity))
        feature = self.bev_encoder(fused)
        out = self.head(feature)
        out.update(
            cam_bev=cam_bev, radar_bev=radar_bev, radar_intensity=radar_intensity,
            radar_occupancy=occupancy_map(radar_coords, b, self.ny, self.nx, radar_pillars),
            fused=fused, feature=feature, depth_logits=depth_logits,
        )
        return out

    def forward(self, images, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                radar_pillars, radar_coords) -> dict[str, torch.Tensor]:
        out = self.forward_train(images, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                                 radar_pillars, radar_coords)
        return {k: out[k] for k in ("heatmap", "offset", "height", "dims", "rot", "vel")}
