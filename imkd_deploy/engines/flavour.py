"""Which TensorRT is installed: NVIDIA TensorRT (`tensorrt`) or TensorRT for RTX (`tensorrt_rtx_bindings`).

Both expose the same Builder / OnnxParser / Runtime API with a few differences the builder
and the runtime must know about; they are collected here so nothing else branches on the
module name. Imports are lazy: importing this module never loads TensorRT.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

from imkd_deploy.errors import UserError

BACKENDS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
_INSTALL_HINT = {
    "tensorrt": "pip install 'imkd-deploy[tensorrt]' (needs NVIDIA's package index and a GPU machine)",
    "tensorrt-rtx": "pip install 'imkd-deploy[rtx]'",
}
# TensorRT-RTX docs: with no explicit target an engine runs on compute capability 8.0, 8.6,
# 8.9, 12.x (Turing 7.5 must be asked for). Full TensorRT targets the GPU it builds on.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0", "12.1")


@dataclass(frozen=True)
class TensorRT:
    """A loaded TensorRT flavour: the module plus the facts that differ between flavours."""

    backend: str          # "tensorrt" | "tensorrt-rtx"
    module: ModuleType
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def is_rtx(self) -> bool:
        return self.backend == "tensorrt-rtx"

    @property
    def has_timing_cache(self) -> bool:
        # TensorRT-RTX 1.2+ keeps the API but documents timing-cache calls as no-ops (it
        # autotunes at runtime and has a runtime cache instead), so saving one is misleading.
        return not self.is_rtx

    @property
    def builds_without_gpu(self) -> bool:
        return self.is_rtx

    def rtx_compute_capabilities(self) -> tuple[str, ...]:
        """The compute capabilities this RTX release can target and run on, e.g. ("7.5", "8.0", ...).

        Only those it names: 1.7 builds for a Hopper GPU (9.0) with its CURRENT target, but its
        runtime then refuses the engine (seen on an H100; README, "Deploying on a GPU")."""
        named = [m[2:] for m in self.module.ComputeCapability.__members__ if m.startswith("SM")]   # "SM86" -> "86"
        return tuple(f"{v[:-1]}.{v[-1]}" for v in sorted(named, key=int))

    def network_flags(self) -> int:
        """Strongly typed network: precision comes from the ONNX (Q/DQ, fp16 tensors), never flags.

        TensorRT 11 is strongly typed only and may drop the flag; 10.x and RTX need it set.
        """
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)


def normalize_backend(backend: str) -> str:
    key = backend.strip().lower().replace("_", "-")
    if key in ("rtx", "trt-rtx"):
        key = "tensorrt-rtx"
    if key in ("trt",):
        key = "tensorrt"
    if key not in BACKENDS:
        raise UserError(f"unknown TensorRT backend '{backend}' (choose {' | '.join(BACKENDS)})")
    return key


@functools.lru_cache(maxsize=None)
def load_tensorrt(backend: str) -> TensorRT:
    """Import the flavour's module, or raise a UserError that says how to install it."""
    backend = normalize_backend(backend)
    name = _MODULES[backend]
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # ImportError, or an OSError from missing shared libraries
        raise UserError(
            f"backend '{backend}' needs the Python module '{name}', which does not import here "
            f"({type(exc).__name__}: {exc}). Install it with: {_INSTALL_HINT[backend]}"
        ) from exc
    return TensorRT(backend=backend, module=module, version=str(module.__version__))


def make_logger(trt: TensorRT, verbose: bool = False):
    severity = trt.module.Logger.VERBOSE if verbose else trt.module.Logger.WARNING
    return trt.module.Logger(severity)
