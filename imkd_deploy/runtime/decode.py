"""Head maps -> ego-frame boxes: 3x3 peak filter, top-k, box decode, class-aware circle NMS.

Backend-agnostic: takes the head's maps as numpy (torch tensors are converted), so the torch,
ONNX Runtime and TensorRT backends share one decode. Box layout is Frame's
(x, y, z, w, l, h, yaw, vx, vy) in the key ego frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imkd_deploy.config import CLASS_NAMES, BEVGrid

# Circle-NMS radius per class, metres. CenterPoint's nuScenes "min_radius" values are
# SQUARED-distance thresholds (4, 12, 10, 1, 0.85, 0.175 per task); these are their roots,
# so a pedestrian 0.42 m from a better one is a duplicate, a car 2 m away is.
NMS_RADIUS_M: dict[str, float] = {
    "car": 2.0, "truck": 3.46, "construction_vehicle": 3.46, "bus": 3.16, "trailer": 3.16,
    "barrier": 1.0, "motorcycle": 0.92, "bicycle": 0.92, "pedestrian": 0.42, "traffic_cone": 0.42,
}
HEAD_KEYS = ("heatmap", "offset", "height", "dims", "rot", "vel")


@dataclass
class Detections:
    boxes: np.ndarray    # (K, 9) float32 x y z w l h yaw vx vy, ego frame
    scores: np.ndarray   # (K,) float32, descending
    labels: np.ndarray   # (K,) int64 index into CLASS_NAMES

    def __len__(self) -> int:
        return len(self.scores)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # overflow-free form


def peak_filter(scores: np.ndarray) -> np.ndarray:
    """Zero every cell that is not the maximum of its 3x3 neighbourhood, (..., ny, nx)."""
    pad = np.pad(scores, [(0, 0)] * (scores.ndim - 2) + [(1, 1), (1, 1)], constant_values=-np.inf)
    ny, nx = scores.shape[-2:]
    local = np.max(np.stack([pad[..., dy:dy + ny, dx:dx + nx] for dy in range(3) for dx in range(3)]), axis=0)
    return np.where(scores >= local, scores, 0.0)


def circle_nms(xy: np.ndarray, scores: np.ndarray, labels: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Greedy class-aware NMS on BEV centres; returns kept indices, best score first.

    ``radius`` (num_classes,) metres: a box is dropped when a better box of its class lies
    within its class radius. The pairwise conflict matrix is built at once; the greedy pass
    only visits candidates that conflict with something."""
    order = np.argsort(-scores, kind="stable")
    xy, labels = xy[order], labels[order]
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    r = radius[labels]
    conflict = (labels[:, None] == labels[None, :]) & (d2 <= (r**2)[:, None])
    conflict = np.triu(conflict, k=1)            # only a better box suppresses a worse one
    removed = np.zeros(len(order), bool)
    for i in np.flatnonzero(conflict.any(axis=1)):
        if not removed[i]:
            removed |= conflict[i]
    return order[~removed]


def decode(outputs: dict, grid: BEVGrid, *, score_threshold: float = 0.1, topk: int = 500, max_boxes: int = 500,
           nms: bool = True, peak: bool = True) -> list[Detections]:
    """Head maps (B, C, ny, nx) -> one Detections per sample."""
    maps = {k: _numpy(outputs[k]) for k in HEAD_KEYS}
    heat = _sigmoid(maps["heatmap"])
    if peak:
        heat = peak_filter(heat)
    b, k, ny, nx = heat.shape
    flat = heat.reshape(b, -1)
    kk = min(topk, flat.shape[1])
    top = np.argpartition(-flat, kk - 1, axis=1)[:, :kk]                         # (B, kk) unordered
    radius = np.array([NMS_RADIUS_M[c] for c in CLASS_NAMES], np.float64)
    results = []
    for i in range(b):   # batch loop only; everything per box is vectorised
        idx = top[i]
        score = flat[i, idx]
        idx, score = idx[score > score_threshold], score[score > score_threshold]
        label, cell = np.divmod(idx, ny * nx)
        iy, ix = np.divmod(cell, nx)
        at = lambda name: maps[name][i][:, iy, ix].T                               # (n, C)  # noqa: E731
        off, height, dims, rot, vel = at("offset"), at("height"), at("dims"), at("rot"), at("vel")
        x = grid.x_range[0] + (ix + off[:, 0]) * grid.cell
        y = grid.y_range[0] + (iy + off[:, 1]) * grid.cell
        boxes = np.concatenate([
            x[:, None], y[:, None], height,
            np.exp(np.clip(dims, -5.0, 5.0)),
            np.arctan2(rot[:, 0], rot[:, 1])[:, None],
            vel,
        ], axis=1).astype(np.float32)
        keep = circle_nms(boxes[:, :2].astype(np.float64), score, label, radius) if nms else np.argsort(-score, kind="stable")
        keep = keep[:max_boxes]
        results.append(Detections(boxes[keep], score[keep].astype(np.float32), label[keep].astype(np.int64)))
    return results
