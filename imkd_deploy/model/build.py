"""Model constructors from the config: the one place that maps a config to a network."""

from __future__ import annotations

from imkd_deploy.config import DistillConfig, ModelConfig
from imkd_deploy.model.student import StudentNet
from imkd_deploy.model.teacher import TeacherNet

ROLES = ("teacher", "student")


def build_student(cfg: ModelConfig, distill: DistillConfig | None = None) -> StudentNet:
    use_intensity = True if distill is None else distill.intensity_fusion
    return StudentNet(cfg, use_intensity=use_intensity)


def build_teacher(cfg: ModelConfig) -> TeacherNet:
    return TeacherNet(cfg)


def build_model(role: str, cfg: ModelConfig, distill: DistillConfig | None = None):
    if role == "student":
        return build_student(cfg, distill)
    if role == "teacher":
        return build_teacher(cfg)
    raise ValueError(f"unknown model role '{role}' ({'|'.join(ROLES)})")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
