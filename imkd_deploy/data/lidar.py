"""LiDAR: the nuScenes ``.pcd.bin`` reader and one sweep moved into the key ego frame.

A ``.pcd.bin`` is raw little-endian float32, 5 values a point (x, y, z, intensity, ring),
in the LIDAR_TOP sensor frame. The ring index is dropped, as the devkit does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imkd_deploy.data.radar import SensorFileError

LIDAR_POINT_DIM = 5       # x, y, z, intensity, dt (see frame.LIDAR_FEATURES)
_FILE_DIM = 5             # x, y, z, intensity, ring
_MAX_RANGE_M = 1000.0     # nothing a real LiDAR returns; beyond it the bytes are garbage
_MAX_BAD_FRACTION = 0.01
_MIN_DISTANCE_M = 1.0     # the devkit's default: drop returns off the ego vehicle's own roof


def read_lidar_bin(path: str | Path) -> tuple[np.ndarray, str | None]:
    """Read a ``.pcd.bin`` into (N, 4) float32 x, y, z, intensity (sensor frame).

    Raises SensorFileError when nothing is usable. Returns a problem string alongside the
    points when part of the file was garbage (wrong size, non-finite or absurd values).
    """
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype="<f4")
    except OSError as exc:
        raise SensorFileError(f"{path}: {exc.strerror or exc}") from None
    problems = []
    if raw.size % _FILE_DIM:
        problems.append(f"size {raw.size * 4} bytes is not a whole number of 20-byte points")
        raw = raw[: raw.size - raw.size % _FILE_DIM]
    pts = raw.reshape(-1, _FILE_DIM)[:, :4]
    bad = 0
    # Whole-array reductions first: a clean file (the usual case) skips the per-point mask.
    if not (np.isfinite(raw).all() and np.abs(pts[:, :3]).max(initial=0.0) < _MAX_RANGE_M):
        good = np.isfinite(pts).all(axis=1) & (np.abs(pts[:, :3]) < _MAX_RANGE_M).all(axis=1)
        bad = int(len(pts) - good.sum())
    if bad:
        problems.append(f"{bad} of {len(pts)} points are non-finite or beyond {_MAX_RANGE_M:.0f} m")
        # A few bad points are dropped; more means the bytes are not a point cloud at all, and
        # the 'plausible' survivors of random bytes would be noise in the BEV.
        pts = pts[good] if bad <= _MAX_BAD_FRACTION * len(pts) else pts[:0]
    if problems and not len(pts):
        raise SensorFileError(f"{path}: unreadable LiDAR sweep ({'; '.join(problems)})")
    return np.ascontiguousarray(pts, dtype=np.float32), (f"{path}: {'; '.join(problems)}" if problems else None)


def lidar_sweep_points(points: np.ndarray, key_from_sensor: np.ndarray, dt: float) -> np.ndarray:
    """One sweep (N, 4) in its sensor frame -> (K, 5) float32 in the key ego frame with dt."""
    near = (np.abs(points[:, 0]) < _MIN_DISTANCE_M) & (np.abs(points[:, 1]) < _MIN_DISTANCE_M)
    points = points[~near]
    out = np.empty((len(points), LIDAR_POINT_DIM), np.float32)
    # float32 keeps millimetres within a few km of the ego, as the devkit's float32 clouds do.
    rot = key_from_sensor[:3, :3].T.astype(np.float32)
    out[:, :3] = points[:, :3] @ rot + key_from_sensor[:3, 3].astype(np.float32)
    out[:, 3] = points[:, 3]
    out[:, 4] = max(dt, 0.0)
    return out
