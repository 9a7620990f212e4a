"""Frame -> the network's named numpy inputs (batch 1), shared by every backend.

The training collate (distill.dataset) is the one definition of how images are normalised,
geometry is stacked and pillars are built; this module only adapts it to numpy-by-name, so
training and deployment cannot drift apart. BEVPool geometry comes from a GeometryCache
keyed by the rig's calibration (the one cache ``network_inputs`` keeps), so a drive with one rig
computes it once, whether training, evaluating or deploying in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imkd_deploy.config import ModelConfig
from imkd_deploy.data.frame import Frame
from imkd_deploy.ops.bev_pool import GeometryCache
from imkd_deploy.runtime.backends import INPUT_NAMES


@dataclass
class Preprocessed:
    sample_token: str
    ego2global: np.ndarray
    inputs: dict[str, np.ndarray]


def preprocess(frame: Frame, cfg: ModelConfig, cache: GeometryCache | None = None) -> Preprocessed:
    from imkd_deploy.distill.dataset import collate, network_inputs

    sample = network_inputs(frame, cfg, cache)
    batch = collate([sample], cfg)
    inputs = {name: batch[name].numpy() for name in INPUT_NAMES}
    return Preprocessed(frame.sample_token, frame.ego2global, inputs)

