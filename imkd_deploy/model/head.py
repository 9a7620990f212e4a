"""CenterPoint-style head (one shared trunk, one branch per output) and its training targets.

Outputs per BEV cell (all maps (B, C, ny, nx)):
    heatmap (num_classes, logits) | offset (2: sub-cell x, y) | height (1: box centre z, m)
    dims (3: log w, l, h) | rot (2: sin, cos yaw) | vel (2: vx, vy m/s, ego frame)
Targets are built in numpy per sample (the dataset does it in the data pipeline), so the
loss only gathers regression maps at the ground-truth centre cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imkd_deploy.config import BEVGrid
from imkd_deploy.model.backbone import conv_bn_relu

HEAD_OUTPUTS: dict[str, int] = {"offset": 2, "height": 1, "dims": 3, "rot": 2, "vel": 2}
REG_CHANNELS = sum(HEAD_OUTPUTS.values())       # regression target layout follows HEAD_OUTPUTS' order
MAX_OBJECTS = 500                               # nuScenes allows 500 boxes a sample; same cap here
MIN_RADIUS = 2                                  # CenterPoint's floor on the Gaussian radius (cells)
HEATMAP_PRIOR = 0.1                             # initial foreground probability (focal-loss init)


class CenterHead(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.shared = conv_bn_relu(in_channels, channels, 3)
        outs = {"heatmap": num_classes, **HEAD_OUTPUTS}
        self.branches = nn.ModuleDict({
            name: nn.Sequential(conv_bn_relu(channels, channels, 3), nn.Conv2d(channels, c, 1)) for name, c in outs.items()
        })
        # start with a low foreground probability so the focal loss does not explode at step 0
        nn.init.constant_(self.branches["heatmap"][-1].bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(x)
        return {name: branch(x) for name, branch in self.branches.items()}


# --------------------------------------------------------------------------- targets
@dataclass
class HeadTargets:
    heatmap: np.ndarray     # (K, ny, nx) float32 Gaussian peaks, 1 at centre cells
    index: np.ndarray       # (MAX_OBJECTS,) int64 flat centre cell iy*nx + ix
    mask: np.ndarray        # (MAX_OBJECTS,) float32 1 for real objects
    reg: np.ndarray         # (MAX_OBJECTS, REG_CHANNELS) float32 regression targets
    labels: np.ndarray      # (MAX_OBJECTS,) int64 class index (-1 padding)


def gaussian_radius(length: np.ndarray, width: np.ndarray, min_overlap: float = 0.1) -> np.ndarray:
    """CornerNet/CenterPoint radius (in cells) so a box shifted by it keeps ``min_overlap`` IoU.

    Vectorised over boxes; the three quadratic cases of the original, smallest root wins."""
    h, w = length, width
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + np.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + np.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return np.minimum(np.minimum(r1, r2), r3)


def draw_gaussians(heatmap: np.ndarray, labels: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray) -> None:
    """Max-splat one Gaussian per object into ``heatmap`` (K, ny, nx) in place, all at once."""
    if len(labels) == 0:
        return
    _, ny, nx = heatmap.shape
    r_max = int(radius.max())
    off = np.arange(-r_max, r_max + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    dx, dy = dx.ravel()[None, :], dy.ravel()[None, :]                # (1, W)
    sigma = (2 * radius[:, None] + 1) / 6.0                            # CenterNet: diameter / 6
    val = np.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    x, y = cx[:, None] + dx, cy[:, None] + dy
    ok = (np.abs(dx) <= radius[:, None]) & (np.abs(dy) <= radius[:, None]) & (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
    lab = np.broadcast_to(labels[:, None], ok.shape)
    np.maximum.at(heatmap, (lab[ok], y[ok], x[ok]), val[ok].astype(heatmap.dtype))


def build_targets(boxes: np.ndarray, labels: np.ndarray, grid: BEVGrid, num_classes: int) -> HeadTargets:
    """Ego-frame boxes (G, 9) x y z w l h yaw vx vy -> heatmap + regression targets.

    Boxes whose centre falls outside the grid are dropped (they cannot be predicted)."""
    nx, ny, cell = grid.nx, grid.ny, grid.cell
    boxes = np.asarray(boxes, np.float64).reshape(-1, 9)
    labels = np.asarray(labels, np.int64).reshape(-1)
    fx = (boxes[:, 0] - grid.x_range[0]) / cell
    fy = (boxes[:, 1] - grid.y_range[0]) / cell
    ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    keep = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    boxes, labels, fx, fy, ix, iy = boxes[keep][:MAX_OBJECTS], labels[keep][:MAX_OBJECTS], fx[keep][:MAX_OBJECTS], fy[keep][:MAX_OBJECTS], ix[keep][:MAX_OBJECTS], iy[keep][:MAX_OBJECTS]
    g = len(boxes)

    heatmap = np.zeros((num_classes, ny, nx), np.float32)
    radius = np.maximum(MIN_RADIUS, np.floor(gaussian_radius(boxes[:, 4] / cell, boxes[:, 3] / cell))).astype(np.int64)
    draw_gaussians(heatmap, labels, ix, iy, radius)

    reg = np.zeros((MAX_OBJECTS, REG_CHANNELS), np.float32)
    reg[:g] = np.concatenate([
        (fx - ix)[:, None], (fy - iy)[:, None],               # offset
        boxes[:, 2:3],                                        # height
        np.log(np.maximum(boxes[:, 3:6], 1e-3)),              # dims
        np.sin(boxes[:, 6:7]), np.cos(boxes[:, 6:7]),         # rot
        boxes[:, 7:9],                                        # vel
    ], axis=1)
    index = np.zeros(MAX_OBJECTS, np.int64)
    index[:g] = iy * nx + ix
    mask = np.zeros(MAX_OBJECTS, np.float32)
    mask[:g] = 1.0
    lab = np.full(MAX_OBJECTS, -1, np.int64)
    lab[:g] = labels
    return HeadTargets(heatmap, index, mask, reg, lab)
