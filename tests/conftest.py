"""Shared fixtures. Heavy ones (synthetic drives) are session-scoped and built once."""

from __future__ import annotations

import os

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
