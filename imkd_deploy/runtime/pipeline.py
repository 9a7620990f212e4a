"""The C-free inference pipeline: preprocess -> backend -> decode -> global-frame boxes.

``Pipeline.from_model(path)`` picks the backend from the artifact: a checkpoint
(.safetensors) runs in torch, an .onnx in ONNX Runtime, an .engine in TensorRT. The model
config comes from the artifact itself (checkpoint run config, ONNX/engine metadata), so the
runtime never guesses a size. Every call records per-stage wall times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imkd_deploy.config import ModelConfig
from imkd_deploy.data.frame import Frame
from imkd_deploy.errors import UserError
from imkd_deploy.runtime.backends import Backend, OnnxRuntimeBackend, TorchBackend
from imkd_deploy.runtime.boxes import submission_entries
from imkd_deploy.runtime.decode import Detections, decode
from imkd_deploy.runtime.preprocess import preprocess

STAGES = ("preprocess", "network", "decode")


@dataclass
class FrameResult:
    sample_token: str
    detections: Detections
    entries: list[dict]
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage


class Pipeline:
    def __init__(self, backend: Backend, cfg: ModelConfig, *, score_threshold: float = 0.05, max_boxes: int = 500,
                 max_interval: int | None = None):
        self.backend = backend
        self.cfg = cfg
        # --ops tensorrt models sum BEVPool intervals up to this many points (export metadata)
        self.max_interval = max_interval or getattr(backend, "max_interval", None)
        self.score_threshold = score_threshold
        self.max_boxes = max_boxes

    @classmethod
    def from_model(cls, model: Path, *, backend: str | None = None, threads: int | None = None, **kwargs) -> "Pipeline":
        model = Path(model)
        if not model.exists():
            raise UserError(f"model {model} does not exist")
        kind = backend or {".onnx": "onnxruntime", ".engine": "tensorrt"}.get(model.suffix, "torch")
        if kind == "torch":
            be = TorchBackend.from_checkpoint(model)
            return cls(be, be.config, **kwargs)
        if kind == "onnxruntime":
            from imkd_deploy.export.metadata import read_metadata

            meta = read_metadata(model)
            return cls(OnnxRuntimeBackend(model, threads=threads), ModelConfig.from_dict(meta["config"]),
                       max_interval=meta.get("bevpool_max_interval"), **kwargs)
        if kind == "tensorrt":
            from imkd_deploy.runtime.trt_backend import TensorRTBackend

            be = TensorRTBackend(model)
            return cls(be, be.config, **kwargs)
        raise UserError(f"unknown backend '{kind}' (torch|onnxruntime|tensorrt)")

    def __call__(self, frame: Frame) -> FrameResult:
        t0 = time.perf_counter()
        pre = preprocess(frame, self.cfg)
        if self.max_interval is not None:
            longest = int(pre.inputs["interval_lengths"].max(initial=0))
            if longest > self.max_interval:
                raise UserError(
                    f"frame {frame.sample_token}: this camera rig puts {longest} frustum points into one BEV cell, "
                    f"but the model was exported with --ops tensorrt for at most {self.max_interval}; re-export it "
                    "with --dataroot pointing at a drive recorded with this rig")
        t1 = time.perf_counter()
        outputs = self.backend.run(pre.inputs)
        t2 = time.perf_counter()
        det = decode(outputs, self.cfg.grid, score_threshold=self.score_threshold, max_boxes=self.max_boxes)[0]
        entries = submission_entries(frame.sample_token, det, frame.ego2global)
        t3 = time.perf_counter()
        return FrameResult(frame.sample_token, det, entries,
                           {"preprocess": t1 - t0, "network": t2 - t1, "decode": t3 - t2})


def latency_table(timings: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per stage (and total): min, p50, p90, p99 and mean, in milliseconds."""
    table = {}
    if not timings:
        return table
    for stage in (*STAGES, "total"):
        if stage == "total":
            ms = np.array([sum(t[s] for s in STAGES) for t in timings]) * 1e3
        else:
            ms = np.array([t[stage] for t in timings]) * 1e3
        table[stage] = {"min": float(ms.min()), "p50": float(np.percentile(ms, 50)),
                        "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
                        "mean": float(ms.mean())}
    return table
