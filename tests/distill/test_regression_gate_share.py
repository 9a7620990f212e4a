"""benchmarks/regression_gate_share.py: the teacher's winning share of the GT weight, per head
output, is 0 against a student at the ground truth and 1 against one far from it; the same for
the share of the heatmap term its gate keeps."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fake_frames import fake_frames
from imkd_deploy.config import tiny
from imkd_deploy.distill.dataset import FrameDataset, collate
from imkd_deploy.distill.losses import dense_regression_targets
from imkd_deploy.model.build import build_teacher
from imkd_deploy.model.head import HEAD_OUTPUTS

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "regression_gate_share.py"
_spec = importlib.util.spec_from_file_location("regression_gate_share", _SCRIPT)
regression_gate_share = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regression_gate_share)


class _StubStudent:
    """Regression maps and heatmap logits given per sample, in the order gate_share visits them."""

    def __init__(self, maps: list[torch.Tensor], heatmaps: list[torch.Tensor]):
        self._maps, self._heatmaps = iter(maps), iter(heatmaps)

    def forward_train(self, *args):
        return {"heatmap": next(self._heatmaps),
                **dict(zip(HEAD_OUTPUTS, next(self._maps).split(list(HEAD_OUTPUTS.values()), dim=1)))}


def test_teacher_share_is_zero_against_the_truth_and_one_against_a_far_student():
    cfg = tiny()
    dataset = FrameDataset(fake_frames(cfg, 2, seed=1), cfg, "student")
    teacher = build_teacher(cfg).eval()
    truth, heat = [], []
    for i in range(2):
        b = collate([dataset[i]], cfg)
        truth.append(dense_regression_targets(b["index"], b["mask"], b["reg"], *b["heatmap"].shape[-2:]))
        heat.append(torch.logit(b["heatmap"].clamp(1e-6, 1 - 1e-6)))
    exact = regression_gate_share.gate_share(_StubStudent(truth, heat), teacher, dataset, [0, 1])
    far = regression_gate_share.gate_share(_StubStudent([t + 100.0 for t in truth], [-h for h in heat]),
                                           teacher, dataset, [0, 1])
    for name in (*HEAD_OUTPUTS, "box"):
        assert exact[name]["teacher_wins"] == 0 and exact[name]["student_l1"] == 0
        assert exact[name]["teacher_l1"] > 0
        assert far[name]["teacher_wins"] == pytest.approx(1.0)
        assert far[name]["teacher_l1"] == pytest.approx(exact[name]["teacher_l1"])
    # the box row sums the outputs' L1s
    assert far["box"]["student_l1"] == pytest.approx(sum(far[n]["student_l1"] for n in HEAD_OUTPUTS))
    # the heatmap row: a student at the GT heatmap leaves the teacher nothing to teach; one that
    # calls every background cell an object and misses every centre leaves it nearly everything
    assert exact["heatmap"]["teacher_wins"] == 0 and exact["heatmap"]["student_l1"] < 1e-5
    assert far["heatmap"]["teacher_wins"] > 0.9
    assert far["heatmap"]["teacher_l1"] == pytest.approx(exact["heatmap"]["teacher_l1"])
    gt = [collate([dataset[i]], cfg)["heatmap"] for i in range(2)]
    flipped_l1 = [float((g * (torch.sigmoid(-h) - g).abs()).sum() / g.sum()) for g, h in zip(gt, heat)]
    assert far["heatmap"]["student_l1"] == pytest.approx(sum(flipped_l1) / 2, rel=1e-4)
