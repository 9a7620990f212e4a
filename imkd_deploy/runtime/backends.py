"""Network backends behind one interface: numpy inputs by name in, numpy head maps out.

Each backend is constructed from its artifact (checkpoint, ONNX file, engine) and knows
nothing about frames or boxes; the Pipeline owns pre- and post-processing. Heavy imports
(onnxruntime, TensorRT) happen inside the constructors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from imkd_deploy.errors import UserError

INPUT_NAMES = ("images", "ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths",
               "radar_pillars", "radar_coords")
OUTPUT_NAMES = ("heatmap", "offset", "height", "dims", "rot", "vel")


class Backend(Protocol):
    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...


class TorchBackend:
    """The trained network itself (eval mode, no grad): the FP32 reference of every parity check."""

    def __init__(self, model, device: str = "cpu"):
        import torch

        self.name = "torch"
        self.model = model.to(device).eval()
        self.device = device
        self._torch = torch

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, device: str | None = None) -> "TorchBackend":
        """``device`` None: distill.checkpoint.default_device(), as `imkd eval --checkpoint` decodes."""
        from imkd_deploy.distill.checkpoint import default_device, load_model

        device = device or default_device()
        model, ckpt = load_model(checkpoint, device)
        if ckpt.role != "student":
            raise UserError(f"{checkpoint} holds a {ckpt.role}; inference runs the camera+radar student")
        backend = cls(model, device)
        backend.config = ckpt.run_config.model
        return backend

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.require(inputs[n], requirements=("C", "W"))).to(self.device) for n in INPUT_NAMES]
        with torch.inference_mode():
            out = self.model(*args)
        return {k: out[k].float().cpu().numpy() for k in OUTPUT_NAMES}


def onnx_uses_imkd_ops(model_proto) -> bool:
    return any(node.domain == "imkd" for node in model_proto.graph.node)


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (or CUDA EP when onnxruntime-gpu is installed and asked for).

    imkd-domain nodes (``--ops plugin`` exports) run on the numpy kernels registered through
    onnxruntime-extensions; ``--ops onnx`` exports need nothing extra and are the fast path.
    """

    def __init__(self, onnx_path: Path, providers: list[str] | None = None, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise UserError(f"ONNX model {onnx_path} does not exist")
        try:
            proto = onnx.load(str(onnx_path), load_external_data=False)
        except Exception as exc:
            raise UserError(f"{onnx_path} is not a readable ONNX model, truncated or corrupt "
                            f"({type(exc).__name__}); re-run imkd export") from None
        if len(proto.graph.node) == 0:
            raise UserError(f"{onnx_path} holds an empty graph; re-run imkd export")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if onnx_uses_imkd_ops(proto):
            from imkd_deploy.ops import register_ort_kernels

            register_ort_kernels(options)
        available = ort.get_available_providers()
        providers = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:
            raise UserError(f"ONNX Runtime cannot load {onnx_path}: {str(exc).splitlines()[0]}") from None
        self.name = "onnxruntime"
        self.path = onnx_path
        self.providers = self.session.get_providers()
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in INPUT_NAMES if n not in self._inputs]
        if missing:
            raise UserError(f"{onnx_path} lacks the inputs {missing}: not an imkd student export")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, meta in self._inputs.items():
            arr = inputs[name]
            want = np.int64 if "int64" in meta.type else np.int32 if "int32" in meta.type else np.float32
            feed[name] = np.ascontiguousarray(arr, dtype=want)
        values = self.session.run(self._outputs, feed)
        return dict(zip(self._outputs, values))
