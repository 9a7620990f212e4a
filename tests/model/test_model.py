"""Model shapes (tiny, nuscenes_r50), pillarisation and head targets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from imkd_deploy.config import BEVGrid, tiny, nuscenes_r50
from imkd_deploy.model.build import build_student, build_teacher, count_parameters
from imkd_deploy.model.head import MAX_OBJECTS, build_targets
from imkd_deploy.model.pillars import (LIDAR_SPEC, RADAR_SPEC, batch_pillars, lidar_intensity_map, pillarise,
                                       radar_intensity_map)
from imkd_deploy.ops.bev_pool import compute_geometry, example_rig, stack_geometry

HEADS = {"heatmap": 10, "offset": 2, "height": 1, "dims": 3, "rot": 2, "vel": 2}


def _student_inputs(cfg, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    geom = stack_geometry([compute_geometry(*example_rig(cfg), cfg)] * batch)
    lo, hi = cfg.grid.x_range
    pts = np.concatenate([rng.uniform(lo, hi, (300, 2)), rng.uniform(-1, 2, (300, 1)), rng.uniform(-5, 20, (300, 1)),
                          rng.normal(0, 3, (300, 2)), rng.uniform(0, 0.3, (300, 1))], 1)
    rp, rc = batch_pillars([pillarise(pts, cfg.grid, RADAR_SPEC)] * batch, cfg.grid)
    images = torch.randn(batch, cfg.num_cams, 3, *cfg.image_size)
    return (images, *geom.to_torch(), torch.from_numpy(rp), torch.from_numpy(rc))


def test_tiny_student_and_teacher_shapes():
    torch.manual_seed(0)
    cfg = tiny()
    student, teacher = build_student(cfg), build_teacher(cfg)
    out = student.forward_train(*_student_inputs(cfg, batch=2))
    ny, nx = cfg.grid.ny, cfg.grid.nx
    for name, c in HEADS.items():
        assert out[name].shape == (2, c, ny, nx), name
    assert out["cam_bev"].shape == (2, cfg.context_channels, ny, nx)
    assert out["radar_bev"].shape == (2, cfg.radar_channels, ny, nx)
    assert out["fused"].shape == (2, cfg.fused_channels, ny, nx)
    assert out["feature"].shape == (2, cfg.bev_encoder_channels, ny, nx)
    assert out["depth_logits"].shape == (2, cfg.num_cams, cfg.num_depth_bins, *cfg.feature_size)
    assert 0.0 <= float(out["radar_intensity"].min()) and float(out["radar_intensity"].max()) <= 1.0
    assert set(student(*_student_inputs(cfg, batch=2))) == set(HEADS)   # the export signature returns heads only

    lp, lc = pillarise(np.array([[0.3, 0.2, 0.0, 200.0, 0.0], [5.0, 5.0, 0.0, 50.0, 0.0]]), cfg.grid, LIDAR_SPEC)
    tout = teacher.forward_train(torch.from_numpy(lp), torch.from_numpy(lc), 1)
    for name, c in HEADS.items():
        assert tout[name].shape == (1, c, ny, nx), name
    assert tout["lidar_bev"].shape == (1, cfg.lidar_channels, ny, nx)
    # both returns lie on the road (z = 0): the all-returns I_L sees them, the structure-only one does not
    assert float(tout["lidar_intensity"].max()) == pytest.approx(1.0)
    assert float(teacher.forward_train(torch.from_numpy(lp), torch.from_numpy(lc), 1,
                                       structure_intensity=True)["lidar_intensity"].max()) == 0.0


@pytest.mark.slow
def test_nuscenes_r50_forward_backward_batch1():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = nuscenes_r50()
    student = build_student(cfg)
    params = count_parameters(student)
    inputs = _student_inputs(cfg, batch=1)
    t0 = time.perf_counter()
    out = student.forward_train(*inputs)
    sum(out[k].float().mean() for k in HEADS).backward()
    elapsed = time.perf_counter() - t0
    assert out["heatmap"].shape == (1, 10, 128, 128)
    assert out["depth_logits"].shape == (1, 6, 118, 16, 44)
    assert out["cam_bev"].shape == (1, 80, 128, 128)
    assert student.image_encoder.trunk.stages[0][0].conv1.weight.grad is not None
    # ResNet-50 trunk (~23.5M) + FPN + BEV/head: a guard against silently building the wrong net
    assert 25e6 < params < 40e6, params
    print(f"nuscenes_r50 student: {params / 1e6:.2f}M parameters, forward+backward {elapsed:.1f} s")


def test_pillarise_aggregates_per_cell():
    grid = BEVGrid((-4.0, 4.0), (-4.0, 4.0), (-5.0, 3.0), 1.0)
    # two radar points in cell (ix=4, iy=4) (x, y in [0, 1)), one in (ix=0, iy=7), one outside x, one outside z
    pts = np.array([
        [0.25, 0.5, -1.0, 10.0, 2.0, 0.0, 0.1],
        [0.75, 0.5, 1.0, 20.0, 4.0, 2.0, 0.3],
        [-3.5, 3.5, 0.0, -5.0, 0.0, 0.0, 0.0],
        [9.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 4.0, 1.0, 0.0, 0.0, 0.0],
    ], np.float32)
    feats, coords = pillarise(pts, grid, RADAR_SPEC)
    assert coords.tolist() == [4 * 8 + 4, 7 * 8 + 0]
    f = dict(zip(RADAR_SPEC.feature_names, feats[0]))
    np.testing.assert_allclose([f["dx"], f["dy"], f["dz"]], [0.0, 0.0, (0.0 - (-1.0)) / 4.0], atol=1e-6)
    np.testing.assert_allclose([f["rcs_mean"], f["rcs_max"], f["vx_mean"], f["vy_mean"], f["dt_mean"]],
                               [1.5, 2.0, 0.3, 0.1, 0.2], atol=1e-6)
    assert f["log_count"] == pytest.approx(np.log(3.0))
    both, bcoords = batch_pillars([(feats, coords), (feats[:1], coords[:1])], grid)
    assert bcoords.tolist() == [36, 56, 64 + 36] and both.shape == (3, RADAR_SPEC.num_features)

    # intensity maps: the radar cell with 2 returns of 10-20 dBsm is brighter than the -5 dBsm one
    i_r = radar_intensity_map(torch.from_numpy(feats), torch.from_numpy(coords), 1, 8, 8)[0, 0]
    assert 0 < float(i_r[7, 0]) < float(i_r[4, 4]) <= 1.0 and float(i_r.sum() - i_r[7, 0] - i_r[4, 4]) == 0.0
    lf, lc = pillarise(np.array([[0.5, 0.5, 0.0, 200.0, 0.0], [1.5, 0.5, 0.0, 50.0, 0.0]]), grid, LIDAR_SPEC)
    i_l = lidar_intensity_map(torch.from_numpy(lf), torch.from_numpy(lc), 1, 8, 8)[0, 0]
    assert float(i_l[4, 4]) == pytest.approx(1.0) and float(i_l[4, 5]) == pytest.approx(0.25)
    # structure-only I_L: a bright return on the road (lane paint) drops out, an object's side
    # at 1 m counts fully, one at 0.35 m (half-way up the 0.2-0.5 m ramp) half
    sf, sc = pillarise(np.array([[0.5, 0.5, 0.0, 200.0, 0.0], [1.5, 0.5, 1.0, 50.0, 0.0],
                                 [2.5, 0.5, 0.35, 50.0, 0.0]]), grid, LIDAR_SPEC)
    i_s = lidar_intensity_map(torch.from_numpy(sf), torch.from_numpy(sc), 1, 8, 8, grid.z_range)[0, 0]
    assert float(i_s[4, 4]) == 0.0 and float(i_s[4, 5]) == pytest.approx(1.0) and float(i_s[4, 6]) == pytest.approx(0.5, abs=1e-5)


def test_build_targets_peaks_and_regression():
    grid = BEVGrid((-10.0, 10.0), (-10.0, 10.0), (-5.0, 3.0), 0.5)
    boxes = np.array([[1.3, -2.6, 0.4, 2.0, 4.5, 1.6, 0.7, 3.0, -1.0],
                      [50.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], np.float32)   # 2nd: outside the grid
    t = build_targets(boxes, np.array([0, 5]), grid, 10)
    ix, iy = int((1.3 + 10) / 0.5), int((-2.6 + 10) / 0.5)
    assert t.mask.sum() == 1 and t.heatmap.max() == 1.0
    assert t.heatmap[0, iy, ix] == 1.0 and t.heatmap[5].max() == 0.0
    assert t.index[0] == iy * grid.nx + ix and t.labels[0] == 0 and t.labels[1] == -1
    np.testing.assert_allclose(t.reg[0], [(1.3 + 10) / 0.5 - ix, (-2.6 + 10) / 0.5 - iy, 0.4, np.log(2.0), np.log(4.5),
                                          np.log(1.6), np.sin(0.7), np.cos(0.7), 3.0, -1.0], rtol=1e-5, atol=1e-5)
    assert t.reg.shape == (MAX_OBJECTS, 10)
    # the Gaussian falls off with distance from the centre and stays radially symmetric
    assert 0 < t.heatmap[0, iy, ix + 1] < 1.0 and t.heatmap[0, iy, ix + 1] == t.heatmap[0, iy + 1, ix]
