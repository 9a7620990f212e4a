"""TensorRT engines in the runtime: numpy inputs by name in, numpy head maps out (the Backend contract).

Loading is ordered so every failure is a clear error before TensorRT touches the file:
sidecar -> flavour/version/GPU compatibility (with the rebuild command) -> engine hash ->
model config -> imkd plugins (JIT Python plugins must be registered before
deserialization) -> deserialize -> execution context. Both flavours (`tensorrt`,
`tensorrt_rtx_bindings`) share the runtime API used here.

Execution is name-based (set_input_shape / set_tensor_address / execute_async_v3) on one
CUDA stream. Inputs go through pinned host staging buffers so copies are truly async;
device and host buffers grow when a dynamic length (BEVPool index arrays, radar pillars)
outgrows them, and are reused otherwise. With `use_cuda_graph=True` the copies plus the
enqueue are captured once per input-shape set and replayed; a new shape re-captures.

CUDA comes from cuda-python (`cuda.bindings.runtime`); pycuda is used only when cuda-python
is missing and pycuda imports.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imkd_deploy.config import ModelConfig
from imkd_deploy.engines.flavour import BACKENDS, TensorRT, load_tensorrt, make_logger, normalize_backend
from imkd_deploy.engines.sidecar import (
    EngineSidecar,
    RuntimeInfo,
    check_compatibility,
    file_sha256,
    onnx_model_config,
    read_sidecar,
)
from imkd_deploy.errors import CompatibilityError, UserError
from imkd_deploy.runtime.backends import INPUT_NAMES, OUTPUT_NAMES

log = logging.getLogger("imkd.runtime")

_MIN_ALLOC = 256          # bytes: cudaMalloc(0) is legal but a zero-length input still needs an address
_GROWTH = 1.25            # headroom when a buffer grows, so slowly rising lengths do not realloc every frame


# --------------------------------------------------------------------------- CUDA access
class _CudaPython:
    """The few CUDA runtime calls the backend needs, from cuda-python; errors name the call."""

    name = "cuda-python"

    def __init__(self):
        from cuda.bindings import runtime as cudart

        self.rt = cudart

    def _ok(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA {what} failed: {err.name}")
        return rest[0] if len(rest) == 1 else rest

    def device_count(self) -> tuple[int, str | None]:
        err, count = self.rt.cudaGetDeviceCount()
        if err != self.rt.cudaError_t.cudaSuccess:
            return 0, err.name
        return count, None

    def compute_capability(self, device: int) -> str:
        attr = self.rt.cudaDeviceAttr
        major = self._ok(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "get cc")
        minor = self._ok(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "get cc")
        return f"{major}.{minor}"

    def set_device(self, device: int) -> None:
        self._ok(self.rt.cudaSetDevice(device), "cudaSetDevice")

    def stream(self):
        return self._ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def host_alloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaHostAlloc(nbytes, self.rt.cudaHostAllocDefault), f"cudaHostAlloc({nbytes})"))

    def free_host(self, ptr: int) -> None:
        self._ok(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def h2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync H2D")

    def d2h(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync D2H")

    def sync(self, stream) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def handle(self, stream) -> int:
        return int(stream)

    def destroy_stream(self, stream) -> None:
        self.rt.cudaStreamDestroy(stream)

    # CUDA graphs
    supports_graphs = True

    def begin_capture(self, stream) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._ok(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream):
        graph = self._ok(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            return graph, self._ok(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except RuntimeError:
            self.rt.cudaGraphDestroy(graph)
            raise

    def launch(self, graph_exec, stream) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph, graph_exec) -> None:
        self.rt.cudaGraphExecDestroy(graph_exec)
        self.rt.cudaGraphDestroy(graph)


class _PyCuda:
    """pycuda fallback (no CUDA graphs): same calls, pycuda objects kept alive by the backend."""

    name = "pycuda"
    supports_graphs = False

    def __init__(self):
        import pycuda.driver as drv

        drv.init()
        self.drv = drv
        self._ctx = None
        self._keep: dict[int, object] = {}      # ptr -> pycuda allocation (freed when dropped)

    def device_count(self) -> tuple[int, str | None]:
        return self.drv.Device.count(), None

    def compute_capability(self, device: int) -> str:
        major, minor = self.drv.Device(device).compute_capability()
        return f"{major}.{minor}"

    def set_device(self, device: int) -> None:
        self._ctx = self.drv.Device(device).retain_primary_context()
        self._ctx.push()

    def stream(self):
        return self.drv.Stream()

    def malloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(nbytes)
        self._keep[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        self._keep.pop(ptr).free()

    def host_alloc(self, nbytes: int) -> int:
        arr = self.drv.pagelocked_empty(nbytes, np.uint8)
        self._keep[arr.ctypes.data] = arr
        return arr.ctypes.data

    def free_host(self, ptr: int) -> None:
        self._keep.pop(ptr, None)

    def h2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        self.drv.memcpy_htod_async(dst, _host_view(src, nbytes, np.uint8), stream)

    def d2h(self, dst: int, src: int, nbytes: int, stream) -> None:
        self.drv.memcpy_dtoh_async(_host_view(dst, nbytes, np.uint8), src, stream)

    def sync(self, stream) -> None:
        stream.synchronize()

    def handle(self, stream) -> int:
        return stream.handle

    def destroy_stream(self, stream) -> None:
        pass


def _cuda_api():
    """cuda-python if it imports, else pycuda if it imports, else None."""
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _PyCuda()
    except Exception:  # ImportError, or pycuda's driver init failing without a driver
        return None


def _host_view(ptr: int, nbytes: int, dtype) -> np.ndarray:
    raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
    return np.ctypeslib.as_array(raw)[:nbytes].view(dtype)


@dataclass(frozen=True)
class CudaDevice:
    index: int
    compute_capability: str | None     # None when unusable; `problem` says why
    problem: str | None = None


def probe_device(device: int = 0, api=None) -> CudaDevice:
    """Which GPU `device` is, or why there is none (no CUDA library, no driver, index out of range)."""
    api = api if api is not None else _cuda_api()
    if api is None:
        return CudaDevice(device, None, "neither cuda-python nor pycuda imports")
    count, err = api.device_count()
    if err is not None:
        return CudaDevice(device, None, err)
    if not 0 <= device < count:
        return CudaDevice(device, None, f"device {device} asked for, {count} visible")
    return CudaDevice(device, api.compute_capability(device))


# --------------------------------------------------------------------------- loading checks
def runtime_flavour(sidecar: EngineSidecar) -> TensorRT:
    """The sidecar's flavour if installed; else any installed flavour, so the mismatch is reported
    with a rebuild command for what IS here; else the install hint for the sidecar's flavour."""
    wanted = normalize_backend(sidecar.flavour)
    try:
        return load_tensorrt(wanted)
    except UserError as missing:
        for other in (b for b in BACKENDS if b != wanted):
            try:
                return load_tensorrt(other)
            except UserError:
                continue
        raise missing


def check_engine_loadable(engine_path: Path, sidecar: EngineSidecar, trt: TensorRT, gpu: CudaDevice) -> None:
    """Flavour and version first (a rebuild is needed on any machine), then the GPU, then the file."""
    builds_match = (sidecar.flavour == trt.backend
                    and sidecar.trt_version.split(".")[:3] == trt.version.split(".")[:3])
    if builds_match and gpu.compute_capability is None:
        raise UserError(
            f"{engine_path}: no CUDA driver/GPU ({gpu.problem}): TensorRT engines run on NVIDIA GPUs; "
            f"use the .onnx with onnxruntime here (this engine was built from {sidecar.onnx})"
        )
    if builds_match and trt.is_rtx and gpu.compute_capability not in trt.rtx_compute_capabilities():
        # no rebuild helps: the RTX runtime refuses every engine on such a GPU (an H100, 9.0, does)
        raise CompatibilityError(
            f"{engine_path}: {trt.backend} {trt.version} does not run on this GPU (compute capability "
            f"{gpu.compute_capability}; it runs on {', '.join(trt.rtx_compute_capabilities())}). Build the engine "
            f"with NVIDIA TensorRT on this machine (--backend tensorrt), or run {sidecar.onnx} with onnxruntime"
        )
    check_compatibility(sidecar, RuntimeInfo(trt.backend, trt.version, gpu.compute_capability), engine_path)
    if file_sha256(engine_path) != sidecar.engine_sha256:
        raise CompatibilityError(
            f"{engine_path}: the engine does not match its sidecar (sha256 differs): it was rebuilt or replaced "
            "without its .engine.json; rebuild it with `imkd build-engine`"
        )


def engine_model_config(engine_path: Path, sidecar: EngineSidecar | None = None) -> ModelConfig:
    """The model config an engine was exported with: the sidecar's copy, else the source ONNX's metadata."""
    engine_path = Path(engine_path)
    sidecar = sidecar or read_sidecar(engine_path)
    config = sidecar.model_config
    if config is None:
        onnx_path = Path(sidecar.onnx)
        # The build records the ONNX path it was given; an engine directory moved with its
        # ONNX keeps working through the path relative to the engine.
        for candidate in (onnx_path, engine_path.parent / onnx_path.name):
            if candidate.is_file():
                config = onnx_model_config(candidate)
                if config is not None:
                    break
    if config is None:
        raise UserError(
            f"{engine_path}: its sidecar carries no model config and the source ONNX ({sidecar.onnx}) with its "
            "imkd metadata is not found; rebuild the engine with `imkd build-engine` (it records the config)"
        )
    return ModelConfig.from_dict(config)


# --------------------------------------------------------------------------- buffers
class _Buffer:
    """One tensor's device memory plus its pinned host staging area, grown on demand."""

    def __init__(self, api):
        self.api = api
        self.capacity = 0
        self.device = 0
        self.host = 0

    def ensure(self, nbytes: int) -> bool:
        """Make room for nbytes; True when the addresses changed (TensorRT must be told)."""
        if nbytes <= self.capacity:
            return False
        self.release()
        size = max(_MIN_ALLOC, int(nbytes * _GROWTH))
        self.device = self.api.malloc(size)
        self.host = self.api.host_alloc(size)
        self.capacity = size
        return True

    def host_array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return _host_view(self.host, nbytes, dtype).reshape(shape)

    def release(self) -> None:
        if self.capacity:
            self.api.free(self.device)
            self.api.free_host(self.host)
            self.capacity = 0


# --------------------------------------------------------------------------- backend
class TensorRTBackend:
    """A built engine (NAME.engine + NAME.engine.json) on an NVIDIA GPU."""

    def __init__(self, engine_path: Path, device: int = 0, *, use_cuda_graph: bool = False):
        self.name = "tensorrt"
        self.path = engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise UserError(f"engine {engine_path} does not exist")
        self.sidecar = read_sidecar(engine_path)
        trt = runtime_flavour(self.sidecar)
        api = _cuda_api()
        check_engine_loadable(engine_path, self.sidecar, trt, probe_device(device, api))
        self.config = engine_model_config(engine_path, self.sidecar)
        self.max_interval = self.sidecar.bevpool_max_interval
        self.trt, self.api, self.device = trt, api, device
        self.use_cuda_graph = use_cuda_graph and api.supports_graphs
        if use_cuda_graph and not api.supports_graphs:
            log.warning("CUDA graphs need cuda-python; %s runs without them", api.name)
        self._register_plugins()

        api.set_device(device)
        mod = trt.module
        self._logger = make_logger(trt)
        self._runtime = mod.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise CompatibilityError(f"{engine_path}: {trt.backend} {trt.version} could not deserialize it "
                                     "(see the TensorRT log above); rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        self._io = self._describe_io()
        self.stream = api.stream()
        self._buffers = {name: _Buffer(api) for name in self._io}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self._graph = None
        self._closed = False

    def _register_plugins(self) -> None:
        if not self.sidecar.plugins:
            return
        from imkd_deploy.engines.plugins import register_imkd_plugins

        have = register_imkd_plugins(self.trt)
        missing = sorted(set(self.sidecar.plugins) - set(have))
        if missing:
            raise UserError(
                f"{self.path} contains imkd plugin layers {missing} that {self.trt.backend} {self.trt.version} "
                "cannot provide here (Python plugins need NVIDIA TensorRT >= 10.6 with tensorrt.plugin)"
            )

    def _describe_io(self) -> dict[str, tuple[bool, np.dtype]]:
        mod, eng = self.trt.module, self.engine
        io = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            is_input = eng.get_tensor_mode(name) == mod.TensorIOMode.INPUT
            io[name] = (is_input, np.dtype(mod.nptype(eng.get_tensor_dtype(name))))
        missing = [n for n in (*INPUT_NAMES, *OUTPUT_NAMES) if n not in io]
        if missing:
            raise UserError(f"{self.path} lacks the tensors {missing}: not an engine of an imkd student export")
        return io

    # ----------------------------------------------------------------- execution
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("TensorRTBackend.run after close()")
        feed = {}
        for name, (is_input, dtype) in self._io.items():
            if is_input:
                if name not in inputs:
                    raise UserError(f"{self.path}: input '{name}' missing from the feed")
                feed[name] = np.ascontiguousarray(inputs[name], dtype=dtype)
        shapes = {n: a.shape for n, a in feed.items()}
        if shapes != self._shapes:
            self._reshape(shapes)
        for name, arr in feed.items():
            np.copyto(self._buffers[name].host_array(arr.shape, arr.dtype), arr)
        if self.use_cuda_graph:
            if self._graph is None:
                self._capture()
            self.api.launch(self._graph[1], self.stream)
        else:
            self._enqueue()
        self.api.sync(self.stream)
        return {n: np.array(self._buffers[n].host_array(s, self._io[n][1])) for n, s in self._out_shapes.items()}

    def _reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """New input shapes: check them against the profile, size buffers, rebind, drop the graph."""
        for name, shape in shapes.items():
            lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                raise UserError(
                    f"{self.path}: input '{name}' has shape {shape}, outside the engine's profile {lo}..{hi}; "
                    "rebuild with a wider --profile (see imkd_deploy.engines.profiles)"
                )
            if not self.context.set_input_shape(name, shape):
                raise UserError(f"{self.path}: TensorRT rejected shape {shape} for input '{name}'")
        out_shapes = {}
        for name, (is_input, _) in self._io.items():
            if not is_input:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise UserError(f"{self.path}: output '{name}' has a data-dependent shape {shape}; not supported")
                out_shapes[name] = shape
        for name, shape in {**shapes, **out_shapes}.items():
            buf = self._buffers[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._io[name][1].itemsize
            # Addresses are bound on every reshape: cheap, and a grown buffer moved.
            buf.ensure(nbytes)
            self.context.set_tensor_address(name, buf.device)
        self._shapes, self._out_shapes = dict(shapes), out_shapes
        self._drop_graph()

    def _enqueue(self) -> None:
        for name, shape in self._shapes.items():
            buf = self._buffers[name]
            self.api.h2d(buf.device, buf.host, self._nbytes(name, shape), self.stream)
        if not self.context.execute_async_v3(self.api.handle(self.stream)):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name, shape in self._out_shapes.items():
            buf = self._buffers[name]
            self.api.d2h(buf.host, buf.device, self._nbytes(name, shape), self.stream)

    def _capture(self) -> None:
        # TensorRT may allocate or set up lazily on the first enqueue for a shape, which must
        # not happen inside a capture: run once eagerly, then record.
        self._enqueue()
        self.api.sync(self.stream)
        self.api.begin_capture(self.stream)
        try:
            self._enqueue()
        except BaseException:
            self.api.destroy_graph(*self.api.end_capture(self.stream))   # leave capture mode, then re-raise
            raise
        self._graph = self.api.end_capture(self.stream)

    def _nbytes(self, name: str, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape, dtype=np.int64)) * self._io[name][1].itemsize

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self.api.destroy_graph(*self._graph)
            self._graph = None

    def close(self) -> None:
        """Free the graph, buffers and stream (the engine and context go with the object)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.api.sync(self.stream)
        self._drop_graph()
        for buf in self._buffers.values():
            buf.release()
        self.api.destroy_stream(self.stream)

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
