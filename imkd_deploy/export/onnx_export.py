"""torch -> ONNX for the deployed student, with the imkd custom ops in either form.

``--ops plugin`` keeps imkd::BEVPool / imkd::IntensityFusion as single nodes (TensorRT
plugins, ORT Python kernels); ``--ops onnx`` lowers them to standard ops (the fast ORT CPU
path, and the engine path where plugins are unavailable). The dynamo exporter is used
throughout: the legacy one lowers index_add wrongly (TOOLCHAIN.md).

The graph's inputs are the images, the BEVPool index arrays (dynamic lengths: they depend
on the rig's calibration and are computed outside the engine) and the radar pillars
(dynamic count). Its outputs are the raw head maps; decoding stays in the runtime.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import imkd_deploy
from imkd_deploy.config import CLASS_NAMES, ModelConfig
from imkd_deploy.errors import UserError
from imkd_deploy.evaluation.parity import OutputComparison, all_passed, compare_outputs
from imkd_deploy.atomic import atomic_write_text
from imkd_deploy.export.metadata import embed, file_sha256, sidecar_path
from imkd_deploy.runtime.backends import INPUT_NAMES, OUTPUT_NAMES, OnnxRuntimeBackend, TorchBackend

OPSET = 18
OPS_MODES = ("plugin", "onnx", "tensorrt")
# FP32 parity of an export against torch (max abs, plus PARITY_RTOL of the reference). A trained
# round-19 student differs by at most 7e-6 in every ops mode. (Once 2e-3, for errors up to 1.3e-3
# at a few cells: ScatterND(add) losing updates across ORT threads, gone with the CumSum lowering.)
PARITY_ATOL, PARITY_RTOL = 1e-4, 1e-3
# --ops tensorrt sums BEVPool intervals with a fixed number of doubling steps: sized for this
# many times the export rig's longest interval, so other rigs of the same kind fit too.
SCAN_MARGIN = 4


class _ExportWrapper(nn.Module):
    """Named positional inputs, tuple outputs in OUTPUT_NAMES order (ONNX output names)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                radar_pillars, radar_coords):
        out = self.net(images, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                       radar_pillars, radar_coords)
        return tuple(out[k] for k in OUTPUT_NAMES)


def example_inputs(cfg: ModelConfig, frame=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch-1 network inputs: from a real frame when given, else a nuScenes-like rig with
    random images and a few hundred random radar points (enough to exercise every op)."""
    from imkd_deploy.runtime.preprocess import preprocess

    if frame is None:
        from imkd_deploy.data.frame import Frame
        from imkd_deploy.ops.bev_pool import example_rig

        rng = np.random.default_rng(seed)
        intr, c2e, aug = example_rig(cfg)
        h, w = cfg.image_size
        g = cfg.grid
        m = 300
        radar = np.stack([
            rng.uniform(g.x_range[0], g.x_range[1], m), rng.uniform(g.y_range[0], g.y_range[1], m),
            rng.uniform(-1.0, 2.0, m), rng.uniform(-10, 30, m), rng.normal(0, 5, m), rng.normal(0, 5, m),
            rng.uniform(0, 0.5, m)], axis=1).astype(np.float32)
        frame = Frame(
            sample_token="example", scene_name="example", timestamp=0,
            images=rng.integers(0, 256, (cfg.num_cams, h, w, 3), dtype=np.uint8),
            intrinsics=intr, cam2ego=c2e, ego2global=np.eye(4), img_aug=aug,
            radar_points=radar, lidar_points=None,
            gt_boxes=np.zeros((0, 9), np.float32), gt_labels=np.zeros(0, np.int64),
        )
    return preprocess(frame, cfg).inputs


def _dynamic_shapes() -> dict:
    from torch.export import Dim

    n_points = Dim("n_points", min=2)
    n_intervals = Dim("n_intervals", min=2)
    n_pillars = Dim("n_pillars", min=2)
    return {
        "images": None,
        "ranks_depth": {0: n_points}, "ranks_feat": {0: n_points}, "ranks_bev": {0: n_points},
        "interval_starts": {0: n_intervals}, "interval_lengths": {0: n_intervals},
        "radar_pillars": {0: n_pillars}, "radar_coords": {0: n_pillars},
    }


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    metadata: dict
    seconds: float
    size_bytes: int
    parity: list[OutputComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all_passed(self.parity)


def build_metadata(cfg: ModelConfig, ops: str, checkpoint_hash: str | None, opset: int) -> dict:
    return {
        "format": "imkd-onnx-1",
        "imkd_version": imkd_deploy.__version__,
        "torch_version": torch.__version__,
        "config": cfg.to_dict(),
        "class_names": list(CLASS_NAMES),
        "bev_grid": {**cfg.grid.to_dict(), "nx": cfg.grid.nx, "ny": cfg.grid.ny},
        "normalisation": {"mean": list(cfg.image_mean), "std": list(cfg.image_std), "input": "RGB uint8 0..255"},
        "checkpoint_sha256": checkpoint_hash,
        "opset": opset,
        "ops": ops,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "precision": "fp32",
    }


def export_model(model: nn.Module, cfg: ModelConfig, out: Path, ops: str = "plugin", *,
                 checkpoint_hash: str | None = None, frame=None, opset: int = OPSET,
                 check: bool = True, atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL) -> ExportResult:
    """Export ``model`` (a StudentNet) to ``out``; then onnx.checker and a parity run vs torch."""
    import onnx

    if ops not in OPS_MODES:
        raise UserError(f"--ops must be one of {OPS_MODES}, got '{ops}'")
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"--out must end in .onnx, got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from imkd_deploy.ops import onnx_translation_table

    # the exporter lists every torchvision op it cannot find; we never use torchvision
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    model = model.eval()
    inputs = example_inputs(cfg, frame)
    args = tuple(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)
    max_interval = None
    if ops == "tensorrt":
        from imkd_deploy.ops.bev_pool import scan_steps

        max_interval = 2 ** scan_steps(SCAN_MARGIN * int(inputs["interval_lengths"].max()))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _ExportWrapper(model), args, dynamo=True, opset_version=opset,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_shapes=_dynamic_shapes(), custom_translation_table=onnx_translation_table(ops, max_interval),
            external_data=False, optimize=True, verbose=False,
        )
    proto = program.model_proto
    meta = build_metadata(cfg, ops, checkpoint_hash, opset)
    if max_interval is not None:
        meta["bevpool_max_interval"] = max_interval
    embed(proto, meta)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        if check:
            onnx.checker.check_model(str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    meta["onnx_sha256"] = file_sha256(out)
    side = sidecar_path(out)
    atomic_write_text(side, json.dumps(meta, indent=2, sort_keys=True))
    result = ExportResult(out, side, meta, time.perf_counter() - t0, out.stat().st_size)
    if check:
        ref = TorchBackend(model).run(inputs)
        got = OnnxRuntimeBackend(out).run(inputs)
        result.parity = compare_outputs(got, ref, atol=atol, rtol=rtol, names=list(OUTPUT_NAMES))
    return result


def export_checkpoint(checkpoint: Path, out: Path, ops: str = "plugin", *, dataroot: Path | None = None,
                      version: str = "v1.0-mini", check: bool = True, atol: float = PARITY_ATOL) -> ExportResult:
    """``imkd export``: the student in ``checkpoint``; parity on a real frame when a dataroot is given."""
    from imkd_deploy.distill.checkpoint import load_model

    model, ckpt = load_model(checkpoint)
    if ckpt.role != "student":
        raise UserError(f"{checkpoint} holds a {ckpt.role}; only the camera+radar student is deployed")
    cfg = ckpt.run_config.model
    frame = None
    if dataroot is not None:
        from imkd_deploy.data.loader import NuScenesDrive

        drive = NuScenesDrive(dataroot, version, cfg)
        frame = drive[0]
    return export_model(model, cfg, out, ops, checkpoint_hash=file_sha256(checkpoint), frame=frame,
                        check=check, atol=atol)
