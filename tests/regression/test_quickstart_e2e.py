"""End to end, as a new user runs it: `imkd quickstart` (CI size), then a rerun that reuses
every step because nothing changed."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_runs_every_stage(quickstart_run):
    result, logs = quickstart_run
    names = list(result.steps)
    assert len(names) == 9
    assert any(line.startswith("[1/9]") and "running (no earlier run)" in line for line in logs)  # fresh workdir
    w = result.workdir
    for rel in ("drive/v1.0-mini/sample.json", "teacher/checkpoints/last.safetensors",
                "student/checkpoints/last.safetensors", "export/student_onnx.onnx", "export/student_tensorrt.onnx",
                "export/student_onnx.int8.onnx", "results/onnxruntime_int8.json", "bev.png", "summary.json"):
        assert (w / rel).is_file(), rel
    assert "build engine (tensorrt-rtx, INT8)" in result.steps      # CI installs the rtx extra
    assert (w / "engines" / "student_int8.engine").is_file()
    assert json.loads((w / "engines" / "student_int8.engine.json").read_text())["precision"] == "int8"
    rows = {(r["backend"], r["precision"]) for r in result.table}
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")} <= rows
    summary = json.loads((w / "summary.json").read_text())
    assert summary["table"] == json.loads(json.dumps(result.table))


def test_rerun_reuses_every_step(quickstart_run, ci_settings):
    from imkd_deploy.quickstart import run_quickstart

    first, _ = quickstart_run
    logs: list[str] = []
    t0 = time.perf_counter()
    again = run_quickstart(first.workdir, ci_settings, log=logs.append, progress=False)
    assert all(rec.reused for rec in again.steps.values()), logs
    assert sum("reused" in line for line in logs) == 9
    assert again.table == first.table
    assert time.perf_counter() - t0 < sum(r.seconds for r in first.steps.values())
