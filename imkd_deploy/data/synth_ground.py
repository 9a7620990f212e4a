"""The ground surface of a scene as a label raster: grass, asphalt, sidewalk, lane paint.

One raster serves every sensor: the cameras look up its colour per pixel, the LiDAR its
reflectivity per ground hit (road paint is retroreflective, so it shows up in LiDAR
intensity as it does on real data), and the nuScenes ``map`` table gets a PNG of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from imkd_deploy.data.synth_world import LANE_HALF_WIDTH, ROAD_HALF_WIDTH, SIDEWALK_OUTER, Road

GRASS, ASPHALT, SIDEWALK, PAINT, CURB = 0, 1, 2, 3, 4

# RGB per label, and the LiDAR intensity (0..255, nuScenes scale) mean and spread.
LABEL_RGB = np.array([[86, 112, 58], [72, 72, 76], [150, 146, 138], [225, 225, 215], [180, 176, 168]], np.float32)
LABEL_INTENSITY = np.array([[4.0, 2.0], [9.0, 3.0], [16.0, 5.0], [70.0, 20.0], [22.0, 6.0]], np.float32)


@dataclass
class GroundMap:
    labels: np.ndarray       # (H, W) uint8, row 0 = max y (image convention)
    origin: tuple[float, float]   # global (x, y) of pixel column 0 / the bottom row edge
    resolution: float        # metres per pixel

    def lookup(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Labels at global points; grass outside the raster."""
        col = np.floor((x - self.origin[0]) / self.resolution).astype(np.int64)
        row = self.labels.shape[0] - 1 - np.floor((y - self.origin[1]) / self.resolution).astype(np.int64)
        inside = (col >= 0) & (col < self.labels.shape[1]) & (row >= 0) & (row < self.labels.shape[0])
        out = np.zeros(np.shape(x), np.uint8)
        out[inside] = self.labels[row[inside], col[inside]]
        return out

    def preview_png(self, max_side: int = 1024) -> bytes:
        """A small colour PNG of the map (the nuScenes map table needs a mask file)."""
        scale = min(1.0, max_side / max(self.labels.shape))
        small = cv2.resize(self.labels, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        rgb = LABEL_RGB[small].astype(np.uint8)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        return buf.tobytes()


def rasterise_road(road: Road, resolution: float = 0.1, margin: float = 40.0) -> GroundMap:
    """Draw sidewalks, carriageway, edge lines and dashed centre line as thick polylines."""
    x0, y0 = road.x.min() - margin, road.y.min() - margin
    w = int(np.ceil((road.x.max() + margin - x0) / resolution))
    h = int(np.ceil((road.y.max() + margin - y0) / resolution))
    labels = np.zeros((h, w), np.uint8)
    shift = 3                       # cv2 sub-pixel precision bits

    def to_px(lateral: float, sl: slice = slice(None)) -> np.ndarray:
        x, y, _ = road.at(road.s[sl], lateral)
        col = (x - x0) / resolution
        row = h - 1 - (y - y0) / resolution
        return np.round(np.stack([col, row], 1) * (1 << shift)).astype(np.int32)

    def band(lateral: float, width_m: float, value: int, sl: slice = slice(None)) -> None:
        thick = max(1, int(round(width_m / resolution)))
        cv2.polylines(labels, [to_px(lateral, sl)], False, int(value), thick, cv2.LINE_8, shift)

    band(0.0, 2 * SIDEWALK_OUTER, SIDEWALK)
    band(ROAD_HALF_WIDTH + 0.1, 0.25, CURB)
    band(-ROAD_HALF_WIDTH - 0.1, 0.25, CURB)
    band(0.0, 2 * ROAD_HALF_WIDTH, ASPHALT)
    band(LANE_HALF_WIDTH, 0.15, PAINT)
    band(-LANE_HALF_WIDTH, 0.15, PAINT)
    # Dashed centre line: 3 m paint, 6 m gap (samples are 0.5 m apart).
    ds = float(road.s[1] - road.s[0])
    period, dash = int(round(9.0 / ds)), int(round(3.0 / ds))
    dashes = [to_px(0.0, slice(i, i + dash + 1)) for i in range(0, len(road.s) - dash, period)]
    cv2.polylines(labels, dashes, False, PAINT, max(1, int(round(0.15 / resolution))), cv2.LINE_8, shift)
    return GroundMap(labels, (float(x0), float(y0)), resolution)
