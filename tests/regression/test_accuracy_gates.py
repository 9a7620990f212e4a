"""Accuracy gates (CI): the CI-size quickstart's student on the fixed synthetic mini_val, at
FP32 (torch, ONNX Runtime) and INT8 (ONNX Runtime), each within tolerance of its baseline in
benchmarks/baselines.json (whose "history" records every intentional change), and backend
parity on real frames."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

ROWS = {("torch", "fp32"): "torch_fp32", ("onnxruntime", "fp32"): "onnxruntime_fp32",
        ("onnxruntime", "int8"): "onnxruntime_int8"}


@pytest.mark.parametrize("row", sorted(ROWS.values()))
def test_nds_and_map_within_baseline(quickstart_run, baselines, row):
    result, _ = quickstart_run
    acc = baselines["accuracy"]
    measured = {ROWS[(r["backend"], r["precision"])]: r for r in result.table if (r["backend"], r["precision"]) in ROWS}
    base = acc["baselines"][row]
    got = measured[row]
    assert abs(got["nds"] - base["nds"]) <= acc["tolerance"]["nds"], (row, got["nds"], base["nds"])
    assert abs(got["map"] - base["map"]) <= acc["tolerance"]["map"], (row, got["map"], base["map"])


def test_int8_costs_at_most_the_budget(quickstart_run, baselines):
    result, _ = quickstart_run
    by = {(r["backend"], r["precision"]): r for r in result.table}
    drop = by[("onnxruntime", "fp32")]["nds"] - by[("onnxruntime", "int8")]["nds"]
    assert drop <= baselines["accuracy"]["int8_nds_budget"], drop


def test_backend_parity_on_real_frames(quickstart_run, baselines):
    """ORT FP32 (both exports) vs torch, element-wise, on a frame of the drive."""
    from pathlib import Path

    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.evaluation.parity import compare_outputs
    from imkd_deploy.runtime.backends import OUTPUT_NAMES, OnnxRuntimeBackend, TorchBackend
    from imkd_deploy.runtime.preprocess import preprocess

    result, _ = quickstart_run
    w = result.workdir
    # the FP32 reference on the CPU: CUDA would run its convolutions in TF32
    torch_be = TorchBackend.from_checkpoint(w / "student" / "checkpoints" / "last.safetensors", device="cpu")
    drive = NuScenesDrive(w / "drive", "v1.0-mini", torch_be.config, split="mini_val")
    tol = baselines["parity"]
    for i in (0, len(drive) - 1):
        inputs = preprocess(drive[i], torch_be.config).inputs
        ref = torch_be.run(inputs)
        for name in ("student_onnx.onnx", "student_tensorrt.onnx"):
            rows = compare_outputs(OnnxRuntimeBackend(Path(w / "export" / name)).run(inputs), ref,
                                   atol=tol["fp32_atol"], rtol=tol["fp32_rtol"], names=list(OUTPUT_NAMES))
            assert all(r.passed for r in rows), [r.line() for r in rows]
        # INT8 is not element-wise exact: bound the mean logit error of the heatmap instead
        int8 = compare_outputs(OnnxRuntimeBackend(w / "export" / "student_onnx.int8.onnx").run(inputs), ref,
                               names=["heatmap"])
        assert int8[0].mean_abs <= tol["int8_heatmap_mean_abs"], int8[0].line()
