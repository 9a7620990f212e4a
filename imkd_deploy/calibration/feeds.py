"""Calibration frames -> model inputs (the runtime's own preprocessing, so INT8 ranges are
measured on exactly the tensors the deployed model will see), and the one call that
`imkd calibrate`, `imkd build-engine --int8` and the quickstart share."""

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


def model_config_of(onnx_path: Path) -> ModelConfig:
    from imkd_deploy.export.metadata import read_metadata

    return ModelConfig.from_dict(read_metadata(onnx_path)["config"])


def calibrate_from_drive(model: Path, set_path: Path | None, precision: str, out_path: Path | None,
                         dataroot: Path | None, method: str = "entropy", sensitivity_target: float | None = None,
                         cache_dir: Path | None = None):
    """INT8 (frames of ``dataroot`` listed in ``set_path``) or FP16 ONNX beside ``model``;
    calibration caches under ``cache_dir`` (default calibration/cache)."""
    from imkd_deploy.calibration.calib_set import read_manifest
    from imkd_deploy.calibration.calibrate import calibrate
    from imkd_deploy.calibration.quantize import QuantizeSettings

    if precision not in ("int8", "fp16"):
        raise UserError(f"--precision must be int8 or fp16, got '{precision}'")
    if not Path(model).is_file():
        raise UserError(f"model {model} does not exist")
    out_path = out_path or Path(model).with_name(f"{Path(model).stem}.{precision}.onnx")
    feeds = None
    if precision == "int8":
        if set_path is None:
            raise UserError("--precision int8 needs --set calibration/NAME.txt (make one with `imkd calibrate make-set`)")
        if dataroot is None:
            raise UserError("--precision int8 reads the calibration frames: give --dataroot")
        feeds = frame_feeds(dataroot, read_manifest(set_path), model_config_of(model))
    extra = {"cache_dir": Path(cache_dir)} if cache_dir is not None else {}
    return calibrate(model, set_path, precision, out_path, feeds=feeds, settings=QuantizeSettings(method=method),
                     sensitivity_target=sensitivity_target, **extra)
