"""ONNX export of the student: both ops modes, both presets, parity with torch element-wise."""

import json

import numpy as np
import onnx
import pytest
import torch

from imkd_deploy.config import nuscenes_r50, tiny
from imkd_deploy.errors import UserError
from imkd_deploy.evaluation.parity import all_passed, compare_outputs
from imkd_deploy.export.metadata import read_metadata
from imkd_deploy.export.onnx_export import example_inputs, export_model
from imkd_deploy.model.build import build_student
from imkd_deploy.ops.bev_pool import compute_geometry, example_rig
from imkd_deploy.runtime.backends import OUTPUT_NAMES, OnnxRuntimeBackend, TorchBackend


def _randomise_bn(model, seed=0):
    # fresh BatchNorm stats make every layer an identity-ish map; random stats exercise real numerics
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return _randomise_bn(build_student(tiny()))


def _other_rig_inputs(cfg):
    """Inputs from a different calibration: index arrays of another length than at export."""
    inputs = example_inputs(cfg, seed=1)
    intr, c2e, aug = example_rig(cfg)
    c2e = c2e.copy()
    c2e[:, 2, 3] += 0.4          # cameras mounted 40 cm higher
    intr = intr.copy()
    intr[:, 0, 0] *= 1.1
    g = compute_geometry(intr, c2e, aug, cfg)
    for name, arr in zip(("ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths"), g.arrays()):
        inputs[name] = np.asarray(arr, np.int32)
    return inputs


@pytest.mark.parametrize("ops", ["plugin", "onnx"])
def test_tiny_export_parity_and_metadata(tmp_path, tiny_model, ops):
    cfg = tiny()
    res = export_model(tiny_model, cfg, tmp_path / f"tiny_{ops}.onnx", ops, checkpoint_hash="abc")
    assert res.passed, [r.line() for r in res.parity]
    proto = onnx.load(str(res.path))
    domains = {n.domain for n in proto.graph.node}
    if ops == "plugin":
        plugin_nodes = [n for n in proto.graph.node if n.domain == "imkd"]
        assert {n.op_type for n in plugin_nodes} == {"BEVPool", "IntensityFusion"}
        for n in plugin_nodes:
            attrs = {a.name: a for a in n.attribute}
            assert attrs["plugin_namespace"].s == b"imkd"
    else:
        assert "imkd" not in domains
    meta = read_metadata(res.path)
    assert meta["ops"] == ops and meta["checkpoint_sha256"] == "abc"
    assert meta["bev_grid"]["nx"] == cfg.grid.nx and meta["config"]["image_size"] == list(cfg.image_size)
    embedded = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(embedded["imkd"])["ops"] == ops
    # dynamic index lengths: another rig's geometry runs through the same graph
    inputs = _other_rig_inputs(cfg)
    assert len(inputs["ranks_bev"]) != len(example_inputs(cfg)["ranks_bev"])
    ref = TorchBackend(tiny_model).run(inputs)
    got = OnnxRuntimeBackend(res.path).run(inputs)
    rows = compare_outputs(got, ref, atol=1e-4, rtol=1e-3, names=list(OUTPUT_NAMES))
    assert all_passed(rows), [r.line() for r in rows]
    assert np.abs(ref["heatmap"]).max() > 1e-3      # the comparison is not between two zero maps


@pytest.mark.slow
def test_nuscenes_r50_exports_at_batch_1(tmp_path):
    cfg = nuscenes_r50()
    torch.manual_seed(0)
    model = _randomise_bn(build_student(cfg))
    res = export_model(model, cfg, tmp_path / "r50.onnx", "onnx")
    assert res.passed, [r.line() for r in res.parity]
    ref = TorchBackend(model).run(example_inputs(cfg))
    assert ref["heatmap"].shape == (1, 10, 128, 128)


def test_corrupt_or_truncated_onnx_is_a_clear_error(tmp_path, tiny_model):
    res = export_model(tiny_model, tiny(), tmp_path / "m.onnx", "onnx", check=False)
    data = res.path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="truncated.onnx"):
        OnnxRuntimeBackend(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(UserError, match="garbage.onnx"):
        OnnxRuntimeBackend(garbage)
    with pytest.raises(UserError, match="does not exist"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")


def test_bad_ops_mode_and_suffix(tmp_path, tiny_model):
    with pytest.raises(UserError, match="--ops"):
        export_model(tiny_model, tiny(), tmp_path / "m.onnx", "trt")
    with pytest.raises(UserError, match=".onnx"):
        export_model(tiny_model, tiny(), tmp_path / "m.bin", "onnx")


def test_tensorrt_lowering_matches_torch_and_guards_its_bound(tmp_path, tiny_model):
    """--ops tensorrt: no scatter reductions, same numbers as torch on another rig; a rig with
    longer intervals than the export's bound is refused, not silently truncated."""
    from imkd_deploy.runtime.pipeline import Pipeline

    cfg = tiny()
    res = export_model(tiny_model, cfg, tmp_path / "trt.onnx", "tensorrt")
    assert res.passed, [r.line() for r in res.parity]
    proto = onnx.load(str(res.path))
    for node in proto.graph.node:
        if node.op_type.startswith("Scatter"):
            assert all(a.name != "reduction" or a.s == b"none" for a in node.attribute), node.name
    inputs = _other_rig_inputs(cfg)
    rows = compare_outputs(OnnxRuntimeBackend(res.path).run(inputs), TorchBackend(tiny_model).run(inputs),
                           atol=1e-4, rtol=1e-3, names=list(OUTPUT_NAMES))
    assert all_passed(rows), [r.line() for r in rows]
    bound = res.metadata["bevpool_max_interval"]
    pipe = Pipeline.from_model(res.path)
    assert pipe.max_interval == bound
    from imkd_deploy.data.frame import Frame
    from imkd_deploy.ops.bev_pool import example_rig

    intr, c2e, aug = example_rig(cfg)
    frame = Frame("tok", "scene", 0, np.zeros((cfg.num_cams, *cfg.image_size, 3), np.uint8), intr, c2e, np.eye(4), aug,
                  np.array([[5.0, 1.0, 0.5, 10.0, 0.0, 0.0, 0.0]], np.float32), None,
                  np.zeros((0, 9), np.float32), np.zeros(0, np.int64))
    pipe.max_interval = int(example_inputs(cfg)["interval_lengths"].max()) - 1   # as if the rig outgrew it
    with pytest.raises(UserError, match="re-export"):
        pipe(frame)
