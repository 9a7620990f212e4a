"""`NAME.engine.json`: what an engine was built from and for, checked before it is loaded.

We do not prepend metadata to the engine file (that breaks trtexec / Polygraphy); the facts
a loader needs live beside it. `check_compatibility` turns the usual deserialization
failures ("version tag does not match", "incompatible device") into one clear error that
prints the exact command to rebuild the engine for this machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imkd_deploy.atomic import atomic_write_text
from imkd_deploy.errors import CompatibilityError, UserError
from imkd_deploy.export.metadata import file_sha256

SIDECAR_SCHEMA = 1
# ONNX metadata_props keys the calibration step writes (export may add the others).
META_PRECISION = "imkd.precision"
META_CALIBRATION_SET = "imkd.calibration_set_sha256"
META_SOURCE_ONNX = "imkd.source_onnx_sha256"
_CHECKPOINT_KEYS = ("checkpoint_sha256", "checkpoint_hash", "model_sha256", "imkd.checkpoint_sha256")


def sidecar_path_for(engine_path: Path) -> Path:
    return Path(str(engine_path) + ".json")


@dataclass
class EngineSidecar:
    engine: str                                  # engine file name (sidecar sits beside it)
    engine_sha256: str
    flavour: str                                 # tensorrt | tensorrt-rtx
    trt_version: str
    compute_capabilities: list[str]              # targets the engine runs on, e.g. ["8.6", "8.9"]
    precision: str                               # fp32 | fp16 | int8
    onnx: str                                    # path given at build time
    onnx_sha256: str
    model_sha256: str | None                     # checkpoint hash carried by the ONNX metadata
    calibration_set_sha256: str | None
    profiles: dict[str, list[list[int]]]         # input -> [min, opt, max]
    plugins: dict[str, str]                      # plugin -> version (namespace imkd)
    build: dict[str, Any]                        # workspace_mb, optimization_level, calibration_set
    imkd_version: str
    created: str = ""
    schema: int = SIDECAR_SCHEMA
    # ModelConfig.to_dict() of the exported model: the runtime needs it and the ONNX may not
    # travel with the engine. None for sidecars written before this field existed.
    model_config: dict[str, Any] | None = None
    bevpool_max_interval: int | None = None      # --ops tensorrt exports: the scan's bound

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineSidecar":
        names = set(cls.__dataclass_fields__)
        missing = [n for n in names if n not in data and n not in ("created", "schema", "model_config")]
        if missing:
            raise UserError(f"engine sidecar lacks fields {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def onnx_provenance(onnx_path: Path) -> dict[str, str | None]:
    """Checkpoint hash, calibration-set hash and precision from metadata_props or `.onnx.json`."""
    import onnx

    meta: dict[str, Any] = {}
    side = Path(str(onnx_path) + ".json")
    alt = Path(onnx_path).with_suffix(".json")
    for candidate in (side, alt):
        if candidate.is_file():
            try:
                meta.update(json.loads(candidate.read_text()))
            except json.JSONDecodeError:
                pass
            break
    model = onnx.load(str(onnx_path), load_external_data=False)
    for prop in model.metadata_props:
        try:
            meta[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            meta[prop.key] = prop.value
    return {
        "model_sha256": _find_key(meta, _CHECKPOINT_KEYS),
        "calibration_set_sha256": _find_key(meta, (META_CALIBRATION_SET, "calibration_set_sha256")),
        "precision": _find_key(meta, (META_PRECISION, "precision")),
    }


def onnx_model_config(onnx_path: Path) -> dict[str, Any] | None:
    """The ModelConfig dict `imkd export` stored with the ONNX, or None (not an imkd export)."""
    from imkd_deploy.export.metadata import read_metadata

    try:
        config = read_metadata(onnx_path).get("config")
    except UserError:
        return None
    return config if isinstance(config, dict) else None


def _onnx_scan_bound(onnx_path: Path) -> int | None:
    from imkd_deploy.export.metadata import read_metadata

    try:
        return read_metadata(onnx_path).get("bevpool_max_interval")
    except UserError:
        return None


def _find_key(meta: Any, keys: tuple[str, ...]) -> str | None:
    """First value under any of `keys`, searching nested dicts breadth-first."""
    queue = [meta]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            for key in keys:
                if key in node and isinstance(node[key], (str, int, float)):
                    return str(node[key])
            queue.extend(v for v in node.values() if isinstance(v, dict))
    return None


def make_sidecar(onnx_path, engine_path, trt, settings, profiles, targets, plugins) -> EngineSidecar:
    from imkd_deploy import __version__

    prov = onnx_provenance(onnx_path)
    return EngineSidecar(
        engine=Path(engine_path).name,
        engine_sha256=file_sha256(engine_path),
        flavour=trt.backend,
        trt_version=trt.version,
        compute_capabilities=list(targets),
        precision=settings.precision or prov["precision"] or "fp32",
        onnx=str(onnx_path),
        onnx_sha256=file_sha256(onnx_path),
        model_sha256=prov["model_sha256"],
        calibration_set_sha256=prov["calibration_set_sha256"],
        profiles={k: [list(s) for s in v] for k, v in profiles.items()},
        plugins=dict(plugins),
        build={
            "workspace_mb": settings.workspace_mb,
            "optimization_level": settings.optimization_level,
            "calibration_set": str(settings.calibration_set) if settings.calibration_set else None,
            "explicit_targets": list(settings.compute_capabilities),
        },
        imkd_version=__version__,
        model_config=onnx_model_config(onnx_path),
        bevpool_max_interval=_onnx_scan_bound(onnx_path),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_sidecar(sidecar: EngineSidecar, engine_path: Path) -> Path:
    return atomic_write_text(sidecar_path_for(engine_path), sidecar.to_json() + "\n")


def read_sidecar(engine_path: Path) -> EngineSidecar:
    path = sidecar_path_for(engine_path)
    if not path.is_file():
        raise UserError(f"{engine_path}: no sidecar {path.name}; rebuild the engine with `imkd build-engine` (it writes one)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt engine sidecar ({exc})") from exc
    return EngineSidecar.from_dict(data)


# --------------------------------------------------------------------------- compatibility
@dataclass(frozen=True)
class RuntimeInfo:
    flavour: str                     # tensorrt | tensorrt-rtx
    trt_version: str
    compute_capability: str | None   # "9.0"; None when no CUDA device is visible


def current_compute_capability(device: int = 0) -> str | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    attr = cudart.cudaDeviceAttr
    err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    _, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
    return f"{major}.{minor}"


def current_runtime_info(backend: str) -> RuntimeInfo:
    from imkd_deploy.engines.flavour import load_tensorrt

    trt = load_tensorrt(backend)
    return RuntimeInfo(trt.backend, trt.version, current_compute_capability())


def _release(version: str) -> str:
    """Engines are tied to major.minor.patch; the build number does not matter."""
    return ".".join(version.split(".")[:3])


def check_compatibility(sidecar: EngineSidecar, runtime: RuntimeInfo, engine_path: Path | None = None) -> None:
    """Raise CompatibilityError (with the rebuild command) if this runtime cannot load the engine."""
    name = str(engine_path) if engine_path else sidecar.engine
    problem = None
    target_cc = None
    if sidecar.flavour != runtime.flavour:
        problem = f"it was built with {sidecar.flavour}, but this runtime is {runtime.flavour}"
    elif _release(sidecar.trt_version) != _release(runtime.trt_version):
        problem = (f"it was built with {sidecar.flavour} {sidecar.trt_version}, but {runtime.trt_version} is installed "
                   "(engines only load on the TensorRT release that built them)")
    elif runtime.compute_capability is None:
        raise CompatibilityError(f"{name}: no CUDA GPU is visible here, so a TensorRT engine cannot run; "
                                 f"use the ONNX model ({sidecar.onnx}) with the onnxruntime backend instead")
    elif runtime.compute_capability not in sidecar.compute_capabilities:
        problem = (f"it targets compute capability {', '.join(sidecar.compute_capabilities)}, "
                   f"but this GPU is {runtime.compute_capability}")
        target_cc = runtime.compute_capability
    if problem:
        cmd = rebuild_command(sidecar, backend=runtime.flavour, compute_capability=target_cc, engine_path=engine_path)
        raise CompatibilityError(f"{name}: {problem}. Rebuild it on this machine:\n  {cmd}")


def rebuild_command(sidecar: EngineSidecar, backend: str | None = None, compute_capability: str | None = None,
                    engine_path: Path | None = None) -> str:
    """The `imkd build-engine` command line that reproduces this engine (optionally retargeted)."""
    backend = backend or sidecar.flavour
    out = engine_path or sidecar.engine
    args = ["imkd", "build-engine", "--model", sidecar.onnx, "--backend", backend, "--out", str(out)]
    cal_set = sidecar.build.get("calibration_set")
    if sidecar.precision == "int8" and cal_set:
        args += ["--int8", "--set", cal_set]
    elif sidecar.precision == "fp16":
        args += ["--precision", "fp16"]
    for name, (lo, opt, hi) in sorted(sidecar.profiles.items()):
        if lo != hi:
            args += ["--profile", f"{name}:" + ":".join("x".join(map(str, s)) for s in (lo, opt, hi))]
    args += ["--workspace-mb", str(sidecar.build.get("workspace_mb", 1024))]
    targets = [compute_capability] if compute_capability else sidecar.build.get("explicit_targets") or []
    if backend == "tensorrt-rtx":
        for cc in targets:
            args += ["--compute-capability", cc]
    return shlex.join(args)
