"""Small in-memory Frames with consistent boxes, LiDAR and radar (no drive on disk needed)."""

from __future__ import annotations

import numpy as np

from imkd_deploy.config import ModelConfig
from imkd_deploy.data.frame import Frame
from imkd_deploy.ops.bev_pool import example_rig


def fake_frames(cfg: ModelConfig, n: int, seed: int = 0, objects: int = 6) -> list[Frame]:
    rng = np.random.default_rng(seed)
    intr, c2e, aug = example_rig(cfg)
    half = 0.8 * min(cfg.grid.x_range[1], cfg.grid.y_range[1])
    frames = []
    for i in range(n):
        g = objects
        xy = rng.uniform(-half, half, (g, 2))
        wlh = rng.uniform([0.6, 0.6, 1.0], [2.5, 5.0, 2.5], (g, 3))
        boxes = np.concatenate([xy, wlh[:, 2:3] / 2 - 1.0, wlh, rng.uniform(-np.pi, np.pi, (g, 1)),
                                rng.normal(0, 2, (g, 2))], axis=1).astype(np.float32)
        labels = rng.integers(0, cfg.num_classes, g)
        # LiDAR: points inside each box (bright) + a ground plane (dim)
        inside = boxes[:, None, :3] + rng.uniform(-0.5, 0.5, (g, 60, 3)) * boxes[:, None, 3:6]
        obj = np.concatenate([inside.reshape(-1, 3), rng.uniform(150, 255, (g * 60, 1)), np.zeros((g * 60, 1))], 1)
        ground = np.concatenate([rng.uniform(-half, half, (800, 2)), np.full((800, 1), -1.8), rng.uniform(0, 40, (800, 1)),
                                 np.zeros((800, 1))], 1)
        lidar = np.concatenate([obj, ground]).astype(np.float32)
        # radar: 3 noisy returns per object with RCS and the object's velocity
        r = np.repeat(boxes, 3, axis=0)
        radar = np.concatenate([r[:, :2] + rng.normal(0, 0.3, (len(r), 2)), r[:, 2:3], rng.uniform(0, 15, (len(r), 1)),
                                r[:, 7:9], rng.uniform(0, 0.2, (len(r), 1))], 1).astype(np.float32)
        frames.append(Frame(
            sample_token=f"tok{seed}_{i:03d}", scene_name="scene-fake", timestamp=1_000_000 * i,
            images=rng.integers(0, 255, (cfg.num_cams, *cfg.image_size, 3), dtype=np.uint8),
            intrinsics=intr, cam2ego=c2e, ego2global=np.eye(4), img_aug=aug,
            radar_points=radar, lidar_points=lidar, gt_boxes=boxes, gt_labels=labels.astype(np.int64),
            gt_num_pts=np.full(g, 63, np.int64), camera_channels=(),
        ))
    return frames
