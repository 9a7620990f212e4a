"""Detection, depth and IMKD losses: signs, zeros at equality, weighting, depth targets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fake_frames import fake_frames
from imkd_deploy.config import BEVGrid, ConfigError, DistillConfig, tiny
from imkd_deploy.distill.dataset import training_sample
from imkd_deploy.distill.depth_target import IGNORE, depth_bin_targets
from imkd_deploy.distill.losses import (IMKDCriterion, dense_regression_loss, dense_regression_targets, depth_loss, fused_distill_loss, gaussian_focal_loss, kd_code_weights,
                                        radar_distill_loss, regression_l1, response_distill_loss, teacher_wins_box,
                                        regression_maps, response_regression_loss, weighted_feature_mse)
from imkd_deploy.model.head import HEAD_OUTPUTS, build_targets
from imkd_deploy.ops.bev_pool import example_rig

B, NY, NX = 2, 16, 16


def _maps(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _one_box_batch(grid: BEVGrid) -> dict:
    """Detection targets of one car, and a depth target with every cell ignored."""
    t = build_targets(np.array([[1.0, 2.0, 0.0, 2.0, 4.0, 1.5, 0.3, 1.0, 0.0]]), np.array([0]), grid, 10)
    batch = {k: torch.from_numpy(getattr(t, k))[None] for k in ("heatmap", "index", "mask", "reg")}
    batch["depth_target"] = torch.full((1, 6, 6, 16), IGNORE)
    return batch


def _student_out(r, grid: BEVGrid, **maps) -> dict:
    """A student's head outputs and depth logits drawn from ``r``; ``maps`` adds or replaces entries."""
    heads = {k: r(1, c, grid.ny, grid.nx)
             for k, c in (("heatmap", 10), ("offset", 2), ("height", 1), ("dims", 3), ("rot", 2), ("vel", 2))}
    return {**heads, "depth_logits": r(1, 6, 28, 6, 16), **maps}


def test_distillation_losses_nonnegative_and_zero_at_equality():
    r = _maps(0)
    student, teacher = r(B, 8, NY, NX), r(B, 8, NY, NX)
    i_l = torch.rand(B, 1, NY, NX)
    occ = (torch.rand(B, 1, NY, NX) > 0.7).float()
    heat = torch.rand(B, 10, NY, NX)
    assert radar_distill_loss(student, teacher, i_l, occ, 1.0, 0.2) > 0
    assert radar_distill_loss(teacher, teacher, i_l, occ, 1.0, 0.2) == 0
    assert fused_distill_loss(student, teacher, heat, 0.05) > 0
    assert fused_distill_loss(teacher, teacher, heat, 0.05) == 0
    logits_s, logits_t = r(B, 10, NY, NX), r(B, 10, NY, NX)
    assert response_distill_loss(logits_s, logits_t, 3) > 0
    assert response_distill_loss(logits_t, logits_t, 3) == 0


def test_response_distill_is_focal_weighted_kl_per_gt_centre():
    t = torch.tensor([2.0, -4.0, 0.0]).view(1, 1, 1, 3)     # teacher logits
    s = torch.tensor([0.0, -4.0, 1.0]).view(1, 1, 1, 3)     # the second cell agrees: no loss there
    pt, ps = torch.sigmoid(t), torch.sigmoid(s)
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    expected = float(((pt - ps).abs() ** 2 * kl).sum()) / 2
    assert float(response_distill_loss(s, t, torch.tensor(2))) == pytest.approx(expected, rel=1e-5)
    # normalised by GT centres like the focal loss: twice the centres, half the term; none counts as one
    assert float(response_distill_loss(s, t, 4)) == pytest.approx(expected / 2, rel=1e-5)
    assert float(response_distill_loss(s, t, 0)) == pytest.approx(expected * 2, rel=1e-5)
    # the focal weight is detached: the gradient is the weighted KL's, not the weight's
    s_req = s.clone().requires_grad_(True)
    response_distill_loss(s_req, t, 1).backward()
    w = (pt - ps).abs() ** 2
    assert torch.allclose(s_req.grad, w * (ps - pt), atol=1e-6)


def test_gated_response_distill_keeps_only_cells_where_the_teacher_heatmap_is_nearer_the_gt():
    gt = torch.tensor([1.0, 0.0, 0.5, 0.0]).view(1, 1, 1, 4)
    t = torch.tensor([3.0, 2.0, -3.0, -3.0]).view(1, 1, 1, 4)      # teacher logits
    s = torch.tensor([0.0, -2.0, 0.0, 0.0]).view(1, 1, 1, 4)       # student logits
    # cell 0: a GT centre the teacher sees (0.95) and the student half does: taught
    # cell 1: the teacher's false positive (0.88 on background): not taught
    # cell 2: GT 0.5, teacher 0.05 and student 0.5: the student is nearer, not taught
    # cell 3: background both call empty, the teacher more firmly: taught
    pt, ps = torch.sigmoid(t), torch.sigmoid(s)
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    each = ((pt - ps).abs() ** 2 * kl).flatten()
    assert float(response_distill_loss(s, t, 1)) == pytest.approx(float(each.sum()), rel=1e-5)
    assert float(response_distill_loss(s, t, 1, gt_heatmap=gt)) == pytest.approx(float(each[0] + each[3]), rel=1e-5)
    # the gate reads the student without a gradient: the kept cells' gradient is the ungated one's
    s_req = s.clone().requires_grad_(True)
    response_distill_loss(s_req, t, 1, gt_heatmap=gt).backward()
    w = (pt - ps).abs() ** 2 * torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    assert torch.allclose(s_req.grad, w * (ps - pt), atol=1e-6)
    # in the criterion, behind the config flag: a teacher at the GT heatmap wins wherever the student errs
    grid = tiny().grid
    batch = _one_box_batch(grid)
    r = _maps(5)
    out = _student_out(r, grid)
    exact = torch.logit(batch["heatmap"].clamp(1e-4, 1 - 1e-4))
    terms = {}
    for gate in (False, True):
        crit = IMKDCriterion(tiny(), DistillConfig(levels="resp", w_resp=1.0, resp_gate=gate), "student")
        terms[gate] = {name: float(crit(out, batch, {"heatmap": h, **{k: out[k] for k in HEAD_OUTPUTS}})["resp_kd"])
                       for name, h in (("exact", exact), ("flipped", -exact))}
    assert terms[True]["exact"] == pytest.approx(terms[False]["exact"], rel=1e-4)
    assert 0 <= terms[True]["flipped"] < 0.5 * terms[False]["flipped"]


def test_response_regression_distill_is_code_weighted_l1_over_the_gt_gaussian():
    def maps(vel_x: float, size: float) -> dict:
        out = {k: torch.zeros(1, c, 1, 3) for k, c in HEAD_OUTPUTS.items()}
        out["vel"][0, 0] = vel_x
        out["dims"][0, 0] = torch.tensor([0.0, size, 0.0])    # only the middle cell differs in size
        return out
    heat = torch.zeros(1, 10, 1, 3)
    heat[0, 2] = torch.tensor([1.0, 0.5, 0.0])                # a centre, its neighbour, a cell outside
    heat[0, 4, 0, 1] = 0.25                                   # another class: the max over classes counts
    student, teacher = maps(1.0, 2.0), maps(0.0, 0.0)
    # per cell: 0.2 * |vel| (velocity's code weight) + 1.0 * |dims|; weights 1, 0.5, 0
    expected = (1.0 * 0.2 + 0.5 * (0.2 + 2.0)) / 1.5
    assert float(response_regression_loss(student, teacher, heat)) == pytest.approx(expected, rel=1e-6)
    assert float(response_regression_loss(teacher, teacher, heat)) == 0
    # the teacher is a fixed target: gradients reach the student only
    student_req, teacher_req = ({k: v.clone().requires_grad_(True) for k, v in m.items()} for m in (student, teacher))
    response_regression_loss(student_req, teacher_req, heat).backward()
    assert all(v.grad is None for v in teacher_req.values())
    assert float(student_req["vel"].grad[0, 0, 0, 1]) == pytest.approx(0.5 * 0.2 / 1.5)
    # a sample without any GT box gives zero, not NaN
    assert float(response_regression_loss(student, teacher, torch.zeros_like(heat))) == 0
    # leaving out velocity keeps only the dims term: 0.5 * 2.0 / 1.5
    no_vel = kd_code_weights("vel")
    assert no_vel == (1.0,) * 8 + (0.0, 0.0)
    assert kd_code_weights("rot+offset") == (0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.2, 0.2)
    assert float(response_regression_loss(student, teacher, heat, no_vel)) == pytest.approx(1.0 / 1.5, rel=1e-6)
    with pytest.raises(ConfigError, match="resp_reg_skip.*'yaw'"):
        DistillConfig(resp_reg_skip="rot+yaw").validate()


def test_dense_regression_targets_aim_each_cell_at_its_nearest_gt_centre():
    grid = BEVGrid(x_range=(-8.0, 8.0), y_range=(-8.0, 8.0), cell=1.0)
    boxes = np.array([[-4.7, -4.2, 0.5, 2.0, 4.0, 1.5, 0.3, 1.0, 0.0],       # centre cell (3, 3)
                      [3.4, 2.9, 1.0, 0.6, 0.7, 1.7, -1.2, 0.0, 0.5]])      # centre cell (11, 10)
    t = build_targets(boxes, np.array([0, 8]), grid, 10)
    batch = {k: torch.from_numpy(getattr(t, k))[None] for k in ("index", "mask", "reg")}
    dense = dense_regression_targets(batch["index"], batch["mask"], batch["reg"], grid.ny, grid.nx)[0]
    assert dense.shape == (10, grid.ny, grid.nx)
    reg = torch.from_numpy(t.reg[:2])
    # at the centre cells: build_targets' own targets
    assert torch.equal(dense[:, 3, 3], reg[0]) and torch.equal(dense[:, 10, 11], reg[1])
    # two cells right of and one above the first centre: the same box, its offset re-aimed there
    expected = reg[0].clone()
    expected[0] -= 2.0
    expected[1] -= 1.0
    torch.testing.assert_close(dense[:, 4, 5], expected, rtol=0, atol=1e-6)
    # the decode from any cell lands on its owner's centre: cell + offset = the box's x, y in cells
    assert float(dense[0, 4, 5] + 5 - 8) == pytest.approx(-4.7, abs=1e-5)
    # ownership goes to the nearer centre; a sample without boxes gives zeros
    assert torch.equal(dense[2:, 9, 10], reg[1, 2:]) and torch.equal(dense[2:, 4, 4], reg[0, 2:])
    empty = torch.zeros_like(batch["mask"])
    assert not dense_regression_targets(batch["index"], empty, batch["reg"], grid.ny, grid.nx).any()
    pair = (torch.cat([batch["index"]] * 2), torch.cat([batch["mask"], empty]), torch.cat([batch["reg"]] * 2))
    two = dense_regression_targets(*pair, grid.ny, grid.nx)
    assert torch.equal(two[0], dense) and not two[1].any()


def test_dense_regression_loss_supervises_every_gaussian_cell_with_its_owners_box():
    grid = tiny().grid
    batch = _one_box_batch(grid)
    dense = dense_regression_targets(batch["index"], batch["mask"], batch["reg"], grid.ny, grid.nx)
    exact = dict(zip(HEAD_OUTPUTS, dense.split(list(HEAD_OUTPUTS.values()), dim=1)))
    assert float(dense_regression_loss(exact, dense, batch["heatmap"])) == 0
    # an error of 1 in the height channel at one off-centre cell of the Gaussian: code weight 1,
    # weighted by that cell's heatmap value over the Gaussian's sum
    iy, ix = divmod(int(batch["index"][0, 0]), grid.nx)
    h = batch["heatmap"].amax(dim=1)[0]
    assert 0 < float(h[iy, ix + 1]) < 1
    off = {k: v.clone() for k, v in exact.items()}
    off["height"][0, 0, iy, ix + 1] += 1.0
    expected = float(h[iy, ix + 1] / h.sum())
    assert float(dense_regression_loss(off, dense, batch["heatmap"])) == pytest.approx(expected, rel=1e-5)
    # the centre-cell L1 of the detection loss does not see that cell; the dense term does
    assert float(regression_l1(off, batch["index"], batch["mask"], batch["reg"])) == 0
    # in the criterion: a GT term of its own weight, in either role, with no teacher needed
    r = _maps(5)
    out = _student_out(r, grid, **off)
    for role in ("student", "teacher"):
        plain = IMKDCriterion(tiny(), DistillConfig(levels="none"), role)(out, batch)
        crit = IMKDCriterion(tiny(), DistillConfig(levels="none", w_dense_reg=2.0), role)
        assert not crit.needs_teacher
        terms = crit(out, batch)
        assert "dense_reg" not in plain
        assert float(terms["dense_reg"]) == pytest.approx(0.25 * expected, rel=1e-5)
        assert float(terms["total"]) == pytest.approx(float(plain["total"]) + 2.0 * 0.25 * expected, rel=1e-5)


def test_gated_regression_distill_keeps_only_what_the_teacher_does_better():
    heat = torch.zeros(1, 10, 1, 3)
    heat[0, 0] = torch.tensor([1.0, 0.5, 0.25])
    target = torch.zeros(1, 10, 1, 3)                         # the ground truth: zeros everywhere
    student = {k: torch.zeros(1, c, 1, 3) for k, c in HEAD_OUTPUTS.items()}
    teacher = {k: torch.zeros(1, c, 1, 3) for k, c in HEAD_OUTPUTS.items()}
    student["dims"][0, :, 0, 0] = 1.0                         # cell 0: the student's size is off by 1 in each channel
    teacher["dims"][0, 0, 0, 0] = 0.5                         # ... the teacher's by 0.5 in one: it wins, and is taught
    student["rot"][0, 0, 0, 1] = 0.1                          # cell 1: the student's heading errs less
    teacher["rot"][0, 0, 0, 1] = 0.4                          # ... than the teacher's: no heading taught there
    teacher["vel"][0, 1, 0, 2] = 2.0                          # cell 2: the student is exact, the teacher not
    ungated = (1.0 * 2.5 + 0.5 * 0.3 + 0.25 * 0.2 * 2.0) / 1.75
    assert float(response_regression_loss(student, teacher, heat)) == pytest.approx(ungated, rel=1e-6)
    gated = 1.0 * 2.5 / 1.75
    assert float(response_regression_loss(student, teacher, heat, gate_target=target)) == pytest.approx(gated, rel=1e-6)
    # a teacher equal to the ground truth wins wherever the student errs: the gate then changes nothing
    assert float(response_regression_loss(student, teacher, heat, gate_target=regression_maps(teacher))) == \
        pytest.approx(ungated, rel=1e-6)
    # in the criterion, behind the config flag: a teacher at the box's own targets always wins
    grid = tiny().grid
    batch = _one_box_batch(grid)
    r = _maps(3)
    out = _student_out(r, grid)
    dense = dense_regression_targets(batch["index"], batch["mask"], batch["reg"], grid.ny, grid.nx)
    exact = dict(zip(HEAD_OUTPUTS, dense.split(list(HEAD_OUTPUTS.values()), dim=1)))
    noisy = {k: v + r(*v.shape) for k, v in exact.items()}
    terms = {}
    for gate in (False, True):
        crit = IMKDCriterion(tiny(), DistillConfig(levels="resp", w_resp_reg=1.0, resp_reg_gate=gate), "student")
        terms[gate] = {name: float(crit(out, batch, {"heatmap": out["heatmap"], **t})["resp_reg_kd"])
                       for name, t in (("exact", exact), ("noisy", noisy))}
    assert terms[True]["exact"] == pytest.approx(terms[False]["exact"], rel=1e-6)
    assert 0 < terms[True]["noisy"] < 0.9 * terms[False]["noisy"]


def test_gated_fused_distill_drops_object_cells_where_the_teacher_box_is_worse():
    teacher_f = torch.ones(1, 4, 1, 3)                        # equal activation everywhere
    student_f = torch.zeros(1, 4, 1, 3)                       # squared error 1 in cells 0 and 1
    student_f[0, :, 0, 2] = 4.0                               # ... and 9 in cell 2
    heat = torch.zeros(1, 10, 1, 3)
    heat[0, 0] = torch.tensor([1.0, 0.5, 0.0])                # cell 2 is background: the floor 0.05
    ungated = (1.0 * 1 + 0.5 * 1 + 0.05 * 9) / 1.55
    assert float(fused_distill_loss(student_f, teacher_f, heat, 0.05)) == pytest.approx(ungated, rel=1e-6)
    gate = torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 1, 3)     # the teacher's box is worse at cell 1
    gated = (1.0 * 1 + 0.05 * 1 + 0.05 * 9) / 1.1
    assert float(fused_distill_loss(student_f, teacher_f, heat, 0.05, gate=gate)) == pytest.approx(gated, rel=1e-6)
    # the box comparison sums every head output's code-weighted L1: a better size outweighs a worse heading
    target = torch.zeros(1, 10, 1, 3)
    student, teacher = torch.zeros(1, 10, 1, 3), torch.zeros(1, 10, 1, 3)
    student[0, 3:6, 0, 0], teacher[0, 6, 0, 0] = 1.0, 0.5     # cell 0: student size 3 off, teacher heading 0.5
    student[0, 6, 0, 1], teacher[0, 8, 0, 1] = 0.1, 1.0       # cell 1: velocity counts 0.2: 0.2 > 0.1
    assert teacher_wins_box(student, teacher, target).flatten().tolist() == [1.0, 0.0, 0.0]   # a tie is no win
    # in the criterion, behind the config flag: a teacher at the box's own targets keeps every weight
    cfg = tiny().replace(fused_channels=12, bev_encoder_channels=12)
    grid = cfg.grid
    batch = _one_box_batch(grid)
    r = _maps(4)
    out = _student_out(r, grid, fused=r(1, 12, grid.ny, grid.nx))
    dense = dense_regression_targets(batch["index"], batch["mask"], batch["reg"], grid.ny, grid.nx)
    exact = dict(zip(HEAD_OUTPUTS, dense.split(list(HEAD_OUTPUTS.values()), dim=1)))
    worse = {k: v + 5.0 for k, v in exact.items()}            # the student (N(0, 1) off) wins everywhere
    terms = {}
    for gate in (False, True):
        torch.manual_seed(0)                                  # the same adapter for both
        crit = IMKDCriterion(cfg, DistillConfig(levels="fused", fused_gate=gate), "student")
        terms[gate] = {name: crit(out, batch, {"feature": torch.ones(1, 12, grid.ny, grid.nx), **t})["fused_kd"].item()
                       for name, t in (("exact", exact), ("worse", worse))}
    assert terms[True]["exact"] == pytest.approx(terms[False]["exact"], rel=1e-6)
    assert terms[False]["worse"] == pytest.approx(terms[False]["exact"], rel=1e-6)   # ungated: the boxes do not matter
    # a teacher worse everywhere leaves only the floor: the term of a GT heatmap without objects
    with torch.no_grad():
        floor_only = float(fused_distill_loss(crit.fused_adapter(out["fused"]), torch.ones(1, 12, grid.ny, grid.nx),
                                              torch.zeros_like(batch["heatmap"]), 0.05))
    assert terms[True]["worse"] == pytest.approx(floor_only, rel=1e-6)
    assert floor_only != pytest.approx(terms[False]["worse"], rel=1e-4)


def test_radar_distill_weights_follow_lidar_intensity_and_radar_hits():
    teacher = torch.zeros(1, 4, 1, 3)
    student = torch.ones(1, 4, 1, 3) * torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)   # squared errors 1, 4, 9
    i_l = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)       # the third cell has no LiDAR: ignored
    occ = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)       # radar hits only the first
    loss = radar_distill_loss(student, teacher, i_l, occ, lambda_on=1.0, lambda_off=0.25)
    assert float(loss) == pytest.approx((1.0 * 1 + 0.25 * 4) / 1.25)


def test_criterion_distillation_terms_vanish_when_adapted_student_equals_teacher():
    cfg = tiny().replace(radar_channels=8, lidar_channels=8, fused_channels=12, bev_encoder_channels=12)
    crit = IMKDCriterion(cfg, DistillConfig(levels="all", w_resp=1.0, w_resp_reg=1.0), "student")
    with torch.no_grad():   # identity adapters: "student equals teacher after the adapters"
        for adapter in (crit.radar_adapter, crit.fused_adapter):
            adapter.weight.copy_(torch.eye(adapter.weight.shape[0])[:, :, None, None])
            adapter.bias.zero_()
    r = _maps(1)
    grid = cfg.grid
    feats = {"lidar_bev": r(1, 8, grid.ny, grid.nx), "feature": r(1, 12, grid.ny, grid.nx), "heatmap": r(1, 10, grid.ny, grid.nx)}
    batch = _one_box_batch(grid)
    teacher = dict(feats, lidar_intensity=torch.rand(1, 1, grid.ny, grid.nx))
    student = _student_out(r, grid, heatmap=feats["heatmap"], radar_bev=feats["lidar_bev"], fused=feats["feature"],
                           radar_occupancy=torch.zeros(1, 1, grid.ny, grid.nx))
    teacher.update({k: student[k] for k in HEAD_OUTPUTS})
    terms = crit(student, batch, teacher)
    assert terms["radar_kd"] == 0 and terms["fused_kd"] == 0 and terms["resp_kd"] == 0 and terms["resp_reg_kd"] == 0
    assert terms["depth"] == 0          # every depth cell ignored
    assert terms["heatmap"] > 0 and terms["reg"] > 0
    # a different student makes every distillation term positive
    student2 = dict(student, radar_bev=r(1, 8, grid.ny, grid.nx), fused=r(1, 12, grid.ny, grid.nx), heatmap=r(1, 10, grid.ny, grid.nx),
                    vel=r(1, 2, grid.ny, grid.nx))
    terms2 = crit(student2, batch, teacher)
    assert min(terms2["radar_kd"], terms2["fused_kd"], terms2["resp_kd"], terms2["resp_reg_kd"]) > 0
    assert float(terms2["total"].detach()) == pytest.approx(float(sum(terms2[k].detach() for k in terms2 if k != "total")), rel=1e-6)
    # kd_scale (DistillConfig.kd_until's schedule) scales the level-1/2 terms in the total, only them
    kd = float(sum(terms2[k].detach() for k in ("radar_kd", "fused_kd")))
    crit.kd_scale = 0.25
    terms3 = crit(student2, batch, teacher)
    assert float(terms3["total"].detach()) == pytest.approx(float(terms2["total"].detach()) - 0.75 * kd, rel=1e-6)
    assert float(terms3["radar_kd"].detach()) == pytest.approx(float(terms2["radar_kd"].detach()))       # logged unscaled
    # resp_scale (DistillConfig.resp_until's schedule) scales the two response terms alone
    crit.kd_scale, crit.resp_scale = 1.0, 0.0
    terms4 = crit(student2, batch, teacher)
    resp = float(terms2["resp_kd"].detach() + terms2["resp_reg_kd"].detach())
    assert float(terms4["total"].detach()) == pytest.approx(float(terms2["total"].detach()) - resp, rel=1e-6)


def test_feature_norm_ignores_scale_and_offset_of_either_side():
    r = _maps(2)
    teacher, other = r(B, 8, NY, NX), r(B, 8, NY, NX)
    w = torch.rand(B, 1, NY, NX)
    rescaled = 3.0 * teacher + 0.5            # same pattern, other scale: plain MSE sees it
    assert weighted_feature_mse(rescaled, teacher, w) > 1.0
    assert float(weighted_feature_mse(rescaled, teacher, w, norm=True)) == pytest.approx(0.0, abs=1e-6)
    assert weighted_feature_mse(other, teacher, w, norm=True) > 1.0     # a different pattern still costs


def test_level2_can_read_the_student_bev_encoder_output():
    cfg = tiny().replace(fused_channels=12, bev_encoder_channels=16)
    at_fused = IMKDCriterion(cfg, DistillConfig(levels="fused"), "student")
    at_encoder = IMKDCriterion(cfg, DistillConfig(levels="fused", fused_at="encoder"), "student")
    assert at_fused.fused_adapter.in_channels == 12 and at_encoder.fused_adapter.in_channels == 16
    grid = cfg.grid
    batch = _one_box_batch(grid)
    r = _maps(3)
    teacher = {"feature": r(1, 16, grid.ny, grid.nx)}
    student = _student_out(r, grid, fused=r(1, 12, grid.ny, grid.nx), feature=teacher["feature"])
    with torch.no_grad():
        at_encoder.fused_adapter.weight.copy_(torch.eye(16)[:, :, None, None])
        at_encoder.fused_adapter.bias.zero_()
    assert at_encoder(student, batch, teacher)["fused_kd"] == 0      # reads "feature", not "fused"
    assert at_fused(student, batch, teacher)["fused_kd"] > 0


def test_kd_channels_leaves_the_other_student_channels_free():
    cfg = tiny().replace(radar_channels=8, fused_channels=12, lidar_channels=8, bev_encoder_channels=16)
    crit = IMKDCriterion(cfg, DistillConfig(levels="radar+fused", kd_channels=0.5), "student")
    assert crit.radar_adapter.in_channels == 4 and crit.fused_adapter.in_channels == 6
    grid = cfg.grid
    batch = _one_box_batch(grid)
    r = _maps(4)
    teacher = {"lidar_bev": r(1, 8, grid.ny, grid.nx), "feature": r(1, 16, grid.ny, grid.nx),
               "lidar_intensity": torch.rand(1, 1, grid.ny, grid.nx)}
    student = _student_out(r, grid, radar_bev=r(1, 8, grid.ny, grid.nx), fused=r(1, 12, grid.ny, grid.nx),
                           radar_occupancy=torch.ones(1, 1, grid.ny, grid.nx))
    base = crit(student, batch, teacher)
    # the free half (channels 4.. / 6..) can hold anything: no distillation cost, no gradient
    changed = dict(student, radar_bev=student["radar_bev"].clone(), fused=student["fused"].clone().requires_grad_())
    changed["radar_bev"][:, 4:] += 5.0
    terms = crit(changed, batch, teacher)
    assert terms["radar_kd"].item() == pytest.approx(base["radar_kd"].item())
    assert terms["fused_kd"].item() == pytest.approx(base["fused_kd"].item()) and base["fused_kd"].item() > 0
    (grad,) = torch.autograd.grad(terms["fused_kd"], changed["fused"])
    assert float(grad[:, 6:].abs().max()) == 0.0 and float(grad[:, :6].abs().max()) > 0.0
    with pytest.raises(ConfigError, match="kd_channels"):
        DistillConfig(kd_channels=0.0).validate()


def test_conv_adapters_reach_the_neighbouring_cells():
    torch.manual_seed(0)
    cfg = tiny().replace(radar_channels=8, fused_channels=12, lidar_channels=8, bev_encoder_channels=16)
    x = _maps(5)(1, 12, 8, 8)
    bumped = x.clone()
    bumped[..., 4, 4] += 3.0
    for kind, reach in (("linear", False), ("conv", True)):
        crit = IMKDCriterion(cfg, DistillConfig(levels="radar+fused", adapter=kind), "student").eval()
        with torch.no_grad():
            diff = (crit.fused_adapter(bumped) - crit.fused_adapter(x)).abs().amax(1)[0]
        assert float(diff[4, 4]) > 0 and float(diff[4, 6]) == 0
        assert (float(diff[4, 5]) > 0) == reach, kind
    with pytest.raises(ConfigError, match="adapter"):
        DistillConfig(adapter="mlp").validate()


def test_ablation_levels_select_terms():
    cfg = tiny()
    assert IMKDCriterion(cfg, DistillConfig(levels="none"), "student").needs_teacher is False
    radar_only = IMKDCriterion(cfg, DistillConfig(levels="radar"), "student")
    assert radar_only.radar_adapter is not None and radar_only.fused_adapter is None
    assert IMKDCriterion(cfg, DistillConfig(levels="all"), "teacher").needs_teacher is False


def test_focal_and_regression_losses_prefer_the_truth():
    grid = BEVGrid((-8.0, 8.0), (-8.0, 8.0), (-5.0, 3.0), 1.0)
    t = build_targets(np.array([[0.5, 0.5, 0.0, 2.0, 4.0, 1.5, 0.3, 1.0, 0.0]]), np.array([2]), grid, 10)
    target = torch.from_numpy(t.heatmap)[None]
    good = torch.logit(target.clamp(1e-4, 1 - 1e-4))
    assert gaussian_focal_loss(good, target) < 0.1 < 10.0 < gaussian_focal_loss(torch.zeros_like(good), target)
    maps = {k: torch.zeros(1, c, grid.ny, grid.nx) for k, c in (("offset", 2), ("height", 1), ("dims", 3), ("rot", 2), ("vel", 2))}
    index, mask, reg = (torch.from_numpy(x)[None] for x in (t.index, t.mask, t.reg))
    iy, ix = divmod(int(t.index[0]), grid.nx)
    before = regression_l1(maps, index, mask, reg)
    start = 0
    for k, c in (("offset", 2), ("height", 1), ("dims", 3), ("rot", 2), ("vel", 2)):
        maps[k][0, :, iy, ix] = reg[0, 0, start:start + c]
        start += c
    assert before > 0 and regression_l1(maps, index, mask, reg) == 0


def test_depth_targets_nearest_point_and_bins():
    cfg = tiny()
    intr, c2e, _ = example_rig(cfg)
    fh, fw = cfg.feature_size
    # two points on CAM_FRONT's optical axis (ego +x from its mount) at 10 m and 20 m: the nearer one wins
    mount = c2e[0, :3, 3]
    pts = np.array([mount + [10.0, 0, 0], mount + [20.0, 0, 0], mount + [-100.0, 0, 0]])
    target = depth_bin_targets(pts, intr, c2e, cfg)
    lo, _, step = cfg.depth_bins
    u, v = intr[0, 0, 2], intr[0, 1, 2]
    row, col = int(np.floor((v + 0.5) / cfg.downsample)), int(np.floor((u + 0.5) / cfg.downsample))
    assert target.shape == (cfg.num_cams, fh, fw)
    assert target[0, row, col] == int((10.0 - lo) // step)
    assert (target != IGNORE).sum() == 1     # the back point is beyond the back camera's max depth
    logits = torch.full((1, cfg.num_cams, cfg.num_depth_bins, fh, fw), -20.0)
    logits[0, 0, target[0, row, col], row, col] = 20.0
    assert depth_loss(logits, torch.from_numpy(target)[None]) < 1e-6
    assert depth_loss(torch.zeros_like(logits), torch.from_numpy(target)[None]) == pytest.approx(np.log(cfg.num_depth_bins), rel=1e-5)


def test_depth_targets_come_from_the_key_sweep_only():
    """The images are exposed at the key time: a return from an older sweep (dt > 0), here a
    moving car 10 m nearer than it is now, must not set the depth target."""
    cfg = tiny()
    frame = fake_frames(cfg, 1)[0]
    mount = frame.cam2ego[0, :3, 3]
    key = np.array([[*(mount + [20.0, 0, 0]), 100.0, 0.0]], np.float32)
    older = np.array([[*(mount + [10.0, 0, 0]), 100.0, 0.3]], np.float32)
    mixed = training_sample(replace(frame, lidar_points=np.concatenate([key, older])), cfg, "student")["depth_target"]
    lo, _, step = cfg.depth_bins
    assert (mixed != IGNORE).sum() == 1
    assert mixed[mixed != IGNORE][0] == int((20.0 - lo) // step)


def test_kd_skip_takes_the_skipped_samples_out_of_every_distillation_term():
    """A batch of a night and a day sample under kd_skip=night: each distillation term equals the
    day sample's alone (its own normalisation, not half of it); the detection terms keep both."""
    cfg = tiny().replace(radar_channels=8, lidar_channels=8, fused_channels=12, bev_encoder_channels=12)
    torch.manual_seed(0)
    crit = IMKDCriterion(cfg, DistillConfig(levels="all", w_resp=1.0, w_resp_reg=1.0, kd_skip="night"), "student")
    grid, r = cfg.grid, _maps(2)
    one = _one_box_batch(grid)
    batch = {k: torch.cat([v, v]) for k, v in one.items()}

    def outputs():
        student = _student_out(r, grid, radar_bev=r(1, 8, grid.ny, grid.nx), fused=r(1, 12, grid.ny, grid.nx),
                               radar_occupancy=(r(1, 1, grid.ny, grid.nx) > 0.5).float())
        teacher = {"lidar_bev": r(1, 8, grid.ny, grid.nx), "feature": r(1, 12, grid.ny, grid.nx),
                   "lidar_intensity": torch.sigmoid(r(1, 1, grid.ny, grid.nx)),
                   **{k: r(1, c, grid.ny, grid.nx) for k, c in (("heatmap", 10), *HEAD_OUTPUTS.items())}}
        return student, teacher

    (s_night, t_night), (s_day, t_day) = outputs(), outputs()
    # the night student is far off its teacher, so any share of it would show in the terms
    s_night = {k: 5 * v if k in ("radar_bev", "fused", "heatmap", *HEAD_OUTPUTS) else v for k, v in s_night.items()}
    student = {k: torch.cat([s_night[k], s_day[k]]) for k in s_day}
    teacher = {k: torch.cat([t_night[k], t_day[k]]) for k in t_day}
    kd = ("radar_kd", "fused_kd", "resp_kd", "resp_reg_kd")
    both = crit(student, batch, teacher)
    day = crit(s_day, one, t_day)
    skipped = crit(student, dict(batch, kd_keep=torch.tensor([0.0, 1.0])), teacher)
    for k in kd:
        assert float(skipped[k].detach()) == pytest.approx(float(day[k].detach()), rel=1e-5), k
        assert float(skipped[k].detach()) < 0.8 * float(both[k].detach()), k
    assert float(skipped["heatmap"].detach()) == pytest.approx(float(both["heatmap"].detach()))
    # a batch of night samples only: every distillation term is 0, the adapters still get a gradient
    student = {k: v.requires_grad_() if k in ("radar_bev", "fused") else v for k, v in student.items()}
    night = crit(student, dict(batch, kd_keep=torch.zeros(2)), teacher)
    assert all(float(night[k].detach()) == 0 for k in kd)
    night["total"].backward()
    assert crit.radar_adapter.weight.grad is not None and float(student["radar_bev"].grad.abs().sum()) == 0
    with pytest.raises(ConfigError, match="kd_skip"):
        DistillConfig(kd_skip="dusk").validate()
