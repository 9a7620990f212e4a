"""The one in-memory form of a recorded-drive key frame, shared by training and runtime.

Conventions (every consumer relies on them):
- Ego frame = the key frame's LIDAR_TOP ego pose (x forward, y left, z up), metres.
- Boxes are (x, y, z, w, l, h, yaw, vx, vy): centre, nuScenes w/l/h order, yaw about +z
  from the ego x axis, velocity in the ego frame (m/s). The same layout is used for
  predictions before they are sent to the global frame.
- Images are uint8 RGB, (N_cam, H, W, 3), already resized+cropped to the model input;
  ``intrinsics`` are updated for that resize/crop, and ``img_aug`` holds the 3x3 pixel
  transform that was applied (kept so the geometry cache keys on it explicitly).
- Radar points (M, 7): x, y, z, rcs, vx_comp, vy_comp, dt (seconds, >= 0, key time minus
  sweep time), all in the key ego frame after ego-motion compensation.
- LiDAR points (K, 5): x, y, z, intensity (0..255 as nuScenes), dt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RADAR_FEATURES = ("x", "y", "z", "rcs", "vx_comp", "vy_comp", "dt")
LIDAR_FEATURES = ("x", "y", "z", "intensity", "dt")
BOX_FIELDS = ("x", "y", "z", "w", "l", "h", "yaw", "vx", "vy")


@dataclass
class Frame:
    sample_token: str
    scene_name: str
    timestamp: int                      # microseconds, as nuScenes
    images: np.ndarray                  # (N, H, W, 3) uint8 RGB
    intrinsics: np.ndarray              # (N, 3, 3) float64, after resize/crop
    cam2ego: np.ndarray                 # (N, 4, 4) float64, camera -> key ego frame
    ego2global: np.ndarray              # (4, 4) float64, key ego frame -> global
    img_aug: np.ndarray                 # (N, 3, 3) float64, original pixels -> network pixels
    radar_points: np.ndarray            # (M, 7) float32
    lidar_points: np.ndarray | None     # (K, 5) float32; None when not loaded (inference)
    gt_boxes: np.ndarray                # (G, 9) float32, ego frame; (0, 9) when no GT
    gt_labels: np.ndarray               # (G,) int64 index into config.CLASS_NAMES
    gt_num_pts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # lidar+radar pts per box
    camera_channels: tuple[str, ...] = ()
    degraded: list[str] = field(default_factory=list)   # one human-readable reason per problem
    condition: str = ""                 # day | rain | night, from the scene's description ("" unknown)

    @property
    def is_degraded(self) -> bool:
        return bool(self.degraded)
