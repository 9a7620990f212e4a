"""Latency gates on the robust CPU ratios (CI): one interleaved `imkd bench` run of the
CI-size quickstart's models, compared with benchmarks/baselines.json as ratios only."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_cpu_ratio_gates_pass(quickstart_run, monkeypatch):
    import torch

    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.runtime.bench import check_gate, run_bench
    from imkd_deploy.runtime.pipeline import Pipeline

    # The baselines are CPU ratios; on a GPU machine the torch backend would run on CUDA
    # (seen on an H100: the ORT/torch network gate failed there)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    baselines = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines.json"
    result, _ = quickstart_run
    w = result.workdir
    models = {"torch": w / "student" / "checkpoints" / "last.safetensors",
              "onnxruntime": w / "export" / "student_onnx.onnx",
              "onnxruntime-int8": w / "export" / "student_onnx.int8.onnx"}
    cfg = Pipeline.from_model(models["onnxruntime"]).cfg
    drive = NuScenesDrive(w / "drive", "v1.0-mini", cfg, split="mini_val")
    res = run_bench(models, [drive[i] for i in range(0, len(drive), 3)], warmup=1, rounds=2, progress=False, threads=1)
    gate = check_gate(res, baselines)
    assert [r["status"] for r in gate["rows"]] == ["PASSED"] * len(gate["rows"]), gate["rows"]
