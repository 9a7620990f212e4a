from __future__ import annotations

import json

import pytest

from imkd_deploy.engines.sidecar import (
    EngineSidecar,
    RuntimeInfo,
    check_compatibility,
    read_sidecar,
    rebuild_command,
    write_sidecar,
)
from imkd_deploy.errors import CompatibilityError, UserError


def _sidecar(**over) -> EngineSidecar:
    base = dict(engine="det.engine", engine_sha256="e" * 64, flavour="tensorrt-rtx", trt_version="1.7.1.116",
                compute_capabilities=["8.6", "8.9"], precision="int8", onnx="export/det.int8.onnx",
                onnx_sha256="o" * 64, model_sha256="m" * 64, calibration_set_sha256="c" * 64,
                profiles={"img": [[1, 3, 32, 32], [2, 3, 32, 32], [4, 3, 32, 32]], "pts": [[5], [5], [5]]},
                plugins={"BEVPool": "1"}, imkd_version="0.1.0",
                build={"workspace_mb": 512, "calibration_set": "calibration/val.txt", "explicit_targets": ["8.6", "8.9"]})
    base.update(over)
    return EngineSidecar(**base)


OK = RuntimeInfo("tensorrt-rtx", "1.7.1.200", "8.9")     # a different build number is fine


def test_matching_runtime_passes():
    check_compatibility(_sidecar(), OK)


@pytest.mark.parametrize("runtime, problem, backend, cc", [
    (RuntimeInfo("tensorrt", "10.13.0.35", "8.9"), "built with tensorrt-rtx, but this runtime is tensorrt", "tensorrt", None),
    (RuntimeInfo("tensorrt-rtx", "1.8.0.1", "8.9"), "built with tensorrt-rtx 1.7.1.116, but 1.8.0.1 is installed", "tensorrt-rtx", None),
    (RuntimeInfo("tensorrt-rtx", "1.7.1.116", "12.0"), "targets compute capability 8.6, 8.9, but this GPU is 12.0", "tensorrt-rtx", "12.0"),
])
def test_mismatch_prints_the_rebuild_command(runtime, problem, backend, cc):
    with pytest.raises(CompatibilityError) as err:
        check_compatibility(_sidecar(), runtime, engine_path="engines/det.engine")
    msg = str(err.value)
    assert msg.startswith("engines/det.engine: ") and problem in msg
    expected = ("imkd build-engine --model export/det.int8.onnx --backend " + backend + " --out engines/det.engine "
                "--int8 --set calibration/val.txt --profile img:1x3x32x32:2x3x32x32:4x3x32x32 --workspace-mb 512")
    if backend == "tensorrt-rtx":
        expected += " --compute-capability " + (cc if cc else "8.6 --compute-capability 8.9")
    assert msg.endswith(expected)


def test_no_gpu_is_a_clear_error():
    with pytest.raises(CompatibilityError, match="no CUDA GPU is visible.*export/det.int8.onnx"):
        check_compatibility(_sidecar(), RuntimeInfo("tensorrt-rtx", "1.7.1.116", None))


def test_fp16_and_fp32_rebuild_flags():
    assert "--precision fp16" in rebuild_command(_sidecar(precision="fp16"))
    cmd = rebuild_command(_sidecar(precision="fp32", build={"workspace_mb": 64}))
    assert "--int8" not in cmd and "--precision" not in cmd and "--compute-capability" not in cmd


def test_write_read_round_trip_and_errors(tmp_path):
    engine = tmp_path / "det.engine"
    engine.write_bytes(b"x")
    path = write_sidecar(_sidecar(), engine)
    assert path.name == "det.engine.json" and read_sidecar(engine) == _sidecar()
    assert not list(tmp_path.glob(".*.tmp"))
    path.write_text("{ nope")
    with pytest.raises(UserError, match="corrupt engine sidecar"):
        read_sidecar(engine)
    path.write_text(json.dumps({"engine": "det.engine"}))
    with pytest.raises(UserError, match="lacks fields"):
        read_sidecar(engine)
    with pytest.raises(UserError, match="no sidecar other.engine.json"):
        read_sidecar(tmp_path / "other.engine")
