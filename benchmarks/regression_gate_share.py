"""How much of the regression response term the gate (``DistillConfig.resp_reg_gate``) keeps:
for each head output, the share of the GT-heatmap weight on which the teacher is closer to the
ground truth than a student, and both models' GT-weighted L1 there, over a drive's split. The
row "box" is level 2's gate (``DistillConfig.fused_gate``): the teacher's whole box closer. The
row "heatmap" is the heatmap term's gate (``DistillConfig.resp_gate``): the share of the term it
keeps, and both models' class probabilities against the GT heatmap (L1, GT weighted).

    python benchmarks/regression_gate_share.py --student RUN/checkpoints/last.safetensors \\
        --teacher W/runs/teacher/checkpoints/last.safetensors --dataroot DRIVE --samples 24

The student may be any student checkpoint (gated or not); the numbers describe the pair at the
end of its training, not the gate's history during it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from imkd_deploy.data.loader import NuScenesDrive
from imkd_deploy.distill.checkpoint import load_model
from imkd_deploy.distill.dataset import FrameDataset, collate, student_args, teacher_args
from imkd_deploy.distill.losses import (dense_regression_targets, per_output_l1, regression_maps, response_distill_loss,
                                       teacher_wins, teacher_wins_box)
from imkd_deploy.model.head import HEAD_OUTPUTS


def gate_share(student, teacher, dataset: FrameDataset, indices) -> dict[str, dict[str, float]]:
    """Per head output, and for the whole box ("box"): the teacher's winning share of the GT
    weight and both GT-weighted L1s."""
    cfg = dataset.cfg
    names = [*HEAD_OUTPUTS, "box"]
    sums = np.zeros((3, len(names)))
    heat = np.zeros(4)           # the heatmap term gated, ungated; GT-weighted |p - H| of the teacher, the student
    total = 0.0
    with torch.no_grad():
        for i in indices:
            batch = collate([dataset[i]], cfg)
            s_out, t_out = student.forward_train(*student_args(batch)), teacher.forward_train(*teacher_args(batch))
            h = batch["heatmap"]
            heat += [float(response_distill_loss(s_out["heatmap"], t_out["heatmap"], 1, gt_heatmap=h)),
                     float(response_distill_loss(s_out["heatmap"], t_out["heatmap"], 1)),
                     *(float((h * (torch.sigmoid(o["heatmap"]) - h).abs()).sum() / h.sum().clamp_min(1e-9))
                       for o in (t_out, s_out))]
            s, t = regression_maps(s_out), regression_maps(t_out)
            gt = dense_regression_targets(batch["index"], batch["mask"], batch["reg"], *batch["heatmap"].shape[-2:])
            w = batch["heatmap"].amax(dim=1, keepdim=True)
            s_l1, t_l1 = per_output_l1(s, gt), per_output_l1(t, gt)
            box = (teacher_wins_box(s, t, gt), s_l1.sum(dim=1, keepdim=True), t_l1.sum(dim=1, keepdim=True))
            for k, per_output in enumerate((teacher_wins(s, t, gt), s_l1, t_l1)):
                sums[k] += (w * torch.cat([per_output, box[k]], dim=1)).sum(dim=(0, 2, 3)).numpy()
            total += float(w.sum())
    sums /= max(total, 1e-9)
    shares = {name: {"teacher_wins": sums[0, j], "student_l1": sums[1, j], "teacher_l1": sums[2, j]}
              for j, name in enumerate(names)}
    shares["heatmap"] = {"teacher_wins": heat[0] / max(heat[1], 1e-12), "student_l1": heat[3] / len(indices),
                         "teacher_l1": heat[2] / len(indices)}
    return shares


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, type=Path, help="student checkpoint (.safetensors)")
    p.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint it was distilled from")
    p.add_argument("--dataroot", required=True, type=Path, help="drive written by `imkd data synth`")
    p.add_argument("--version", default="v1.0-synth")
    p.add_argument("--split", default="val")
    p.add_argument("--samples", type=int, default=24, help="samples spread evenly over the split")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    student, ckpt = load_model(a.student)
    teacher, _ = load_model(a.teacher)
    cfg = ckpt.run_config.model
    dataset = FrameDataset(NuScenesDrive(a.dataroot, a.version, cfg, split=a.split, load_lidar=True), cfg, "student")
    indices = np.linspace(0, len(dataset) - 1, min(a.samples, len(dataset))).round().astype(int)
    print(f"{a.student}: {len(indices)} {a.split} samples, GT-heatmap weighted")
    for name, r in gate_share(student, teacher, dataset, indices).items():
        what = "the gate keeps" if name == "heatmap" else "teacher closer on"
        print(f"  {name:7s} {what} {r['teacher_wins']:.0%} of the {'term' if name == 'heatmap' else 'weight'}; "
              f"L1 student {r['student_l1']:.3f}, teacher {r['teacher_l1']:.3f}")


if __name__ == "__main__":
    main()
