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
    rgb: np.ndarray          # (H*W + 1, 3) uint8 colour with baked-in grain; last row = outside
    origin: tuple[float, float]   # global (x, y) of pixel column 0 / the bottom row edge
    resolution: float        # metres per pixel

    def __post_init__(self) -> None:
        self._label_flat = np.append(self.labels.ravel(), np.uint8(GRASS))

    def _flat_index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Flat raster index of global points; H*W (one past the end) outside the raster."""
        h, w = self.labels.shape
        col = ((x - self.origin[0]) * (1.0 / self.resolution)).astype(np.int64)
        row = (h - 1) - ((y - self.origin[1]) * (1.0 / self.resolution)).astype(np.int64)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h) & (x >= self.origin[0]) & (y >= self.origin[1])
        return np.where(inside, row * w + col, h * w)

    def lookup(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Labels at global points; grass outside the raster."""
        return self._label_flat[self._flat_index(x, y)]

    @property
    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 colour raster (a view, no copy)."""
        return self.rgb[:-1].reshape(*self.labels.shape, 3)

    @property
    def outside_rgb(self) -> np.ndarray:
        return self.rgb[-1]

    def preview_png(self, max_side: int = 1024) -> bytes:
        """A small colour PNG of the map (the nuScenes map table needs a mask file)."""
        scale = min(1.0, max_side / max(self.labels.shape))
        small = cv2.resize(self.labels, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        rgb = LABEL_RGB[small].astype(np.uint8)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        return buf.tobytes()


def rasterise_road(road: Road, rng: np.random.Generator, resolution: float = 0.1, margin: float = 40.0) -> GroundMap:
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
    # Surface grain baked into the colour raster: it is anchored to the world, so the
    # texture moves consistently across frames and cameras (a cue for motion and depth).
    grain = rng.integers(-9, 10, size=labels.shape, dtype=np.int16)
    rgb = np.clip(LABEL_RGB.astype(np.int16)[labels] + grain[..., None], 0, 255).astype(np.uint8).reshape(-1, 3)
    rgb = np.concatenate([rgb, LABEL_RGB[GRASS][None].astype(np.uint8)])
    return GroundMap(labels, rgb, (float(x0), float(y0)), resolution)
