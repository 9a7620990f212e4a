"""nuScenes tables and sensor-file writers for the synthetic drive.

File formats follow what nuscenes-devkit 1.2.0 reads (see TOOLCHAIN.md): LiDAR ``.pcd.bin``
is raw float32 N x 5; radar ``.pcd`` is an 11-line ASCII header then 43-byte little-endian
records, followed by one spare byte (the devkit's reader asserts that a byte follows the
last field); an empty radar sweep is one all-NaN record, the devkit's "empty" convention.
Tokens are md5 hex digests of readable keys, so the same seed gives the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np

from imkd_deploy.data.synth_radar import RADAR_DTYPE
from imkd_deploy.data.synth_world import ATTRIBUTES, CATEGORY

TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")

VISIBILITY = (("1", "v0-40", "visibility of whole object is between 0 and 40%"),
              ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
              ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
              ("4", "v80-100", "visibility of whole object is between 80 and 100%"))

RADAR_HEADER = (
    "# .PCD v0.7 - Point Cloud Data file format\n"
    "VERSION 0.7\n"
    "FIELDS x y z dyn_prop id rcs vx vy vx_comp vy_comp is_quality_valid ambig_state x_rms y_rms "
    "invalid_state pdh0 vx_rms vy_rms\n"
    "SIZE 4 4 4 1 2 4 4 4 4 4 1 1 1 1 1 1 1 1\n"
    "TYPE F F F I I F F F F F I I I I I I I I\n"
    "COUNT 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1\n"
    "WIDTH {n}\n"
    "HEIGHT 1\n"
    "VIEWPOINT 0 0 0 1 0 0 0\n"
    "POINTS {n}\n"
    "DATA binary\n"
)


def token(*key: object) -> str:
    return hashlib.md5("/".join(str(k) for k in key).encode()).hexdigest()


def static_tables(seed: int) -> dict[str, list[dict]]:
    """attribute, category, visibility: the same for every scene."""
    return {
        "attribute": [{"token": token(seed, "attribute", a), "name": a, "description": ""} for a in ATTRIBUTES],
        "category": [{"token": token(seed, "category", c), "name": c, "description": "", "index": i}
                     for i, c in enumerate(CATEGORY.values())],
        "visibility": [{"token": t, "level": lvl, "description": d} for t, lvl, d in VISIBILITY],
    }


def visibility_token(fraction: np.ndarray) -> np.ndarray:
    """Visible fraction 0..1 -> nuScenes visibility token '1'..'4'."""
    return np.array(["1", "2", "3", "4"])[np.digitize(fraction, [0.4, 0.6, 0.8])]


def write_lidar(path: Path, points: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(points, dtype="<f4").tobytes())


def write_radar(path: Path, points: np.ndarray) -> None:
    if len(points) == 0:
        points = np.zeros(1, RADAR_DTYPE)
        for name in ("x", "y", "z", "rcs", "vx", "vy", "vx_comp", "vy_comp"):
            points[name] = np.nan
    body = np.ascontiguousarray(points, dtype=RADAR_DTYPE).tobytes()
    path.write_bytes(RADAR_HEADER.format(n=len(points)).encode("ascii") + body + b"\n")


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def write_tables(table_dir: Path, tables: dict[str, list[dict]]) -> None:
    """All 13 tables as JSON, each written to a temp name then renamed into place."""
    table_dir.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        tmp = table_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(tables.get(name, []), indent=1))
        os.replace(tmp, table_dir / f"{name}.json")
