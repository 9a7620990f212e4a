from __future__ import annotations

import numpy as np
import onnx

from imkd_deploy.calibration.fp16 import convert_fp16
from imkd_deploy.calibration.quantize import make_session

FP16_REL_TOL = 2e-3      # relative L2 vs FP32; measured ~2e-5..4e-4 on this net


def test_fp16_keeps_io_and_sensitive_ops(small_onnx, tmp_path):
    out = tmp_path / "small.fp16.onnx"
    res = convert_fp16(small_onnx, out)
    model = onnx.load(str(out))
    g = model.graph
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in list(g.input) + list(g.output))
    conv_w = [t for t in g.initializer if t.dims and len(t.dims) == 4]
    assert conv_w and all(t.data_type == onnx.TensorProto.FLOAT16 for t in conv_w)
    kept = {n.op_type for n in g.node if n.name in res.fp32_nodes}
    assert {"Sigmoid", "ReduceMean"} <= kept
    assert {p.key: p.value for p in model.metadata_props}["imkd.precision"] == "fp16"
    a, b = make_session(small_onnx), make_session(out)
    feed = {"img": np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)}
    for x, y in zip(a.run(None, feed), b.run(None, feed)):
        assert y.dtype == np.float32
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        assert 0 < rel < FP16_REL_TOL


def test_fp16_keep_list_leaves_a_conv_in_fp32(small_onnx, tmp_path):
    model = onnx.load(str(small_onnx))
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    res = convert_fp16(small_onnx, tmp_path / "k.onnx", keep_fp32_nodes=(conv,))
    assert conv in res.fp32_nodes
    out = onnx.load(str(tmp_path / "k.onnx"))
    node = next(n for n in out.graph.node if n.name == conv)
    w = next(t for t in out.graph.initializer if t.name == node.input[1])
    assert w.data_type == onnx.TensorProto.FLOAT
    make_session(tmp_path / "k.onnx")   # the mixed graph is valid for ORT
