"""Pillarisation (numpy, shared by training and the runtime) and the one torch PillarEncoder.

Radar and LiDAR use the same code with a different :class:`PillarSpec`. A pillar is one
occupied BEV cell; its feature vector aggregates every point in the cell, so the network
never sees a variable number of points per pillar (and the export needs no padding):

    [dx, dy, dz, mean(mean_columns)..., max(max_columns)..., log1p(count)]

dx, dy are the mean offsets to the cell centre in cells, dz the mean height relative to the
grid's z centre in half-ranges; the other columns are scaled by the spec so every feature is
O(1). The flat coordinate is ``b*ny*nx + iy*nx + ix`` (BEV tensors are (C, ny, nx), rows from
y, columns from x), the layout :func:`scatter_to_bev` and the exported graph expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imkd_deploy.config import BEVGrid
from imkd_deploy.model.backbone import conv_bn_relu


@dataclass(frozen=True)
class PillarSpec:
    """Which point columns a sensor's pillars aggregate, and how each is scaled."""

    name: str
    mean_columns: tuple[int, ...]      # columns of the (M, F) point array averaged per cell
    mean_scales: tuple[float, ...]
    max_columns: tuple[int, ...]       # columns max-pooled per cell
    max_scales: tuple[float, ...]
    feature_names: tuple[str, ...]

    @property
    def num_features(self) -> int:
        return 3 + len(self.mean_columns) + len(self.max_columns) + 1

    def index(self, feature: str) -> int:
        return self.feature_names.index(feature)


# Radar points: x y z rcs vx_comp vy_comp dt (Frame.RADAR_FEATURES). RCS is in dBsm
# (roughly -10..40), so /10; velocities /10 m/s; dt is already O(0.1..0.5) s.
RADAR_SPEC = PillarSpec(
    name="radar",
    mean_columns=(3, 4, 5, 6), mean_scales=(0.1, 0.1, 0.1, 1.0),
    max_columns=(3,), max_scales=(0.1,),
    feature_names=("dx", "dy", "dz", "rcs_mean", "vx_mean", "vy_mean", "dt_mean", "rcs_max", "log_count"),
)
# LiDAR points: x y z intensity dt (Frame.LIDAR_FEATURES). Intensity 0..255 -> 0..1.
LIDAR_SPEC = PillarSpec(
    name="lidar",
    mean_columns=(3, 4), mean_scales=(1.0 / 255.0, 1.0),
    max_columns=(3,), max_scales=(1.0 / 255.0,),
    feature_names=("dx", "dy", "dz", "intensity_mean", "dt_mean", "intensity_max", "log_count"),
)

# Linear RCS (m^2) at which a cell's radar intensity reaches 1 - 1/e: about one car-sized
# reflector. A saturating map keeps I_R in [0, 1] without a per-frame max, so one bright
# truck does not dim every other cell.
RADAR_RCS_REF_M2 = 10.0
# Mean LiDAR return height (m above the ego frame's ground) from which a cell counts as
# structure (0 below the first value, 1 above the second) in the object-focused I_L.
STRUCTURE_HEIGHT = (0.2, 0.5)


def pillarise(points: np.ndarray, grid: BEVGrid, spec: PillarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Points (M, F) in the ego frame -> pillar features (P, spec.num_features) float32 and
    flat cell indices (P,) int64 ``iy*nx + ix`` (sorted, unique). Points outside the grid
    (x, y or z) are dropped."""
    nx, ny = grid.nx, grid.ny
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] <= max(spec.mean_columns + spec.max_columns):
        raise ValueError(f"{spec.name} points must be (M, >{max(spec.mean_columns + spec.max_columns)}), got {pts.shape}")
    ix = np.floor((pts[:, 0] - grid.x_range[0]) / grid.cell).astype(np.int64)
    iy = np.floor((pts[:, 1] - grid.y_range[0]) / grid.cell).astype(np.int64)
    keep = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (pts[:, 2] >= grid.z_range[0]) & (pts[:, 2] < grid.z_range[1])
    pts, ix, iy = pts[keep], ix[keep], iy[keep]
    if len(pts) == 0:
        return np.zeros((0, spec.num_features), np.float32), np.zeros(0, np.int64)

    flat = iy * nx + ix
    order = np.argsort(flat, kind="stable")
    flat, pts, ix, iy = flat[order], pts[order], ix[order], iy[order]
    cells, starts, counts = np.unique(flat, return_index=True, return_counts=True)

    z_mid = 0.5 * (grid.z_range[0] + grid.z_range[1])
    z_half = 0.5 * (grid.z_range[1] - grid.z_range[0])
    local = np.stack([
        (pts[:, 0] - grid.x_range[0]) / grid.cell - (ix + 0.5),
        (pts[:, 1] - grid.y_range[0]) / grid.cell - (iy + 0.5),
        (pts[:, 2] - z_mid) / z_half,
    ], axis=1)
    mean_in = np.concatenate([local, pts[:, list(spec.mean_columns)] * np.asarray(spec.mean_scales)], axis=1)
    means = np.add.reduceat(mean_in, starts, axis=0) / counts[:, None]
    maxes = np.maximum.reduceat(pts[:, list(spec.max_columns)] * np.asarray(spec.max_scales), starts, axis=0)
    feats = np.concatenate([means, maxes, np.log1p(counts)[:, None]], axis=1)
    return feats.astype(np.float32), cells.astype(np.int64)


def batch_pillars(per_sample: list[tuple[np.ndarray, np.ndarray]], grid: BEVGrid) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-sample pillars, offsetting coordinates by ``b*ny*nx``."""
    cells = grid.ny * grid.nx
    feats = [f for f, _ in per_sample]
    coords = [c + b * cells for b, (_, c) in enumerate(per_sample)]
    width = feats[0].shape[1] if feats else 0
    return (np.concatenate(feats) if feats else np.zeros((0, width), np.float32),
            np.concatenate(coords) if coords else np.zeros(0, np.int64))


def scatter_to_bev(values: torch.Tensor, coords: torch.Tensor, batch: int | torch.SymInt, ny: int, nx: int) -> torch.Tensor:
    """(P, C) per-pillar values -> dense (B, C, ny, nx), zeros where no pillar."""
    c = values.shape[1]
    dense = values.new_zeros((batch * ny * nx, c)).index_copy(0, coords, values)
    return dense.view(batch, ny, nx, c).permute(0, 3, 1, 2)


def radar_intensity_map(pillars: torch.Tensor, coords: torch.Tensor, batch, ny: int, nx: int) -> torch.Tensor:
    """I_R: RCS-weighted occupancy in [0, 1], (B, 1, ny, nx).

    count * linear mean RCS is the cell's total reflected power proxy; 1 - exp(-w / ref)
    saturates it into [0, 1]. Computed from pillar features inside the network so that
    it is part of the exported graph."""
    count = torch.expm1(pillars[:, RADAR_SPEC.index("log_count")])
    rcs_db = (pillars[:, RADAR_SPEC.index("rcs_mean")] / RADAR_SPEC.mean_scales[0]).clamp(-40.0, 40.0)
    power = count * torch.pow(10.0, rcs_db / 10.0)
    value = 1.0 - torch.exp(-power / RADAR_RCS_REF_M2)
    return scatter_to_bev(value[:, None], coords, batch, ny, nx)


def lidar_intensity_map(pillars: torch.Tensor, coords: torch.Tensor, batch, ny: int, nx: int,
                        z_range: tuple[float, float] | None = None) -> torch.Tensor:
    """I_L: mean return intensity times occupancy, normalised per sample to [0, 1], (B, 1, ny, nx).

    With ``z_range`` (the grid's), occupancy counts only structure above the road: a cell's
    weight ramps from 0 at a mean return height of 0.2 m to 1 at 0.5 m (ego frame, z = 0 on
    the ground). Without it, ground returns (asphalt, bright lane paint) hold most of the map."""
    value = pillars[:, LIDAR_SPEC.index("intensity_mean")]
    if z_range is not None:
        z_mid, z_half = 0.5 * (z_range[0] + z_range[1]), 0.5 * (z_range[1] - z_range[0])
        height = pillars[:, LIDAR_SPEC.index("dz")] * z_half + z_mid
        value = value * ((height - STRUCTURE_HEIGHT[0]) / (STRUCTURE_HEIGHT[1] - STRUCTURE_HEIGHT[0])).clamp(0.0, 1.0)
    dense = scatter_to_bev(value[:, None], coords, batch, ny, nx)
    peak = dense.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return dense / peak


def occupancy_map(coords: torch.Tensor, batch, ny: int, nx: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, ny, nx) 1 where a pillar exists."""
    ones = like.new_ones((coords.shape[0], 1))
    return scatter_to_bev(ones, coords, batch, ny, nx)


class PillarEncoder(nn.Module):
    """Per-pillar MLP -> scatter to the BEV grid -> two 3x3 convs that spread sparse returns.

    One class for radar (student) and LiDAR (teacher); only ``in_features`` differs."""

    def __init__(self, in_features: int, channels: int, grid: BEVGrid):
        super().__init__()
        self.ny, self.nx = grid.ny, grid.nx
        # no BatchNorm on pillars: a batch can hold zero radar pillars
        self.mlp = nn.Sequential(
            nn.Linear(in_features, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels), nn.ReLU(inplace=True)
        )
        self.spread = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def forward(self, pillars: torch.Tensor, coords: torch.Tensor, batch) -> torch.Tensor:
        bev = scatter_to_bev(self.mlp(pillars), coords, batch, self.ny, self.nx)
        return self.spread(bev)
