"""Decode recovers planted boxes; circle NMS drops duplicates; boxes reach the global frame."""

from __future__ import annotations

import numpy as np
import pytest

from imkd_deploy.config import CLASS_NAMES, BEVGrid
from imkd_deploy.runtime.boxes import attribute_names, boxes_to_global, submission_entries, write_submission
from imkd_deploy.runtime.decode import Detections, circle_nms, decode

GRID = BEVGrid((-16.0, 16.0), (-12.0, 12.0), (-5.0, 3.0), 0.5)   # nx 64, ny 48: x and y axes distinguishable


def _plant(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict:
    """Head maps (1, C, ny, nx) whose peaks encode ``boxes`` exactly."""
    ny, nx = GRID.ny, GRID.nx
    maps = {k: np.zeros((1, c, ny, nx), np.float32) for k, c in
            (("heatmap", 10), ("offset", 2), ("height", 1), ("dims", 3), ("rot", 2), ("vel", 2))}
    maps["heatmap"][:] = -10.0
    fx, fy = (boxes[:, 0] - GRID.x_range[0]) / GRID.cell, (boxes[:, 1] - GRID.y_range[0]) / GRID.cell
    ix, iy = np.floor(fx).astype(int), np.floor(fy).astype(int)
    maps["heatmap"][0, labels, iy, ix] = np.log(scores / (1 - scores))
    maps["offset"][0, :, iy, ix] = np.stack([fx - ix, fy - iy], 1)
    maps["height"][0, :, iy, ix] = boxes[:, 2:3]
    maps["dims"][0, :, iy, ix] = np.log(boxes[:, 3:6])
    maps["rot"][0, :, iy, ix] = np.stack([np.sin(boxes[:, 6]), np.cos(boxes[:, 6])], 1)
    maps["vel"][0, :, iy, ix] = boxes[:, 7:9]
    return maps


def test_decode_recovers_planted_boxes():
    boxes = np.array([
        [10.3, -4.7, 0.8, 1.9, 4.6, 1.7, 0.4, 5.0, -1.0],      # car
        [-7.9, 8.2, -0.2, 0.7, 0.8, 1.8, -2.9, 0.3, 0.6],      # pedestrian
        [3.1, 3.3, 0.0, 2.9, 11.0, 3.5, 1.6, 0.0, 0.0],        # bus
        [-15.8, -11.9, 0.1, 0.5, 0.5, 1.0, 3.0, 0.0, 0.0],     # traffic cone in the corner cell
    ], np.float32)
    labels = np.array([0, 5, 2, 8])
    scores = np.array([0.9, 0.6, 0.8, 0.3])
    (det,) = decode(_plant(boxes, labels, scores), GRID, score_threshold=0.1)
    order = np.argsort(-scores)
    assert len(det) == 4
    np.testing.assert_array_equal(det.labels, labels[order])
    np.testing.assert_allclose(det.scores, scores[order], rtol=1e-5)
    np.testing.assert_allclose(det.boxes[:, :6], boxes[order, :6], atol=1e-4)
    np.testing.assert_allclose(det.boxes[:, 7:9], boxes[order, 7:9], atol=1e-5)
    # yaw comes back wrapped to (-pi, pi]
    np.testing.assert_allclose(np.cos(det.boxes[:, 6] - boxes[order, 6]), 1.0, atol=1e-6)


def test_decode_threshold_topk_and_batch():
    boxes = np.array([[0.2, 0.2, 0, 1, 1, 1, 0, 0, 0], [8.0, 5.0, 0, 1, 1, 1, 0, 0, 0]], np.float32)
    maps = _plant(boxes, np.array([0, 1]), np.array([0.9, 0.05]))
    batched = {k: np.concatenate([v, v]) for k, v in maps.items()}
    dets = decode(batched, GRID, score_threshold=0.1)
    assert [len(d) for d in dets] == [1, 1]
    assert len(decode(maps, GRID, score_threshold=0.01)[0]) == 2
    assert len(decode(maps, GRID, score_threshold=0.01, topk=1)[0]) == 1


def test_circle_nms_suppresses_same_class_duplicates_only():
    xy = np.array([[0.0, 0.0], [1.0, 0.5], [0.3, 0.0], [10.0, 0.0], [0.2, 0.1]])
    scores = np.array([0.5, 0.9, 0.4, 0.8, 0.7])
    labels = np.array([0, 0, 5, 0, 0])                 # 3rd is a pedestrian on top of the cars
    radius = np.full(10, 2.0)
    keep = circle_nms(xy, scores, labels, radius)
    # box 1 (best car) removes cars 0 and 4 within 2 m; the pedestrian and the far car stay
    assert keep.tolist() == [1, 3, 2]
    # greedy, not "any better box": a suppressed box does not suppress others
    chain = circle_nms(np.array([[0.0, 0.0], [1.5, 0.0], [3.0, 0.0]]), np.array([0.9, 0.8, 0.7]), np.zeros(3, int), radius)
    assert chain.tolist() == [0, 2]


def test_decode_nms_removes_adjacent_peak():
    boxes = np.array([[2.0, 2.0, 0, 2, 4.5, 1.6, 0, 0, 0], [3.2, 2.2, 0, 2, 4.5, 1.6, 0, 0, 0]], np.float32)
    maps = _plant(boxes, np.array([0, 0]), np.array([0.9, 0.7]))
    assert len(decode(maps, GRID, nms=False)[0]) == 2
    (det,) = decode(maps, GRID)
    assert len(det) == 1 and det.boxes[0, 0] == pytest.approx(2.0, abs=1e-5)


def test_boxes_to_global_rotates_position_yaw_and_velocity(tmp_path):
    yaw0 = np.pi / 2
    ego2global = np.eye(4)
    ego2global[:3, :3] = [[np.cos(yaw0), -np.sin(yaw0), 0], [np.sin(yaw0), np.cos(yaw0), 0], [0, 0, 1]]
    ego2global[:3, 3] = [100.0, 200.0, 1.0]
    boxes = np.array([[10.0, 0.0, 0.5, 2, 4, 1.5, 0.0, 3.0, 0.0]])
    trans, quat, vel = boxes_to_global(boxes, ego2global)
    np.testing.assert_allclose(trans[0], [100.0, 210.0, 1.5], atol=1e-9)
    np.testing.assert_allclose(quat[0], [np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)], atol=1e-9)
    np.testing.assert_allclose(vel[0], [0.0, 3.0], atol=1e-9)

    labels = np.array([CLASS_NAMES.index(c) for c in ("car", "car", "pedestrian", "bicycle", "barrier")])
    speeds = np.array([[3.0, 0.0], [0.05, 0.0], [1.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    assert attribute_names(labels, speeds) == ["vehicle.moving", "vehicle.parked", "pedestrian.moving",
                                               "cycle.without_rider", ""]

    det = Detections(boxes.astype(np.float32), np.array([0.7], np.float32), np.array([0]))
    entries = submission_entries("tok", det, ego2global)
    assert entries[0]["detection_name"] == "car" and entries[0]["attribute_name"] == "vehicle.moving"
    path = write_submission(tmp_path / "r.json", {"tok": entries})
    import json

    data = json.loads(path.read_text())
    assert data["results"]["tok"][0]["translation"] == pytest.approx([100.0, 210.0, 1.5])
    assert not list(tmp_path.glob(".*"))     # no temp file left behind
