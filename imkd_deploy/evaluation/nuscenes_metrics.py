"""nuScenes detection metrics through the devkit's ``DetectionEval`` (detection_cvpr_2019).

The devkit's own matching, AP and TP-error code does the scoring; this wrapper only replaces
its front door, whose traps otherwise end in assertion tracebacks:
- a results file that is not JSON, or lacks ``results`` -> UserError naming the file;
- samples of the split missing from the submission -> UserError (how many, one example);
  results for samples outside the split are dropped with a warning;
- a split that does not match the version (mini_val on trainval) -> UserError;
- a submission with zero boxes -> the devkit's own all-zero metrics (its box filter would
  crash on "Invalid box type: None");
- split names from ``<version>/splits.json`` that collide with a devkit name ("val" on a
  custom version) are scored on the custom split's samples, not rejected.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from imkd_deploy.atomic import atomic_write_json
from imkd_deploy.data.loader import open_nuscenes, split_sample_tokens
from imkd_deploy.errors import UserError

log = logging.getLogger(__name__)

MAX_BOXES_PER_SAMPLE = 500
TP_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}


def read_submission(results_json: Path) -> dict:
    """Parse a submission file; anything that is not a submission is a UserError naming it."""
    results_json = Path(results_json)
    try:
        data = json.loads(results_json.read_text())
    except FileNotFoundError:
        raise UserError(f"results file {results_json} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"results file {results_json} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f"results file {results_json} is not a nuScenes submission: "
                        "expected {\"meta\": {...}, \"results\": {sample_token: [box, ...]}}")
    return data


def _prediction_boxes(results: dict, tokens: list[str], source: Path):
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.data_classes import DetectionBox

    boxes = EvalBoxes()
    for token in tokens:
        entries = results[token]
        if not isinstance(entries, list):
            raise UserError(f"{source}: results['{token}'] must be a list of boxes")
        if len(entries) > MAX_BOXES_PER_SAMPLE:
            raise UserError(f"{source}: sample {token} has {len(entries)} boxes; nuScenes allows at most "
                            f"{MAX_BOXES_PER_SAMPLE} a sample (keep the top-scoring ones)")
        try:
            boxes.add_boxes(token, [DetectionBox.deserialize(b) for b in entries])
        except KeyError as exc:
            raise UserError(f"{source}: a box of sample {token} lacks field {exc}") from None
        except (AssertionError, TypeError, ValueError) as exc:
            raise UserError(f"{source}: a box of sample {token} is invalid: {exc}") from None
    return boxes


def _has_boxes(boxes) -> bool:
    return any(len(b) for b in boxes.boxes.values())


def evaluate_submission(results_json: Path, dataroot, version, split, out_dir=None, plots=False,
                        verbose=False, scenes: list[str] | None = None) -> dict:
    """Score a submission on a split (or on some of its ``scenes``, e.g. its night scenes).
    Returns the devkit's metrics summary plus ``eval_seconds``.

    Writes metrics_summary.json and metrics_details.json (atomically) into ``out_dir``,
    default ``<results stem>_eval/`` beside the results file; ``plots`` adds the devkit's
    PR/TP curves under ``out_dir/plots`` (slow).
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt_of_sample_tokens
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.evaluate import DetectionEval

    start = time.perf_counter()
    results_json = Path(results_json)
    submission = read_submission(results_json)
    nusc = open_nuscenes(dataroot, version)
    tokens = split_sample_tokens(nusc, dataroot, version, split, scenes)
    results = submission["results"]
    missing = [t for t in tokens if t not in results]
    if missing:
        raise UserError(f"{results_json}: {len(missing)} of the {len(tokens)} samples of split '{split}' "
                        f"are missing from the results (e.g. {missing[0]}); list every sample, with [] "
                        "where nothing was detected")
    extra = len(results) - len(tokens)
    if extra > 0 and scenes is None:
        log.warning("%s: ignoring results for %d samples outside split '%s'", results_json, extra, split)

    out_dir = Path(out_dir) if out_dir is not None else results_json.parent / f"{results_json.stem}_eval"
    cfg = config_factory("detection_cvpr_2019")
    # DetectionEval.__init__ would re-read the file and assert; build the same state with the
    # devkit's own loaders, then run its evaluate()/render() unchanged.
    ev = DetectionEval.__new__(DetectionEval)
    ev.nusc, ev.cfg, ev.result_path, ev.eval_set = nusc, cfg, str(results_json), split
    ev.output_dir, ev.plot_dir, ev.verbose = str(out_dir), str(out_dir / "plots"), verbose
    ev.meta = submission.get("meta", {})
    ev.pred_boxes = _prediction_boxes(results, tokens, results_json)
    # The devkit draws a tqdm bar here even when not verbose.
    with contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO()):
        ev.gt_boxes = load_gt_of_sample_tokens(nusc, tokens, DetectionBox, verbose=verbose)
    for name in ("pred_boxes", "gt_boxes"):
        boxes = add_center_dist(nusc, getattr(ev, name))
        # filter_eval_boxes cannot tell the box type of an empty set and raises.
        setattr(ev, name, filter_eval_boxes(nusc, boxes, cfg.class_range, verbose=verbose) if _has_boxes(boxes)
                else boxes)
    ev.sample_tokens = ev.gt_boxes.sample_tokens
    num_pred = len(ev.pred_boxes.all)
    if not num_pred:
        log.warning("%s: the submission has no boxes in range on split '%s'; every metric is zero",
                    results_json, split)

    metrics, metric_data = ev.evaluate()
    summary = metrics.serialize()
    summary["meta"] = dict(ev.meta)
    summary["eval_seconds"] = time.perf_counter() - start
    summary["split"], summary["version"] = split, version
    if scenes is not None:
        summary["scenes"] = list(scenes)
    summary["num_samples"], summary["num_pred_boxes"], summary["num_gt_boxes"] = (
        len(tokens), num_pred, len(ev.gt_boxes.all))
    atomic_write_json(out_dir / "metrics_summary.json", summary, indent=2)
    atomic_write_json(out_dir / "metrics_details.json", metric_data.serialize(), indent=2)
    if plots:
        os.makedirs(ev.plot_dir, exist_ok=True)
        ev.render(metrics, metric_data)
    return summary


def print_metrics(metrics: dict, console) -> None:
    """The devkit's familiar block: mAP, the TP errors, NDS, eval time, then the per-class table."""
    lines = [f"mAP: {metrics['mean_ap']:.4f}"]
    lines += [f"{TP_NAMES[k]}: {v:.4f}" for k, v in metrics["tp_errors"].items()]
    lines += [f"NDS: {metrics['nd_score']:.4f}", f"Eval time: {metrics['eval_time']:.1f}s", "",
              "Per-class results:",
              "%-20s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s" % ("Object Class", "AP", "ATE", "ASE", "AOE", "AVE", "AAE")]
    tps = metrics["label_tp_errors"]
    for name, ap in metrics["mean_dist_aps"].items():
        t = tps[name]
        lines.append("%-20s\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f" % (
            name, ap, t["trans_err"], t["scale_err"], t["orient_err"], t["vel_err"], t["attr_err"]))
    console.print("\n".join(lines), markup=False, highlight=False)


_MOVING_ATTR = {"car": ("vehicle.moving", "vehicle.parked"), "truck": ("vehicle.moving", "vehicle.parked"),
                "bus": ("vehicle.moving", "vehicle.parked"), "trailer": ("vehicle.moving", "vehicle.parked"),
                "construction_vehicle": ("vehicle.moving", "vehicle.parked"),
                "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
                "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
                "bicycle": ("cycle.with_rider", "cycle.without_rider")}
MOVING_SPEED = 0.2   # m/s; the usual CenterPoint/mmdet3d rule for picking an attribute from velocity


def ego_boxes_to_submission(sample_token: str, ego2global: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                            scores: np.ndarray) -> list[dict]:
    """Ego-frame boxes (N, 9) x, y, z, w, l, h, yaw, vx, vy (frame.py layout) -> submission boxes.

    Boxes go to the GLOBAL frame through the key ego pose; the attribute is chosen from the
    speed (moving/parked, with/without rider, moving/standing), none for cones and barriers.
    """
    from imkd_deploy.config import CLASS_NAMES
    from imkd_deploy.data.loader import quat_to_matrix, yaw_to_quat

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    rot, trans = ego2global[:3, :3], ego2global[:3, 3]
    centres = boxes[:, :3] @ rot.T + trans
    # Rotate the box frame, then read the quaternion back: exact for the ego pose's full 3D rotation.
    box_rot = rot[None] @ quat_to_matrix(yaw_to_quat(boxes[:, 6]))
    quats = _matrix_to_quat(box_rot)
    vel = np.concatenate([boxes[:, 7:9], np.zeros((len(boxes), 1))], axis=1) @ rot.T
    speed = np.linalg.norm(boxes[:, 7:9], axis=1)
    out = []
    for i in range(len(boxes)):
        name = CLASS_NAMES[int(labels[i])]
        attrs = _MOVING_ATTR.get(name)
        out.append({
            "sample_token": sample_token, "translation": centres[i].tolist(), "size": boxes[i, 3:6].tolist(),
            "rotation": quats[i].tolist(), "velocity": vel[i, :2].tolist(), "detection_name": name,
            "detection_score": float(scores[i]),
            "attribute_name": "" if attrs is None else attrs[0 if speed[i] > MOVING_SPEED else 1],
        })
    return out


def _matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) -> quaternions (N, 4) w, x, y, z (Shepperd's method, w >= 0)."""
    m = np.asarray(m, dtype=np.float64)
    tr = np.trace(m, axis1=1, axis2=2)
    cand = np.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], axis=1)
    pick = np.argmax(cand, axis=1)
    q = np.empty((len(m), 4))
    for k in range(4):  # four branches, each vectorised over the boxes that need it
        sel = pick == k
        if not sel.any():
            continue
        r = m[sel]
        if k == 0:
            s = np.sqrt(1.0 + tr[sel]) * 2
            q[sel] = np.stack([s / 4, (r[:, 2, 1] - r[:, 1, 2]) / s, (r[:, 0, 2] - r[:, 2, 0]) / s,
                               (r[:, 1, 0] - r[:, 0, 1]) / s], 1)
        elif k == 1:
            s = np.sqrt(1.0 + r[:, 0, 0] - r[:, 1, 1] - r[:, 2, 2]) * 2
            q[sel] = np.stack([(r[:, 2, 1] - r[:, 1, 2]) / s, s / 4, (r[:, 0, 1] + r[:, 1, 0]) / s,
                               (r[:, 0, 2] + r[:, 2, 0]) / s], 1)
        elif k == 2:
            s = np.sqrt(1.0 + r[:, 1, 1] - r[:, 0, 0] - r[:, 2, 2]) * 2
            q[sel] = np.stack([(r[:, 0, 2] - r[:, 2, 0]) / s, (r[:, 0, 1] + r[:, 1, 0]) / s, s / 4,
                               (r[:, 1, 2] + r[:, 2, 1]) / s], 1)
        else:
            s = np.sqrt(1.0 + r[:, 2, 2] - r[:, 0, 0] - r[:, 1, 1]) * 2
            q[sel] = np.stack([(r[:, 1, 0] - r[:, 0, 1]) / s, (r[:, 0, 2] + r[:, 2, 0]) / s,
                               (r[:, 1, 2] + r[:, 2, 1]) / s, s / 4], 1)
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def gt_submission(dataroot, version, split) -> dict:
    """The split's ground truth as a submission (score 1): a perfect detector, for sanity checks.

    Boxes with no LiDAR or radar point are left out, since the devkit drops them from the GT
    (submitted, they would all be false positives). Velocities the devkit cannot estimate
    (one-frame tracks, NaN) are submitted as 0, since a submission must be finite.
    """
    nusc = open_nuscenes(dataroot, version)
    from nuscenes.eval.detection.utils import category_to_detection_name

    attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
    results: dict[str, list[dict]] = {}
    for token in split_sample_tokens(nusc, dataroot, version, split):
        boxes = []
        for ann_token in nusc.get("sample", token)["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue
            vel = np.nan_to_num(nusc.box_velocity(ann_token)[:2], nan=0.0)
            attrs = ann["attribute_tokens"]
            boxes.append({
                "sample_token": token, "translation": list(ann["translation"]), "size": list(ann["size"]),
                "rotation": list(ann["rotation"]), "velocity": [float(vel[0]), float(vel[1])],
                "detection_name": name, "detection_score": 1.0,
                "attribute_name": attribute_names[attrs[0]] if attrs else "",
            })
        results[token] = boxes
    meta = {"use_camera": False, "use_lidar": False, "use_radar": False, "use_map": False,
            "use_external": True}
    return {"meta": meta, "results": results}

