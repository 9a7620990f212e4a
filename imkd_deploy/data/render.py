"""`imkd data render`: one frame as a PNG, drawn from what the loader returns.

Everything is drawn from the ``Frame`` (images at half resolution, updated intrinsics,
camera->key-ego transforms, ego-frame boxes), so a misaligned box here is a loader bug,
not a plotting one: the picture doubles as a visual check of the geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imkd_deploy.atomic import atomic_path
from imkd_deploy.config import CLASS_NAMES, ModelConfig
from imkd_deploy.data.frame import Frame
from imkd_deploy.data.loader import NuScenesDrive, box_corners, invert_rigid, open_nuscenes
from imkd_deploy.errors import UserError

# Camera panels in the rig's physical layout (front row, back row), as the devkit draws them.
_LAYOUT = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4],
                   [0, 4], [1, 5], [2, 6], [3, 7]])
_BEV_RANGE_M = 55.0
_RENDER_WIDTH = 800


# One colour per class in CLASS_NAMES order; pure red is kept for radar returns.
_CLASS_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#9467bd",
                 "#17becf", "#e377c2", "#bcbd22", "#ffbf00", "#7f7f7f")
_RADAR_COLOR = "#ff0000"


def _class_colors() -> np.ndarray:
    from matplotlib.colors import to_rgba_array

    return to_rgba_array(_CLASS_COLORS)


def _render_config(nusc, sample_token: str) -> ModelConfig:
    """Full-aspect images (no crop), at most _RENDER_WIDTH wide."""
    sample = nusc.get("sample", sample_token)
    sd = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
    w, h = int(sd.get("width") or 1600), int(sd.get("height") or 900)
    out_w = min(w, _RENDER_WIDTH)
    out_h = int(round(h * out_w / w))
    return ModelConfig(image_size=(out_h, out_w), downsample=1, radar_sweeps=3, lidar_sweeps=1)


def project_boxes(frame: Frame, cam: int, min_depth: float = 0.5, boxes: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Box edges (GT unless ``boxes`` is given) in camera ``cam``'s pixels, boxes fully in
    front only: (B, 12, 2, 2) and box indices."""
    boxes = frame.gt_boxes if boxes is None else boxes
    corners = box_corners(boxes[:, :7]) if len(boxes) else np.zeros((0, 8, 3))
    ego2cam = invert_rigid(frame.cam2ego[cam])
    xyz = corners @ ego2cam[:3, :3].T + ego2cam[:3, 3]
    front = (xyz[..., 2] > min_depth).all(axis=1)
    xyz = xyz[front]
    uvw = xyz @ frame.intrinsics[cam].T
    uv = uvw[..., :2] / uvw[..., 2:3]
    return uv[:, _EDGES], np.nonzero(front)[0]


def _draw_camera(ax, frame: Frame, cam: int, colors: np.ndarray, pred=None) -> None:
    from matplotlib.collections import LineCollection

    img = frame.images[cam]
    ax.imshow(img)
    # GT solid; with predictions, GT thin dashed and predictions solid
    layers = [(frame.gt_boxes, frame.gt_labels, "--" if pred is not None else "-", 0.7 if pred is not None else 1.0)]
    if pred is not None:
        layers.append((pred[0], pred[1], "-", 1.4))
    for boxes, labels, style, width in layers:
        segments, box_idx = project_boxes(frame, cam, boxes=boxes)
        if len(segments):
            edge_colors = np.repeat(colors[labels[box_idx]], len(_EDGES), axis=0)
            ax.add_collection(LineCollection(segments.reshape(-1, 2, 2), colors=edge_colors, linewidths=width,
                                             linestyles=style))
    ax.set_xlim(0, img.shape[1])
    ax.set_ylim(img.shape[0], 0)
    ax.set_title(frame.camera_channels[cam], fontsize=9)
    ax.axis("off")


def _draw_bev_boxes(ax, boxes: np.ndarray, labels: np.ndarray, colors: np.ndarray, style: str = "-",
                    width: float = 1.0) -> None:
    from matplotlib.collections import LineCollection

    bottom = box_corners(boxes[:, :7])[:, :4, :2]
    outline = np.stack([bottom, np.roll(bottom, -1, axis=1)], axis=2).reshape(-1, 2, 2)
    box_colors = colors[labels]
    ax.add_collection(LineCollection(outline, colors=np.repeat(box_colors, 4, axis=0), linewidths=width,
                                     linestyles=style))
    front = bottom[:, [0, 1]].mean(axis=1)
    ax.add_collection(LineCollection(np.stack([boxes[:, :2], front], 1), colors=box_colors, linewidths=width))
    ax.quiver(boxes[:, 0], boxes[:, 1], boxes[:, 7], boxes[:, 8], color=box_colors, angles="xy",
              scale_units="xy", scale=1.0, width=0.003)


def _draw_bev(ax, frame: Frame, colors: np.ndarray, pred=None) -> None:

    if frame.lidar_points is not None and len(frame.lidar_points):
        lp = frame.lidar_points
        ax.scatter(lp[:, 0], lp[:, 1], c=np.clip(lp[:, 3], 0, 100), cmap="Greys", vmin=-60, vmax=100,
                   s=0.6, linewidths=0, rasterized=True)
    rp = frame.radar_points
    if len(rp):
        ax.scatter(rp[:, 0], rp[:, 1], c=_RADAR_COLOR, s=6, linewidths=0, zorder=3)
        ax.quiver(rp[:, 0], rp[:, 1], rp[:, 4], rp[:, 5], color=_RADAR_COLOR, angles="xy", scale_units="xy",
                  scale=1.0, width=0.002, zorder=3)
    if len(frame.gt_boxes):   # heading drawn from the centre to the middle of the front face
        _draw_bev_boxes(ax, frame.gt_boxes, frame.gt_labels, colors, "--" if pred is not None else "-",
                        0.7 if pred is not None else 1.0)
    if pred is not None and len(pred[0]):
        _draw_bev_boxes(ax, pred[0], pred[1], colors, "-", 1.4)
    ax.plot([0], [0], marker=(3, 0, -90), color="black", markersize=8)
    ax.set_xlim(-_BEV_RANGE_M, _BEV_RANGE_M)
    ax.set_ylim(-_BEV_RANGE_M, _BEV_RANGE_M)
    ax.set_aspect("equal")
    ax.set_title("BEV (ego frame, x forward): LiDAR, radar + v_comp, "
                 + ("GT dashed, detections solid" if pred is not None else "GT + velocity"), fontsize=9)
    ax.tick_params(labelsize=7)


def render_detections(frame: Frame, detections, out_png: Path, title: str = "") -> Path:
    """A frame with a model's detections (``runtime.decode.Detections``) over its GT."""
    return render_frame(frame, out_png, title, pred=(np.asarray(detections.boxes), np.asarray(detections.labels)))


def render_frame(frame: Frame, out_png: Path, title: str = "", pred=None) -> Path:
    """Draw a loaded frame: 6 cameras with GT boxes (and ``pred`` = (boxes, labels) if given)
    and a BEV panel; atomic PNG write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = _class_colors()
    fig = plt.figure(figsize=(22, 7.2), dpi=100)
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1.05], wspace=0.03, hspace=0.08)
    order = [frame.camera_channels.index(c) for c in _LAYOUT if c in frame.camera_channels]
    for slot, cam in enumerate(order):
        _draw_camera(fig.add_subplot(grid[slot // 3, slot % 3]), frame, cam, colors, pred)
    bev = fig.add_subplot(grid[:, 3])
    _draw_bev(bev, frame, colors, pred)
    present = sorted(set(frame.gt_labels.tolist()) | (set(pred[1].tolist()) if pred is not None else set()))
    bev.legend(handles=[Line2D([], [], color=colors[i], label=CLASS_NAMES[i]) for i in present],
               fontsize=7, loc="lower left", ncol=2)
    text = title or f"{frame.scene_name}  sample {frame.sample_token}"
    if frame.degraded:
        text += f"  DEGRADED: {'; '.join(frame.degraded)[:200]}"
    fig.suptitle(text, fontsize=10, color="darkred" if frame.degraded else "black")

    out_png = Path(out_png)
    try:
        with atomic_path(out_png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out_png


def render_sample(dataroot, version, out_png: Path, sample_token=None, index=0) -> Path:
    """Render one sample (by token, else by index over all samples in scene order) to a PNG."""
    nusc = open_nuscenes(dataroot, version)
    probe = sample_token or nusc.scene[0]["first_sample_token"]
    try:
        cfg = _render_config(nusc, probe)
    except KeyError:
        raise UserError(f"sample token '{probe}' is not in {Path(dataroot) / version}") from None
    drive = NuScenesDrive(dataroot, version, cfg, load_lidar=True)
    if sample_token is None:
        if not -len(drive) <= index < len(drive):
            raise UserError(f"--index {index} is out of range: the drive has {len(drive)} samples")
        sample_token = drive.sample_tokens[index]
    return render_frame(drive.frame(sample_token), out_png)
