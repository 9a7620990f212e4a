"""Run a torch checkpoint (student or teacher) over a split and write a nuScenes submission."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from imkd_deploy.distill.checkpoint import default_device, load_model
from imkd_deploy.distill.dataset import collate, student_args, teacher_args
from imkd_deploy.model.pillars import LIDAR_SPEC, pillarise
from imkd_deploy.runtime.boxes import DEFAULT_META, submission_entries, write_submission
from imkd_deploy.runtime.decode import decode
from imkd_deploy.runtime.preprocess import network_inputs

log = logging.getLogger(__name__)


def results_path(checkpoint: Path, split: str) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_{split}_results.json")


@torch.no_grad()
def predict_split(checkpoint: str | Path, dataroot: str | Path, version: str, split: str, *, batch_size: int = 1,
                  score_threshold: float = 0.05, out: Path | None = None, frames=None) -> Path:
    """Decode every sample of ``split``; write the submission next to the checkpoint
    (``<ckpt>_<split>_results.json``, or ``out``) and return its path."""
    from imkd_deploy.data.loader import NuScenesDrive

    device = torch.device(default_device())
    model, ckpt = load_model(Path(checkpoint), device)
    cfg = ckpt.run_config.model
    teacher = ckpt.role == "teacher"
    if frames is None:
        frames = NuScenesDrive(dataroot, version, cfg, split=split, load_lidar=teacher)
    results: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for start in range(0, len(frames), batch_size):
        samples = []
        for i in range(start, min(start + batch_size, len(frames))):
            frame = frames[i]
            if teacher:
                samples.append({"sample_token": frame.sample_token, "ego2global": frame.ego2global,
                                "lidar": pillarise(frame.lidar_points, cfg.grid, LIDAR_SPEC)})
            else:
                samples.append(network_inputs(frame, cfg))
        batch = collate(samples, cfg)
        outputs = model(*(teacher_args(batch, device) if teacher else student_args(batch, device)))
        for token, ego2global, det in zip(batch["sample_token"], batch["ego2global"],
                                          decode(outputs, cfg.grid, score_threshold=score_threshold)):
            results[token] = submission_entries(token, det, ego2global)
    path = out or results_path(Path(checkpoint), split)
    meta = dict(DEFAULT_META, use_lidar=teacher, use_camera=not teacher, use_radar=not teacher)
    write_submission(path, results, meta)
    log.info("%s: %d samples, %d boxes in %.1f s -> %s", checkpoint, len(results),
             sum(len(v) for v in results.values()), time.perf_counter() - t0, path)
    return path
