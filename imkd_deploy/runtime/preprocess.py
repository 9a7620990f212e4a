"""Frame -> the network's inputs: the one definition, shared by training and every backend.

:func:`network_inputs` turns a frame into numpy inputs (images stay uint8), :func:`collate_inputs`
stacks samples into torch tensors (normalised images, stacked BEVPool geometry, batch-offset
radar pillars), and :func:`preprocess` adapts that to named numpy arrays at batch 1. Training
(distill.dataset) builds on the same two functions, so training and deployment cannot drift
apart. BEVPool geometry comes from a GeometryCache keyed by the rig's calibration, so a drive
with one rig computes it once, whether training, evaluating or deploying in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imkd_deploy.config import ModelConfig
from imkd_deploy.data.frame import Frame
from imkd_deploy.model.pillars import RADAR_SPEC, batch_pillars, pillarise
from imkd_deploy.ops.bev_pool import GeometryCache, stack_geometry
from imkd_deploy.runtime.backends import INPUT_NAMES

_GEOMETRY = GeometryCache(maxsize=32)


@dataclass
class Preprocessed:
    sample_token: str
    ego2global: np.ndarray
    inputs: dict[str, np.ndarray]


def normalise_images(images: np.ndarray, cfg: ModelConfig) -> torch.Tensor:
    """uint8 (..., H, W, 3) RGB -> float32 (..., 3, H, W) normalised with the config's mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    mean = x.new_tensor(cfg.image_mean)
    std = x.new_tensor(cfg.image_std)
    return ((x - mean) / std).movedim(-1, -3).contiguous()


def network_inputs(frame: Frame, cfg: ModelConfig, cache: GeometryCache | None = None) -> dict:
    """The deployed network's per-frame inputs, numpy (images stay uint8 until collate)."""
    if frame.images.shape[0] != cfg.num_cams or tuple(frame.images.shape[1:3]) != tuple(cfg.image_size):
        raise ValueError(
            f"frame {frame.sample_token}: images {frame.images.shape} do not match the model's "
            f"{cfg.num_cams} cameras at {cfg.image_size}"
        )
    geometry = (cache or _GEOMETRY).get(frame.intrinsics, frame.cam2ego, frame.img_aug, cfg)
    radar_pillars, radar_coords = pillarise(frame.radar_points, cfg.grid, RADAR_SPEC)
    return {
        "sample_token": frame.sample_token,
        "ego2global": frame.ego2global,
        "images": frame.images,
        "geometry": geometry,
        "radar": (radar_pillars, radar_coords),
    }


def collate_inputs(samples: list[dict], cfg: ModelConfig) -> dict:
    """Stack samples (from network_inputs, or training samples holding its keys) into torch
    tensors named like the export signature. Samples without images (the teacher's) give
    only the bookkeeping keys."""
    batch: dict = {
        "sample_token": [s["sample_token"] for s in samples],
        "ego2global": np.stack([s["ego2global"] for s in samples]),
        "batch_size": len(samples),
    }
    if "images" in samples[0]:
        batch["images"] = normalise_images(np.stack([s["images"] for s in samples]), cfg)
        geom = stack_geometry([s["geometry"] for s in samples])
        for name, arr in zip(("ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths"), geom.arrays()):
            batch[name] = torch.from_numpy(np.array(arr, dtype=np.int32))
        rp, rc = batch_pillars([s["radar"] for s in samples], cfg.grid)
        batch["radar_pillars"], batch["radar_coords"] = torch.from_numpy(rp), torch.from_numpy(rc)
    return batch


def preprocess(frame: Frame, cfg: ModelConfig, cache: GeometryCache | None = None) -> Preprocessed:
    batch = collate_inputs([network_inputs(frame, cfg, cache)], cfg)
    inputs = {name: batch[name].numpy() for name in INPUT_NAMES}
    return Preprocessed(frame.sample_token, frame.ego2global, inputs)
