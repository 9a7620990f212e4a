"""The synthetic car's sensor rig: nuScenes-like mounts, intrinsics and timing.

Mount positions and yaws follow the real nuScenes rig (Renault Zoe): LIDAR_TOP on the roof
with its x axis pointing right (yaw -90 deg), six cameras at yaws 0/-55/-110/180/110/55 deg,
five Continental ARS408 radars at the bumpers. The flat world has no pitch/roll, so the
mounts are pure yaw rotations (cameras add the fixed optical-axis permutation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imkd_deploy.config import CAMERA_CHANNELS, LIDAR_CHANNEL, RADAR_CHANNELS

# The camera optical frame (x right, y down, z forward) expressed in a forward-looking ego frame.
CAM_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])

# channel: (translation in the ego frame, yaw in degrees)
CAMERA_MOUNTS = {
    "CAM_FRONT": ((1.70, 0.016, 1.51), 0.0),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.50), -55.0),
    "CAM_BACK_RIGHT": ((1.03, -0.48, 1.57), -110.0),
    "CAM_BACK": ((0.03, 0.0, 1.58), 180.0),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0),
}
# nuScenes intrinsics at 1600x900 (fx, fy, cx, cy); CAM_BACK has the wider lens.
CAMERA_INTRINSICS_1600 = {
    "CAM_BACK": (809.2, 809.2, 829.2, 481.8),
}
DEFAULT_INTRINSICS_1600 = (1266.4, 1266.4, 816.3, 491.5)

RADAR_MOUNTS = {
    "RADAR_FRONT": ((3.41, 0.0, 0.50), 0.0),
    "RADAR_FRONT_LEFT": ((2.42, 0.80, 0.50), 90.0),
    "RADAR_FRONT_RIGHT": ((2.42, -0.80, 0.50), -90.0),
    "RADAR_BACK_LEFT": ((-0.56, 0.63, 0.50), 175.0),
    "RADAR_BACK_RIGHT": ((-0.56, -0.63, 0.50), -175.0),
}
LIDAR_MOUNT = ((0.94, 0.0, 1.84), -90.0)

LIDAR_PERIOD = 0.05          # 20 Hz spin; cameras fire when the spin passes their yaw


def yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_quaternion(yaw: float) -> list[float]:
    """nuScenes order w, x, y, z."""
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def matrix_quaternion(r: np.ndarray) -> list[float]:
    """w, x, y, z of a proper rotation matrix (Shepperd's method, w >= 0 branch first)."""
    tr = np.trace(r)
    if tr > 0:
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(r)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + r[i, i] - r[j, j] - r[k, k])
        q = [0.0, 0.0, 0.0, 0.0]
        q[0] = (r[k, j] - r[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (r[j, i] + r[i, j]) / s
        q[1 + k] = (r[k, i] + r[i, k]) / s
    q = np.array(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q / np.linalg.norm(q)]


@dataclass(frozen=True)
class Sensor:
    channel: str
    modality: str                 # camera | lidar | radar
    translation: np.ndarray       # (3,) in the ego frame
    rotation: np.ndarray          # (3, 3) sensor -> ego
    intrinsic: np.ndarray | None  # (3, 3) cameras only
    time_offset: float            # seconds after the LiDAR key time that its key frame is taken

    def to_ego(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.rotation, self.translation
        return m


def build_rig(image_width: int, image_height: int) -> dict[str, Sensor]:
    """All 12 sensors keyed by channel, cameras' intrinsics scaled to the image size."""
    rig: dict[str, Sensor] = {}
    tx, ty = LIDAR_MOUNT[0], np.deg2rad(LIDAR_MOUNT[1])
    rig[LIDAR_CHANNEL] = Sensor(LIDAR_CHANNEL, "lidar", np.array(tx), yaw_matrix(ty), None, 0.0)
    sx, sy = image_width / 1600.0, image_height / 900.0
    for ch in CAMERA_CHANNELS:
        t, yaw_deg = CAMERA_MOUNTS[ch]
        fx, fy, cx, cy = CAMERA_INTRINSICS_1600.get(ch, DEFAULT_INTRINSICS_1600)
        k = np.array([[fx * sx, 0.0, cx * sx], [0.0, fy * sy, cy * sy], [0.0, 0.0, 1.0]])
        # The LiDAR spins clockwise seen from above starting at the back; a camera is
        # exposed as the spin passes its yaw (as nuScenes syncs them), within one period.
        offset = ((-yaw_deg) % 360.0) / 360.0 * LIDAR_PERIOD - LIDAR_PERIOD / 2
        rig[ch] = Sensor(ch, "camera", np.array(t), yaw_matrix(np.deg2rad(yaw_deg)) @ CAM_AXES, k, offset)
    for i, ch in enumerate(RADAR_CHANNELS):
        t, yaw_deg = RADAR_MOUNTS[ch]
        # Radars run free (not synced to the LiDAR): their key frames land a few ms off.
        rig[ch] = Sensor(ch, "radar", np.array(t), yaw_matrix(np.deg2rad(yaw_deg)), None, (i - 2) * 0.011)
    return rig
