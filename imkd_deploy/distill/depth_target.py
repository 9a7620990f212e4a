"""LiDAR -> image depth targets for the student's depth net (training only).

Each LiDAR point is projected into every camera with the NETWORK-pixel intrinsics (the same
convention as ops.bev_pool.compute_geometry), assigned to the feature cell that covers its
pixel, and each feature cell takes the NEAREST point's depth (the visible surface; BEVDepth
does the same). The depth is camera-frame z, binned like the view transform's bins.
"""

from __future__ import annotations

import numpy as np

from imkd_deploy.config import ModelConfig

IGNORE = -1   # feature cells without a LiDAR return in range


def depth_bin_targets(lidar_xyz: np.ndarray, intrinsics: np.ndarray, cam2ego: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """(K, 3) ego-frame points -> (N, fH, fW) int64 depth-bin index, IGNORE where no point."""
    n = intrinsics.shape[0]
    fh, fw = cfg.feature_size
    h, w = cfg.image_size
    lo, _, step = cfg.depth_bins
    d = cfg.num_depth_bins
    target = np.full(n * fh * fw, IGNORE, np.int64)
    pts = np.asarray(lidar_xyz, np.float64)[:, :3]
    if len(pts) == 0:
        return target.reshape(n, fh, fw)

    ego2cam = np.linalg.inv(np.asarray(cam2ego, np.float64))                     # (N, 4, 4)
    cam = np.einsum("nij,kj->nki", ego2cam[:, :3, :3], pts) + ego2cam[:, None, :3, 3]   # (N, K, 3)
    z = cam[..., 2]
    pix = np.einsum("nij,nkj->nki", np.asarray(intrinsics, np.float64), cam)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = pix[..., 0] / z
        v = pix[..., 1] / z
    # pixel centres are integer coordinates, so pixel p covers [p - 0.5, p + 0.5)
    col = np.floor((u + 0.5) / cfg.downsample)
    row = np.floor((v + 0.5) / cfg.downsample)
    ok = (z >= lo) & (z < lo + d * step) & (u >= -0.5) & (u < w - 0.5) & (v >= -0.5) & (v < h - 0.5)
    ok &= (col >= 0) & (col < fw) & (row >= 0) & (row < fh)
    cam_idx = np.broadcast_to(np.arange(n)[:, None], z.shape)
    flat = (cam_idx[ok] * fh + row[ok].astype(np.int64)) * fw + col[ok].astype(np.int64)
    zs = z[ok]
    if len(zs) == 0:
        return target.reshape(n, fh, fw)
    # nearest return per cell: sort by (cell, depth), keep each cell's first entry
    order = np.lexsort((zs, flat))
    flat, zs = flat[order], zs[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    bins = np.minimum(np.floor((zs[first] - lo) / step).astype(np.int64), d - 1)
    target[flat[first]] = bins
    return target.reshape(n, fh, fw)
