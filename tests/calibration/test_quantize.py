"""INT8 Q/DQ: TensorRT-style settings, FP32 head, and agreement with FP32 in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from imkd_deploy.calibration.quantize import QuantizeSettings, make_session, quantize_int8
from imkd_deploy.errors import UserError

# Relative L2 error vs FP32 on held-out frames, per output (measured ~1e-3 for this net).
INT8_REL_TOL = 0.02


def _rel_errors(fp32_path, q_path, feeds):
    a, b = make_session(fp32_path), make_session(q_path)
    errs = np.zeros(len(a.get_outputs()))
    for feed in feeds:
        for k, (x, y) in enumerate(zip(a.run(None, feed), b.run(None, feed))):
            errs[k] = max(errs[k], np.linalg.norm(x - y) / np.linalg.norm(x))
    return errs


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_agrees_with_fp32(small_onnx, calib_feeds, tmp_path, method):
    out = tmp_path / f"small.{method}.onnx"
    res = quantize_int8(small_onnx, calib_feeds[:4], out, QuantizeSettings(method=method))
    rng = np.random.default_rng(7)
    held_out = [{"img": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    errs = _rel_errors(small_onnx, out, held_out)
    assert errs.max() < INT8_REL_TOL, errs
    assert errs.max() > 0                                       # it really is quantized
    assert len(res.quantized_nodes) == 3


def test_qdq_layout_is_tensorrt_friendly(int8_model):
    model = onnx.load(str(int8_model))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    q_nodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert q_nodes
    for q in q_nodes:                                          # symmetric int8 activations
        zp = numpy_helper.to_array(inits[q.input[2]])
        assert zp.dtype == np.int8 and np.all(zp == 0)
    convs = [n for n in g.node if n.op_type == "Conv"]
    producers = {o: n for n in g.node for o in n.output}
    quantized, fp32 = [], []
    for conv in convs:
        w = producers.get(conv.input[1])
        (quantized if w is not None and w.op_type == "DequantizeLinear" else fp32).append(conv)
        if len(conv.input) > 2 and conv.input[2]:              # bias never quantized
            assert conv.input[2] in inits and inits[conv.input[2]].data_type == onnx.TensorProto.FLOAT
    assert len(quantized) == 3 and len(fp32) == 1             # the head conv stays FP32
    for conv in quantized:                                     # per-channel weights
        scale = numpy_helper.to_array(inits[producers[conv.input[1]].input[1]])
        assert scale.ndim == 1 and scale.size == numpy_helper.to_array(inits[producers[conv.input[1]].input[0]]).shape[0]
    # no output quantization: no conv output feeds a QuantizeLinear directly
    conv_outputs = {o for c in convs for o in c.output}
    assert not [q for q in q_nodes if q.input[0] in conv_outputs]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["imkd.precision"] == "int8" and meta["imkd.calibration_set_sha256"] == "cd" * 32


@pytest.fixture(scope="module")
def int8_model(small_onnx, calib_feeds, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "small.int8.onnx"
    quantize_int8(small_onnx, calib_feeds[:4], out, QuantizeSettings(method="minmax"), set_sha256="cd" * 32)
    return out


def test_exclusions_by_name_and_type(small_onnx, calib_feeds, tmp_path):
    model = onnx.load(str(small_onnx))
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    res = quantize_int8(small_onnx, calib_feeds[:2], tmp_path / "a.onnx",
                        QuantizeSettings(method="minmax", exclude_nodes=(first_conv,)))
    assert first_conv in res.excluded_nodes and len(res.quantized_nodes) == 2
    res = quantize_int8(small_onnx, calib_feeds[:2], tmp_path / "b.onnx",
                        QuantizeSettings(method="minmax", exclude_op_types=("Conv",)))
    assert res.quantized_nodes == []
    with pytest.raises(UserError, match="does not have"):
        quantize_int8(small_onnx, calib_feeds[:2], tmp_path / "c.onnx", QuantizeSettings(exclude_nodes=("nope",)))


def test_calibration_session_runs_imkd_ops(tmp_path):
    """A model with an imkd::IntensityFusion node calibrates (the calibrator registers the kernels)."""
    from onnx import TensorProto, helper

    cc, cr, co, hw = 4, 3, 5, 6
    rng = np.random.default_rng(0)
    weights = {"gate_w": rng.standard_normal((1, cc + cr + 1)), "gate_b": rng.standard_normal(1),
               "out_w": rng.standard_normal((co, cc + cr)), "out_b": rng.standard_normal(co),
               "cw": rng.standard_normal((cc, cc, 3, 3)) * 0.2}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Conv", ["cam", "cw"], ["cam_f"], name="cam_conv", pads=[1, 1, 1, 1]),
        helper.make_node("IntensityFusion", ["cam_f", "radar", "inten", "gate_w", "gate_b", "out_w", "out_b"], ["fused"],
                         name="fusion_node", domain="imkd", plugin_namespace="imkd", plugin_version="1"),
    ]
    shp = lambda c: [1, c, hw, hw]  # noqa: E731
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cam", TensorProto.FLOAT, shp(cc)),
                                           helper.make_tensor_value_info("radar", TensorProto.FLOAT, shp(cr)),
                                           helper.make_tensor_value_info("inten", TensorProto.FLOAT, shp(1))],
                              [helper.make_tensor_value_info("fused", TensorProto.FLOAT, shp(co))], inits,
                              value_info=[helper.make_tensor_value_info("cam_f", TensorProto.FLOAT, shp(cc))])
    # IR 10 is what ONNX Runtime >= 1.20 loads; a newer onnx would stamp its own latest IR (seen: 14 vs ORT 1.30's 13)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("imkd", 1)], ir_version=10)
    src = tmp_path / "fusion.onnx"
    onnx.save(model, src)
    feeds = [{"cam": rng.standard_normal(shp(cc)).astype(np.float32), "radar": rng.standard_normal(shp(cr)).astype(np.float32),
              "inten": rng.random(shp(1)).astype(np.float32)} for _ in range(4)]
    res = quantize_int8(src, feeds, tmp_path / "fusion.int8.onnx", QuantizeSettings(method="minmax"))
    assert res.quantized_nodes == ["cam_conv"] and "fusion_node" in res.excluded_nodes
    errs = _rel_errors(src, tmp_path / "fusion.int8.onnx", feeds)
    assert errs.max() < INT8_REL_TOL
