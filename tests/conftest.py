"""Shared fixtures. Heavy ones (synthetic drives) are session-scoped and built once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Two cores: keep torch from oversubscribing when tests run beside ORT sessions.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always installed in dev
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with a CUDA driver (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def small_drive(tmp_path_factory):
    """3 scenes (2 mini_train, 1 mini_val) x 6 key frames at 400x225, written once per session.
    Read-only: a test that damages files works on a copy."""
    from imkd_deploy.data.synth import SynthConfig, write_drive

    root = tmp_path_factory.mktemp("drive") / "nus"
    write_drive(root, SynthConfig(version="v1.0-mini", num_scenes=3, samples_per_scene=6, image_width=400,
                                  image_height=225, seed=0))
    return root


@pytest.fixture(scope="session")
def random_student_checkpoint(tmp_path_factory):
    """An untrained tiny student saved as `imkd train` would (BatchNorm stats randomised, so
    outputs are far from the init biases and every backend has real numbers to agree on)."""
    import torch

    from imkd_deploy.config import RunConfig
    from imkd_deploy.distill.checkpoint import save_checkpoint
    from imkd_deploy.model.build import build_student

    torch.manual_seed(0)
    run = RunConfig()
    model = build_student(run.model, run.distill)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "student.safetensors"
    return save_checkpoint(path, role="student", step=0, run_config=run, model=model)


# the toy conv net (and its INT8 copy) shared by tests/calibration and tests/engines
from small_net import calib_feeds, int8_onnx, small_onnx  # noqa: E402,F401


@pytest.fixture
def in_own_process(request) -> bool:
    """Run the requesting test again in a fresh interpreter: True there, False here (return then).

    CPU bf16 autocast leaves process-wide state behind that moves later FP32 results: with the
    autocast tests in the same process, the ORT-vs-torch parity gate failed (max abs 6e-3)."""
    if os.environ.get("IMKD_IN_OWN_PROCESS") == "1":
        return True
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                       cwd=request.config.rootpath, env={**os.environ, "IMKD_IN_OWN_PROCESS": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return False
