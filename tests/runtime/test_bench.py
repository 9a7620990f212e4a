"""`imkd bench`: interleaved backends, ratios from one run, latency gates."""

from __future__ import annotations

import json

import pytest

from imkd_deploy.data.loader import NuScenesDrive
from imkd_deploy.runtime.bench import append_log, check_gate, run_bench
from imkd_deploy.runtime.pipeline import Pipeline

VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def bench_setup(small_drive, random_student_checkpoint, tmp_path_factory):
    from imkd_deploy.export.onnx_export import export_checkpoint

    onnx_path = export_checkpoint(random_student_checkpoint, tmp_path_factory.mktemp("b") / "s.onnx", "onnx").path
    cfg = Pipeline.from_model(onnx_path).cfg
    drive = NuScenesDrive(small_drive, VERSION, cfg, split="mini_val")
    return {"torch": random_student_checkpoint, "onnxruntime": onnx_path}, [drive[0], drive[1]]


def test_backends_run_interleaved_on_the_same_frames(bench_setup, monkeypatch):
    models, frames = bench_setup
    order = []
    original = Pipeline.__call__

    def spy(self, frame):
        order.append((self.backend.name, frame.sample_token))
        return original(self, frame)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    res = run_bench(models, frames, warmup=1, rounds=2, progress=False)
    timed = order[2:]                                            # after one warm-up call each
    assert len(timed) == 2 * len(frames) * 2
    assert [b for b, _ in timed[:4]] == ["torch", "onnxruntime", "torch", "onnxruntime"]
    assert [t for _, t in timed[:2]] == [frames[0].sample_token] * 2
    assert res.ratios["torch"]["total"] == pytest.approx(1.0)
    for label in models:
        stats = res.latency[label]
        assert 0 < stats["network"]["min"] <= stats["network"]["p50"] <= stats["network"]["p99"]
        assert 0 < res.shares[label]["runtime_overhead"] < 1
    assert 0 < res.shares["torch"]["bevpool_of_network"] < 1


def test_gates_compare_ratios_and_fail_on_regression(bench_setup, tmp_path):
    models, frames = bench_setup
    res = run_bench(models, frames[:1], warmup=0, rounds=1, progress=False)
    measured = res.latency["onnxruntime"]["network"]["p50"] / res.latency["torch"]["network"]["p50"]
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"latency_gates": [
        {"name": "ort/torch network, generous", "backend": "onnxruntime", "reference": "torch", "stage": "network",
         "ratio": measured * 2, "margin": 0.1},
        {"name": "ort/torch network, impossible", "backend": "onnxruntime", "reference": "torch", "stage": "network",
         "ratio": measured / 10, "margin": 0.1},
        {"name": "not run", "backend": "tensorrt", "reference": "torch", "stage": "network", "ratio": 0.1, "margin": 0.1},
        {"name": "overhead", "backend": "onnxruntime", "stage": "runtime_overhead", "ratio": 1.0, "margin": 0.0},
    ]}))
    gate = check_gate(res, baselines)
    assert [r["status"] for r in gate["rows"]] == ["PASSED", "FAILED", "SKIPPED", "PASSED"]
    assert not gate["passed"]
    log = tmp_path / "log.jsonl"
    append_log(res, log)
    append_log(res, log)
    assert len(log.read_text().splitlines()) == 2
