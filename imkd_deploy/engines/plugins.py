"""Register the imkd plugin creators with TensorRT before parsing and before deserializing.

The ONNX parser finds a plugin for an `imkd::BEVPool` node by op type + namespace ("imkd")
in the plugin registry, and an engine that embeds a plugin layer looks the same creator up
when it is deserialized, so both the builder and the runtime call
`register_imkd_plugins(trt)` first.

The op modules own their plugins: `imkd_deploy.ops.bev_pool` and
`imkd_deploy.ops.intensity_fusion` may define `tensorrt_plugin_creator(trt_module)`
returning an IPluginCreatorV3One instance. This module only registers what they provide.
"""

from __future__ import annotations

import importlib
import logging

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
