"""TensorRT-RTX builds engines on this CPU (no GPU): FP32 and INT8 Q/DQ, with sidecars."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from imkd_deploy.engines.builder import BuildSettings, build_engine, dry_run, network_from_onnx, parse_profile
from imkd_deploy.engines.sidecar import read_sidecar
from imkd_deploy.errors import UserError
from imkd_deploy.export.metadata import file_sha256

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (the rtx extra) is not installed")

PROFILE = {"img": ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))}


def test_fp32_engine_with_dynamic_batch(small_onnx, tmp_path):
    out = tmp_path / "small.engine"
    res = build_engine(small_onnx, out, BuildSettings(profiles=PROFILE, workspace_mb=256))
    assert out.stat().st_size == res.size_bytes > 10_000
    side = read_sidecar(out)
    assert side.flavour == "tensorrt-rtx" and side.trt_version.startswith("1.")
    assert side.precision == "fp32" and side.onnx_sha256 == file_sha256(small_onnx)
    assert side.engine_sha256 == file_sha256(out)
    assert side.profiles == {"img": [[1, 3, 32, 32], [2, 3, 32, 32], [4, 3, 32, 32]]}
    assert side.compute_capabilities == ["8.0", "8.6", "8.9", "12.0", "12.1"]
    assert side.build["workspace_mb"] == 256
    text = res.summary()
    assert "next: imkd infer --model" in text and "MB" in text and "timing cache: not used" in text


def test_int8_qdq_engine(int8_onnx, tmp_path):
    parsed = network_from_onnx(int8_onnx)
    kinds = {str(parsed.network.get_layer(i).type) for i in range(parsed.network.num_layers)}
    assert "LayerType.QUANTIZE" in kinds and "LayerType.DEQUANTIZE" in kinds
    out = tmp_path / "small.int8.engine"
    res = build_engine(int8_onnx, out, BuildSettings(profiles=PROFILE, compute_capabilities=("8.6",)))
    side = json.loads(res.sidecar_path.read_text())
    assert side["precision"] == "int8" and side["calibration_set_sha256"] == "ab" * 32
    assert side["compute_capabilities"] == ["8.6"] and res.compute_capabilities == ("8.6",)


def test_rtx_timing_cache_is_skipped_not_faked(small_onnx, tmp_path):
    cache = tmp_path / "x.timing.cache"
    res = build_engine(small_onnx, tmp_path / "e.engine", BuildSettings(profiles=PROFILE, timing_cache=cache))
    assert res.timing_cache.startswith("skipped") and not cache.exists()


def test_bad_settings_are_caught_up_front(small_onnx, int8_onnx, tmp_path):
    with pytest.raises(UserError, match=r"dynamic inputs without an optimization profile: img \(-1, 3, 32, 32\)"):
        build_engine(small_onnx, tmp_path / "a.engine")
    with pytest.raises(UserError, match="does not match its ONNX shape"):
        build_engine(small_onnx, tmp_path / "a.engine", BuildSettings(profiles={"img": ((1, 3, 8, 8),) * 3}))
    with pytest.raises(UserError, match="inputs that small.onnx does not have"):
        build_engine(small_onnx, tmp_path / "a.engine", BuildSettings(profiles={"image": ((1, 3, 32, 32),) * 3}))
    with pytest.raises(UserError, match=r"cannot target compute capability 9.0 \(valid: 7.5, 8.0, .*Hopper.*--backend tensorrt"):
        build_engine(small_onnx, tmp_path / "a.engine", BuildSettings(profiles=PROFILE, compute_capabilities=("9.0",)))
    with pytest.raises(UserError, match="'current' cannot be combined with named targets"):
        build_engine(small_onnx, tmp_path / "a.engine", BuildSettings(profiles=PROFILE, compute_capabilities=("current", "8.6")))
    with pytest.raises(UserError, match="is a fp32 model but precision int8"):
        build_engine(small_onnx, tmp_path / "a.engine", BuildSettings(profiles=PROFILE, precision="int8"))
    with pytest.raises(UserError, match="min <= opt <= max"):
        BuildSettings(profiles={"img": ((4, 3, 32, 32), (1, 3, 32, 32), (8, 3, 32, 32))}).validate()
    with pytest.raises(UserError, match="unknown TensorRT backend 'tensorrt_lite'"):
        BuildSettings(backend="tensorrt_lite").validate()
    assert not list(tmp_path.glob("a.engine*"))


def test_parse_profile():
    assert parse_profile("img:1x3x16x16:2x3x16x16:8x3x16x16") == ("img", ((1, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16)))
    with pytest.raises(UserError):
        parse_profile("img:1x3:2x3")


def _plugin_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Widget", ["r"], ["y"], name="widget0", domain="imkd",
                              plugin_namespace="imkd", plugin_version="1")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("imkd", 1)])
    onnx.save(model, path)
    return path


def test_dry_run_reports_coverage_and_plugins(small_onnx, tmp_path):
    rep = dry_run(small_onnx)
    assert rep.parse_ok and rep.unsupported_ops == [] and rep.plugin_nodes == []
    assert rep.op_counts["Conv"] == 4 and rep.op_counts["Sigmoid"] == 1
    rep = dry_run(_plugin_model(tmp_path / "p.onnx"))
    assert rep.plugin_nodes == [("widget0", "imkd::Widget", False)]
    assert rep.parse_ok is False and any("--ops tensorrt" in e for e in rep.parse_errors)
    assert "needs plugin: widget0 (imkd::Widget) creator MISSING" in rep.summary()


def test_rtx_refuses_plugin_nodes_instead_of_aborting(tmp_path):
    """TensorRT-RTX 1.7 std::terminate()s in its ONNX parser after creating a Python plugin."""
    with pytest.raises(UserError, match=r"imkd::Widget.*cannot build plugin layers.*--ops tensorrt"):
        build_engine(_plugin_model(tmp_path / "p.onnx"), tmp_path / "p.engine")
    assert not (tmp_path / "p.engine").exists()


def _onnx_runtime_lowering_model(path, node):
    """y = node(x) with the float64 prefix sum or the scatter-add that --ops onnx forms hold."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    idx = helper.make_tensor("idx", TensorProto.INT64, [4, 1], [0, 1, 1, 2])
    nodes = {
        "cast": [helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
                 helper.make_node("CumSum", ["x64", "axis"], ["c"], name="prefix"),
                 helper.make_node("Cast", ["c"], ["y"], name="to_float", to=TensorProto.FLOAT)],
        "scatter": [helper.make_node("ScatterND", ["x", "idx", "x"], ["y"], name="scatter_add", reduction="add")],
    }[node]
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
                              initializer=[idx, axis])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("node, what", [("cast", "a Cast to float64 \\(node 'to_double'\\)"),
                                        ("scatter", "ScatterND\\(reduction='add'\\) \\(node 'scatter_add'\\)")])
def test_onnx_runtime_lowering_is_refused_with_the_export_to_use(tmp_path, node, what):
    path = _onnx_runtime_lowering_model(tmp_path / f"{node}.onnx", node)
    with pytest.raises(UserError, match=f"{what}.*cannot run.*--ops onnx.*--ops tensorrt"):
        build_engine(path, tmp_path / "e.engine")
    rep = dry_run(path)
    assert rep.parse_ok is False and any("--ops tensorrt" in e for e in rep.parse_errors)
    assert not (tmp_path / "e.engine").exists()


def test_current_target_needs_a_visible_gpu(small_onnx, tmp_path):
    from imkd_deploy.engines.sidecar import current_compute_capability

    if current_compute_capability() is not None:
        pytest.skip("checks the no-GPU message; this machine has a GPU (the GPU form is in tests/runtime)")
    with pytest.raises(UserError, match="'current' needs a visible CUDA GPU at build time .* --compute-capability 8.6"):
        build_engine(small_onnx, tmp_path / "a.engine", BuildSettings(profiles=PROFILE, compute_capabilities=("current",)))
    assert not list(tmp_path.glob("a.engine*"))


def test_cli_error_keeps_the_install_extra(small_onnx, tmp_path):
    """rich reads [tensorrt] as markup: an unescaped message told users to pip install imkd-deploy."""
    import importlib.util

    from typer.testing import CliRunner

    from imkd_deploy.cli import app

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("NVIDIA TensorRT is installed here, so the missing-flavour error does not arise")
    result = CliRunner().invoke(app, ["build-engine", "--model", str(small_onnx), "--backend", "tensorrt",
                                      "--out", str(tmp_path / "a.engine")])
    assert result.exit_code == 2
    assert "pip install 'imkd-deploy[tensorrt]'" in result.output.replace("\n", " ")
