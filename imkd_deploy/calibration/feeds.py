"""Calibration frames -> model inputs: the runtime's own preprocessing, so INT8 ranges are
measured on exactly the tensors the deployed model will see."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from imkd_deploy.calibration.calib_set import CalibEntry, CalibrationSet
from imkd_deploy.config import ModelConfig
from imkd_deploy.errors import UserError


def frame_feeds(dataroot: Path, cset: CalibrationSet, cfg: ModelConfig) -> Callable[[CalibEntry], dict[str, np.ndarray]]:
    """A function (scene, token) -> network inputs, reading frames from ``dataroot`` lazily."""
    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.runtime.preprocess import preprocess

    drive = NuScenesDrive(dataroot, cset.version, cfg, scenes=cset.scenes)
    known = set(drive.sample_tokens)

    def feed(entry: CalibEntry) -> dict[str, np.ndarray]:
        if entry.sample_token not in known:
            raise UserError(f"calibration frame {entry.sample_token} (scene {entry.scene_name}) is not in "
                            f"{dataroot}/{cset.version}: the manifest belongs to another drive")
        return preprocess(drive.frame(entry.sample_token), cfg).inputs

    return feed
