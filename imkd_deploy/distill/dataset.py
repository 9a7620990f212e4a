"""Frames -> training tensors, and the collate that stacks a batch (geometry included).

One sample is a dict of numpy arrays (cheap to cache and to pickle to DataLoader workers);
:func:`collate` turns a list of them into torch tensors with batch-offset pillar coordinates
and a stacked BEVPool geometry. Everything the network sees at inference (images,
geometry, radar pillars) comes from the runtime's :func:`network_inputs` and
:func:`collate_inputs`, so training and deployment cannot drift apart; this module adds the
LiDAR pillars and the targets.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from imkd_deploy.config import ModelConfig
from imkd_deploy.data.frame import LIDAR_FEATURES, Frame
from imkd_deploy.distill.depth_target import depth_bin_targets
from imkd_deploy.model.head import build_targets
from imkd_deploy.model.pillars import LIDAR_SPEC, batch_pillars, pillarise
from imkd_deploy.ops.bev_pool import GeometryCache
from imkd_deploy.runtime.preprocess import collate_inputs, network_inputs


_LIDAR_DT = LIDAR_FEATURES.index("dt")


def training_sample(frame: Frame, cfg: ModelConfig, role: str, cache: GeometryCache | None = None) -> dict:
    """Network inputs + targets of one frame for ``role`` (teacher needs no images)."""
    if frame.lidar_points is None:
        raise ValueError(f"frame {frame.sample_token}: training needs LiDAR (load the drive with load_lidar=True)")
    boxes, labels = frame.gt_boxes, frame.gt_labels
    if len(frame.gt_num_pts) == len(boxes) and len(boxes):
        # the devkit drops boxes without a single LiDAR/radar point; teaching them is noise
        seen = frame.gt_num_pts > 0
        boxes, labels = boxes[seen], labels[seen]
    t = build_targets(boxes, labels, cfg.grid, cfg.num_classes)
    sample = {"sample_token": frame.sample_token, "ego2global": frame.ego2global,
              "heatmap": t.heatmap, "index": t.index, "mask": t.mask, "reg": t.reg,
              "lidar": pillarise(frame.lidar_points, cfg.grid, LIDAR_SPEC)}
    if role == "student":
        sample.update(network_inputs(frame, cfg, cache))
        # The images are exposed at the key time: older sweeps put a moving object where it was.
        key = frame.lidar_points[frame.lidar_points[:, _LIDAR_DT] == 0.0, :3]
        sample["depth_target"] = depth_bin_targets(key, frame.intrinsics, frame.cam2ego, cfg)
    return sample


class FrameDataset(Dataset):
    """Wraps a frame source (NuScenesDrive or any list of Frames) for one training role.

    ``cache_size`` keeps that many processed samples in memory: a tiny-config sample is
    ~0.6 MB (uint8 images), and decoding JPEGs + sweeps dominates a CPU step otherwise."""

    def __init__(self, frames, cfg: ModelConfig, role: str, cache_size: int = 0, kd_skip: frozenset[str] = frozenset()):
        if role not in ("teacher", "student"):
            raise ValueError(f"unknown role '{role}'")
        self.frames, self.cfg, self.role = frames, cfg, role
        self.kd_skip = kd_skip
        self.cache_size = cache_size
        self._cache: OrderedDict[int, dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict:
        if i in self._cache:
            return self._cache[i]
        frame = self.frames[i]
        sample = training_sample(frame, self.cfg, self.role)
        if self.kd_skip:
            if not frame.condition:
                raise ValueError(f"frame {frame.sample_token} (scene {frame.scene_name}): DistillConfig.kd_skip needs "
                                 "the scene's condition, which comes from its description in a nuScenes drive")
            sample["kd_keep"] = np.float32(frame.condition not in self.kd_skip)
        if self.cache_size:
            self._cache[i] = sample
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return sample


def collate(samples: list[dict], cfg: ModelConfig) -> dict:
    """Stack training samples: the network inputs (runtime's :func:`collate_inputs`), then the
    teacher's LiDAR pillars and the targets."""
    batch = collate_inputs(samples, cfg)
    if "lidar" in samples[0]:
        lp, lc = batch_pillars([s["lidar"] for s in samples], cfg.grid)
        batch["lidar_pillars"], batch["lidar_coords"] = torch.from_numpy(lp), torch.from_numpy(lc)
    for key in ("heatmap", "index", "mask", "reg", "depth_target", "kd_keep"):
        if key in samples[0]:
            batch[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    return batch


STUDENT_INPUTS = ("images", "ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths",
                  "radar_pillars", "radar_coords")


def student_args(batch: dict, device=None) -> tuple[torch.Tensor, ...]:
    """The student's forward arguments, in the export signature's order."""
    return tuple(batch[k].to(device) for k in STUDENT_INPUTS)


def teacher_args(batch: dict, device=None) -> tuple:
    return batch["lidar_pillars"].to(device), batch["lidar_coords"].to(device), batch["batch_size"]


def move_targets(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
