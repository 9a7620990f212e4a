"""Register the imkd plugin creators with TensorRT before parsing and before deserializing.

The ONNX parser finds a plugin for an `imkd::BEVPool` node by op type + namespace ("imkd")
in the plugin registry, and an engine that embeds a plugin layer looks the same creator up
when it is deserialized, so both the builder and the runtime call
`register_imkd_plugins(trt)` first.

The op modules own their plugins. With NVIDIA TensorRT (>= 10.6, `tensorrt.plugin`) each op
module's `register_tensorrt_plugin(trt_module)` defines a JIT Python plugin through
`define_python_plugin` below (the decorators register the creator themselves). An op module
may instead define `tensorrt_plugin_creator(trt_module)` returning an IPluginCreatorV3One
instance (the route for TensorRT-RTX, which has no `.plugin` module; its parser currently
aborts on Python plugins, see builder._refuse_plugin_nodes_on_rtx).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable

from imkd_deploy.engines.flavour import TensorRT

log = logging.getLogger("imkd.engines")

PLUGIN_NAMESPACE = "imkd"
PLUGIN_OPS = {"BEVPool": "imkd_deploy.ops.bev_pool", "IntensityFusion": "imkd_deploy.ops.intensity_fusion"}

# TensorRT holds raw pointers to registered creators; Python must keep them alive for the
# life of the process or the registry points at freed objects.
_REGISTERED: dict[tuple[str, str], object] = {}


def register_imkd_plugins(trt: TensorRT) -> dict[str, str]:
    """Register every available imkd creator once per flavour; returns {plugin name: version}."""
    registry = trt.module.get_plugin_registry()
    versions: dict[str, str] = {}
    for op, module_name in PLUGIN_OPS.items():
        key = (trt.backend, op)
        if not trt.is_rtx:
            version = _register_python_plugin(trt, module_name)
            if version is not None:
                versions[op] = version
                continue
        creator = _REGISTERED.get(key)
        if creator is None:
            creator = _load_creator(trt, module_name)
            if creator is None:
                continue
            if not registry.register_creator(creator, PLUGIN_NAMESPACE):
                log.warning("TensorRT refused the %s plugin creator (namespace %s)", op, PLUGIN_NAMESPACE)
                continue
            _REGISTERED[key] = creator
        versions[op] = str(creator.plugin_version)
    return versions


def _register_python_plugin(trt: TensorRT, module_name: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    register = getattr(module, "register_tensorrt_plugin", None)
    return None if register is None else register(trt.module)


# plugin id -> version, for plugins defined through tensorrt.plugin in this process: the
# decorators refuse a second definition of the same id.
_DEFINED: dict[str, str] = {}


def define_python_plugin(
    trt_module,
    op: str,
    inputs: tuple[str, ...],
    attrs: dict[str, type],
    io_types: str,
    output_shape: Callable,
    compute: Callable,
) -> str | None:
    """Define `imkd::<op>` as a tensorrt.plugin JIT plugin; returns its version, None without `.plugin`.

    `output_shape(*input_shapes, **attrs)` returns the output dims (ints or TensorRT shape
    expressions: the same plain function the CPU tests call with tuples). `compute(*inputs,
    out, **attrs)` fills `out` from torch CUDA tensors that wrap TensorRT's buffers, on
    TensorRT's stream. `io_types` is the AutoTuneCombination string, inputs then the output.
    The decorators inspect signatures, so the functions get explicit `__signature__`s built
    from `inputs`/`attrs` (one generic definition serves both ops).
    """
    plugin_id = f"{PLUGIN_NAMESPACE}::{op}"
    if plugin_id in _DEFINED:
        return _DEFINED[plugin_id]
    try:
        trtp = importlib.import_module(f"{trt_module.__name__}.plugin")
    except ImportError:
        return None
    n_in = len(inputs)
    attr_names = tuple(attrs)

    def describe(*args, **kwargs):
        shapes = [d.shape_expr for d in args[:n_in]]
        return trtp.from_shape_expr(tuple(output_shape(*shapes, **kwargs)), dtype=trt_module.float32)

    def autotune(*args):
        return [trtp.AutoTuneCombination(io_types)]

    def impl(*args, **kwargs):
        import torch

        tensors, values = args[:n_in], dict(zip(attr_names, args[n_in:n_in + len(attr_names)]))
        outputs, stream = args[n_in + len(attr_names)], kwargs["stream"]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            wrapped = [torch.as_tensor(t, device="cuda") for t in tensors]
            compute(*wrapped, torch.as_tensor(outputs[0], device="cuda"), **values)

    param = inspect.Parameter
    tensor_params = [param(n, param.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for n in inputs]
    attr_params = [param(n, param.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in attrs.items()]
    plain = [param(n, param.POSITIONAL_OR_KEYWORD) for n in (*inputs, *attr_names)]
    describe.__signature__ = inspect.Signature(tensor_params + attr_params, return_annotation=trtp.TensorDesc)
    autotune.__signature__ = inspect.Signature(
        [param(n, param.POSITIONAL_OR_KEYWORD) for n in (*inputs, "outputs")])
    impl.__signature__ = inspect.Signature(
        plain + [param("outputs", param.POSITIONAL_OR_KEYWORD), param("stream", param.POSITIONAL_OR_KEYWORD)])
    trtp.register(plugin_id)(describe)
    trtp.autotune(plugin_id)(autotune)
    trtp.impl(plugin_id)(impl)
    _DEFINED[plugin_id] = "1"          # tensorrt.plugin versions every plugin "1"
    return _DEFINED[plugin_id]


def _load_creator(trt: TensorRT, module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    factory = getattr(module, "tensorrt_plugin_creator", None)
    return None if factory is None else factory(trt.module)


def find_creator(trt: TensorRT, op_type: str, version: str = "1"):
    """The registered creator for an imkd op, or None (the parser would fail: 'Plugin not found')."""
    registry = trt.module.get_plugin_registry()
    getter = getattr(registry, "get_creator", None)
    if getter is None:
        return None
    return getter(op_type, version, PLUGIN_NAMESPACE)
