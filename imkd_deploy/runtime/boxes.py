"""Ego-frame detections -> nuScenes submission boxes (global frame) and the submission file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imkd_deploy.atomic import atomic_write_json
from imkd_deploy.config import CLASS_NAMES
from imkd_deploy.runtime.decode import Detections

VEHICLES = {"car", "truck", "bus", "trailer", "construction_vehicle"}
CYCLES = {"motorcycle", "bicycle"}
# CenterPoint's rule: above this speed (m/s) an object is "moving"; the devkit scores the
# attribute, so a sensible default per class matters for mAAE.
MOVING_SPEED = 0.2
DEFAULT_META = {"use_camera": True, "use_lidar": False, "use_radar": True, "use_map": False, "use_external": False}


def boxes_to_global(boxes: np.ndarray, ego2global: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, 9) ego boxes -> translation (K, 3), rotation quaternion w,x,y,z (K, 4) about +z,
    velocity (K, 2), all in the global frame."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 9)
    rot = np.asarray(ego2global, np.float64)[:3, :3]
    trans = boxes[:, :3] @ rot.T + np.asarray(ego2global, np.float64)[:3, 3]
    # boxes stay upright: only the ego pose's heading changes their yaw
    yaw = boxes[:, 6] + np.arctan2(rot[1, 0], rot[0, 0])
    quat = np.stack([np.cos(yaw / 2), np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2)], axis=1)
    vel3 = np.concatenate([boxes[:, 7:9], np.zeros((len(boxes), 1))], axis=1) @ rot.T
    return trans, quat, vel3[:, :2]


def attribute_names(labels: np.ndarray, velocity: np.ndarray) -> list[str]:
    """Default nuScenes attribute for each box from its class and speed."""
    moving = np.hypot(velocity[:, 0], velocity[:, 1]) > MOVING_SPEED
    names = []
    for label, mov in zip(np.asarray(labels).tolist(), moving.tolist()):
        cls = CLASS_NAMES[label]
        if cls in VEHICLES:
            names.append("vehicle.moving" if mov else "vehicle.parked")
        elif cls in CYCLES:
            names.append("cycle.with_rider" if mov else "cycle.without_rider")
        elif cls == "pedestrian":
            names.append("pedestrian.moving" if mov else "pedestrian.standing")
        else:
            names.append("")
    return names


def submission_entries(sample_token: str, det: Detections, ego2global: np.ndarray) -> list[dict]:
    """One sample's detections as devkit submission boxes."""
    trans, quat, vel = boxes_to_global(det.boxes, ego2global)
    attrs = attribute_names(det.labels, vel)
    size = np.maximum(np.asarray(det.boxes, np.float64)[:, 3:6], 1e-3)   # the devkit rejects sizes <= 0
    return [
        {
            "sample_token": sample_token,
            "translation": t.tolist(),
            "size": s.tolist(),
            "rotation": q.tolist(),
            "velocity": v.tolist(),
            "detection_name": CLASS_NAMES[label],
            "detection_score": float(score),
            "attribute_name": attr,
        }
        for t, s, q, v, label, score, attr in zip(trans, size, quat, vel, det.labels.tolist(), det.scores, attrs)
    ]


def write_submission(path: Path, results: dict[str, list[dict]], meta: dict | None = None) -> Path:
    """Atomically write ``{"meta": ..., "results": ...}`` to ``path``."""
    return atomic_write_json(path, {"meta": meta or DEFAULT_META, "results": results})
