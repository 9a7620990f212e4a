"""Train a teacher and a distilled student on a small synthetic drive, then evaluate them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from imkd_deploy.config import BEVGrid, DistillConfig, RunConfig, TrainConfig, tiny
from imkd_deploy.data.synth import SynthConfig, write_drive
from imkd_deploy.distill.evaluate import predict_split
from imkd_deploy.distill.trainer import train
from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission


@pytest.mark.slow
def test_train_teacher_student_then_eval(tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / "drive"
    write_drive(root, SynthConfig(num_scenes=3, samples_per_scene=4, image_width=400, image_height=225, seed=3))
    model = tiny().replace(image_size=(64, 128), grid=BEVGrid((-24.0, 24.0), (-24.0, 24.0), (-5.0, 3.0), 1.5).to_dict(),
                           fpn_channels=16, context_channels=16, radar_channels=16, lidar_channels=16,
                           fused_channels=24, bev_encoder_channels=24, head_channels=24)
    tc = TrainConfig(max_steps=3, batch_size=2, warmup_steps=1, log_every=1)
    teacher = train(RunConfig(model=model, distill=DistillConfig(levels="none"), train=tc), root, tmp_path / "t",
                    role="teacher", progress=False)
    student = train(RunConfig(model=model, distill=DistillConfig(levels="all"), train=tc), root, tmp_path / "s", teacher,
                    role="student", progress=False)
    assert json.loads((tmp_path / "s/config.json").read_text())["teacher"] == str(teacher)

    for ckpt in (teacher, student):
        results = predict_split(ckpt, root, "v1.0-mini", "mini_val")
        assert results == ckpt.with_name("last_mini_val_results.json")
        sub = json.loads(results.read_text())
        assert len(sub["results"]) == 4                      # every mini_val sample (1 val scene x 4)
        boxes = [b for v in sub["results"].values() for b in v]
        assert boxes and all(len(b["translation"]) == 3 and len(b["velocity"]) == 2 for b in boxes)
        metrics = evaluate_submission(results, root, "v1.0-mini", "mini_val")
        assert 0.0 <= metrics["nd_score"] <= 1.0 and not math.isnan(metrics["nd_score"])
