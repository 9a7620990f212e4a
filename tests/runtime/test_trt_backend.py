"""TensorRT runtime backend: loading checks on a real TensorRT-RTX engine + sidecar built on this CPU,
the plugin shape logic, and (on a GPU machine) engine/ORT parity and the plugin kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from imkd_deploy.config import ModelConfig, tiny
from imkd_deploy.engines.builder import BuildSettings, build_engine
from imkd_deploy.engines.profiles import profiles_from_feeds
from imkd_deploy.engines.sidecar import read_sidecar, sidecar_path_for
from imkd_deploy.errors import CompatibilityError, UserError
from imkd_deploy.atomic import atomic_write_text
from imkd_deploy.export.metadata import embed, sidecar_path
from imkd_deploy.export.onnx_export import build_metadata, example_inputs, export_model
from imkd_deploy.ops.bev_pool import bev_pool_into, bev_pool_output_shape, bev_pool_reference
from imkd_deploy.ops.intensity_fusion import (
    intensity_fusion_output_shape,
    intensity_fusion_reference,
)
from imkd_deploy.runtime.trt_backend import (
    CudaDevice,
    TensorRTBackend,
    check_engine_loadable,
    engine_model_config,
    probe_device,
    runtime_flavour,
)

rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (the rtx extra) is not installed")
HAS_GPU = probe_device(0).compute_capability is not None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A real RTX engine + sidecar from a small ONNX carrying tiny()'s imkd export metadata."""
    root = tmp_path_factory.mktemp("trt")
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [1, 4, 8, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["images"], ["heatmap"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    meta = build_metadata(tiny(), "onnx", "cd" * 32, 18)
    embed(model, meta)
    onnx_path = root / "small.onnx"
    onnx.save(model, str(onnx_path))
    atomic_write_text(sidecar_path(onnx_path), json.dumps(meta))
    out = root / "small.engine"
    build_engine(onnx_path, out, BuildSettings(workspace_mb=64))
    return out


def _rewrite_sidecar(engine_path, tmp_path, **changes):
    """Copy the engine and its sidecar into tmp_path with sidecar fields changed."""
    dst = tmp_path / engine_path.name
    dst.write_bytes(engine_path.read_bytes())
    data = json.loads(sidecar_path_for(engine_path).read_text())
    data.update(changes)
    sidecar_path_for(dst).write_text(json.dumps(data))
    return dst


def test_sidecar_carries_the_model_config(engine, tmp_path):
    side = read_sidecar(engine)
    assert ModelConfig.from_dict(side.model_config) == tiny() and side.model_sha256 == "cd" * 32
    assert engine_model_config(engine) == tiny()
    # An older sidecar without the field: the source ONNX's metadata supplies it ...
    old = _rewrite_sidecar(engine, tmp_path, model_config=None)
    assert engine_model_config(old) == tiny()
    # ... and without the ONNX there is nothing to guess from.
    gone = _rewrite_sidecar(engine, tmp_path, model_config=None, onnx=str(tmp_path / "moved.onnx"))
    with pytest.raises(UserError, match="carries no model config and the source ONNX"):
        engine_model_config(gone)


def test_missing_engine_or_sidecar(engine, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TensorRTBackend(tmp_path / "nope.engine")
    lone = tmp_path / "lone.engine"
    lone.write_bytes(engine.read_bytes())
    with pytest.raises(UserError, match="no sidecar lone.engine.json"):
        TensorRTBackend(lone)


def test_flavour_mismatch_names_the_rebuild_command(engine, tmp_path):
    # Built "with full TensorRT", loaded where only RTX imports: report, do not crash in deserialize.
    other = _rewrite_sidecar(engine, tmp_path, flavour="tensorrt", trt_version="10.13.0.35")
    assert runtime_flavour(read_sidecar(other)).backend == "tensorrt-rtx"
    with pytest.raises(CompatibilityError) as err:
        TensorRTBackend(other)
    msg = str(err.value)
    assert "built with tensorrt, but this runtime is tensorrt-rtx" in msg
    assert "imkd build-engine --model" in msg and "--backend tensorrt-rtx" in msg


def test_version_mismatch(engine, tmp_path):
    old = _rewrite_sidecar(engine, tmp_path, trt_version="1.6.0.20")
    with pytest.raises(CompatibilityError, match=r"built with tensorrt-rtx 1\.6\.0\.20, but 1\.7"):
        TensorRTBackend(old)


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message; this machine has a GPU")
def test_no_gpu_is_a_clear_error(engine):
    with pytest.raises(UserError) as err:
        TensorRTBackend(engine)
    msg = str(err.value)
    assert "no CUDA driver/GPU (cudaErrorInsufficientDriver" in msg or "no CUDA driver/GPU (cudaErrorNoDevice" in msg
    assert "use the .onnx with onnxruntime here" in msg and "small.onnx" in msg


def test_gpu_checks_after_flavour(engine, tmp_path):
    """With a GPU described to it: the compute capability, then the engine bytes, are checked."""
    side, trt = read_sidecar(engine), runtime_flavour(read_sidecar(engine))
    with pytest.raises(CompatibilityError, match=r"targets compute capability 8\.0, .* but this GPU is 7\.5") as err:
        check_engine_loadable(engine, side, trt, CudaDevice(0, "7.5"))
    assert "--compute-capability 7.5" in str(err.value)
    # No RTX engine runs on a Hopper GPU (seen on an H100): say so instead of suggesting a rebuild
    with pytest.raises(CompatibilityError, match=r"does not run on this GPU \(compute capability 9\.0; it runs on 7\.5, "
                                                 r"8\.0.*\)\. Build the engine with NVIDIA TensorRT .*--backend tensorrt"):
        check_engine_loadable(engine, side, trt, CudaDevice(0, "9.0"))
    check_engine_loadable(engine, side, trt, CudaDevice(0, "8.6"))      # a matching GPU: no error
    tampered = _rewrite_sidecar(engine, tmp_path)
    tampered.write_bytes(engine.read_bytes()[:-1] + b"\0")
    with pytest.raises(CompatibilityError, match="does not match its sidecar"):
        check_engine_loadable(tampered, side, trt, CudaDevice(0, "8.6"))


# --------------------------------------------------------------------------- plugin shape logic
def test_bev_pool_plugin_shape_matches_the_op():
    depth, feat = torch.rand(2, 3, 4, 2, 5), torch.rand(2, 3, 2, 5, 7)
    ranks = torch.tensor([0, 9, 40], dtype=torch.int32)
    bev = torch.tensor([0, 13, 77], dtype=torch.int32)
    out = bev_pool_reference(depth, feat, ranks, ranks, bev, bev, torch.ones(3, dtype=torch.int32), 6, 8)
    assert bev_pool_output_shape(tuple(depth.shape), tuple(feat.shape), 6, 8) == tuple(out.shape) == (2, 7, 6, 8)
    into = torch.full_like(out, 5.0)
    bev_pool_into(depth, feat, ranks, ranks, bev, bev, torch.ones(3, dtype=torch.int32), into, 6, 8)
    assert torch.equal(into, out)                                       # overwrites, never accumulates
    with pytest.raises(ValueError, match="rank 5"):
        bev_pool_output_shape((2, 3, 4, 5), tuple(feat.shape), 6, 8)
    with pytest.raises(ValueError, match="ny, nx must be >= 1"):
        bev_pool_output_shape(tuple(depth.shape), tuple(feat.shape), 0, 8)


def test_intensity_fusion_plugin_shape_matches_the_op():
    args = (torch.rand(2, 5, 6, 7), torch.rand(2, 3, 6, 7), torch.rand(2, 1, 6, 7),
            torch.rand(1, 9), torch.rand(1), torch.rand(11, 8), torch.rand(11))
    out = intensity_fusion_reference(*args)
    assert intensity_fusion_output_shape(*(tuple(a.shape) for a in args)) == tuple(out.shape) == (2, 11, 6, 7)
    with pytest.raises(ValueError, match="input ranks"):
        intensity_fusion_output_shape(*(tuple(a.shape) for a in args[:3]), (9,), (1,), (11, 8), (11,))


def test_plugins_are_not_defined_without_tensorrt_plugin():
    from imkd_deploy.engines.flavour import load_tensorrt
    from imkd_deploy.engines.plugins import register_imkd_plugins
    from imkd_deploy.ops import bev_pool, intensity_fusion

    assert bev_pool.register_tensorrt_plugin(rtx) is None               # RTX has no .plugin module
    assert intensity_fusion.register_tensorrt_plugin(rtx) is None
    assert register_imkd_plugins(load_tensorrt("tensorrt-rtx")) == {}


# --------------------------------------------------------------------------- the student on RTX
def test_scatter_add_export_is_refused_with_the_export_to_use(tmp_path):
    torch.manual_seed(0)
    from imkd_deploy.model.build import build_student

    onnx_path = export_model(build_student(tiny()), tiny(), tmp_path / "tiny.onnx", "onnx", check=False).path
    with pytest.raises(UserError, match="--ops tensorrt"):
        build_engine(onnx_path, tmp_path / "tiny.engine", BuildSettings())


@pytest.mark.slow
def test_tiny_student_tensorrt_export_builds_on_rtx(tmp_path):
    """The --ops tensorrt lowering (segmented scan, plain ScatterND) parses and builds on a CPU."""
    torch.manual_seed(0)
    from imkd_deploy.engines.sidecar import read_sidecar
    from imkd_deploy.model.build import build_student

    res = export_model(build_student(tiny()), tiny(), tmp_path / "tiny.onnx", "tensorrt")
    assert res.passed, [r.line() for r in res.parity]
    profiles = profiles_from_feeds([example_inputs(tiny(), seed=k) for k in range(3)])
    built = build_engine(res.path, tmp_path / "tiny.engine", BuildSettings(profiles=profiles))
    assert built.engine_path.stat().st_size > 100_000
    side = read_sidecar(built.engine_path)
    assert side.bevpool_max_interval == res.metadata["bevpool_max_interval"] >= 4 * int(
        example_inputs(tiny())["interval_lengths"].max())
    assert side.model_config["image_size"] == list(tiny().image_size)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_rtx_engine_on_this_gpu(tmp_path, engine):
    """Where TensorRT-RTX runs (RTX/workstation GPUs): the --ops tensorrt export built for this GPU
    ('current') matches ONNX Runtime on the same ONNX element-wise, plain and with CUDA-graph
    replay (TensorRT may run FP32 convolutions in TF32, hence 2e-3). Where it does not (an H100,
    9.0: its runtime refuses every RTX engine), both the build and the load say so up front."""
    from imkd_deploy.engines.flavour import load_tensorrt
    from imkd_deploy.model.build import build_student
    from imkd_deploy.runtime.backends import OUTPUT_NAMES, OnnxRuntimeBackend

    gpu, trt = probe_device(0), load_tensorrt("tensorrt-rtx")
    torch.manual_seed(0)
    res = export_model(build_student(tiny()), tiny(), tmp_path / "tiny.onnx", "tensorrt")
    feeds = [example_inputs(tiny(), seed=k) for k in range(3)]
    settings = BuildSettings(profiles=profiles_from_feeds(feeds), compute_capabilities=("current",))
    if gpu.compute_capability not in trt.rtx_compute_capabilities():
        with pytest.raises(UserError, match=f"cannot target compute capability {gpu.compute_capability}"):
            build_engine(res.path, tmp_path / "tiny.engine", settings)
        with pytest.raises(CompatibilityError, match=f"compute capability {gpu.compute_capability}; it runs on"):
            TensorRTBackend(engine)
        return
    built = build_engine(res.path, tmp_path / "tiny.engine", settings)
    assert built.compute_capabilities == (gpu.compute_capability,)
    ort = OnnxRuntimeBackend(res.path)
    with TensorRTBackend(built.engine_path) as trt_be, \
            TensorRTBackend(built.engine_path, use_cuda_graph=True) as graph_be:
        for feed in feeds:                                  # pillar counts differ: buffers regrow, graph re-captures
            want, got, replay = ort.run(feed), trt_be.run(feed), graph_be.run(feed)
            for name in OUTPUT_NAMES:
                err = float(np.abs(got[name] - want[name]).max())
                np.testing.assert_allclose(got[name], want[name], atol=2e-3, rtol=2e-3,
                                           err_msg=f"{name}: max abs {err:.2e}")
                np.testing.assert_array_equal(replay[name], got[name], err_msg=name)


@pytest.mark.gpu
@pytest.mark.slow
def test_engine_matches_onnxruntime_elementwise(tmp_path):
    """Full TensorRT (plugins for imkd::BEVPool / IntensityFusion) vs ONNX Runtime on the same export."""
    pytest.importorskip("tensorrt.plugin", reason="needs NVIDIA TensorRT >= 10.6 (tensorrt.plugin)")
    from imkd_deploy.model.build import build_student
    from imkd_deploy.runtime.backends import OUTPUT_NAMES, OnnxRuntimeBackend

    torch.manual_seed(0)
    onnx_path = export_model(build_student(tiny()), tiny(), tmp_path / "tiny.onnx", "plugin").path
    feeds = [example_inputs(tiny(), seed=k) for k in range(3)]
    build_engine(onnx_path, tmp_path / "tiny.engine", BuildSettings(backend="tensorrt", profiles=profiles_from_feeds(feeds)))
    ort = OnnxRuntimeBackend(onnx_path)
    with TensorRTBackend(tmp_path / "tiny.engine") as trt_be, \
            TensorRTBackend(tmp_path / "tiny.engine", use_cuda_graph=True) as graph_be:
        assert isinstance(trt_be.config, ModelConfig) and trt_be.config == tiny()
        for feed in feeds:                                  # pillar counts differ: buffers regrow, graph re-captures
            want, got, replay = ort.run(feed), trt_be.run(feed), graph_be.run(feed)
            for name in OUTPUT_NAMES:
                np.testing.assert_allclose(got[name], want[name], atol=1e-3, rtol=1e-3, err_msg=name)
                np.testing.assert_array_equal(replay[name], got[name], err_msg=name)
