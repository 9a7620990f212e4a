"""The imkd custom ops. Each op's module holds every implementation of it (torch reference,
torch.library op, ONNX translations, ONNX Runtime kernel, TensorRT plugin); this package
only merges what callers need across ops. Submodules are imported lazily so that importing
``imkd_deploy.ops`` stays cheap."""

from __future__ import annotations

from typing import Any

# Marker stored IN the options object: registering the extensions library twice on one
# SessionOptions makes session creation fail ("Conflicting with a registered kernel").
_REGISTERED_KEY = "imkd.ort_kernels_registered"


def onnx_translation_table(mode: str, max_interval: int | None = None) -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True) covering every imkd op.

    mode "plugin": imkd-domain nodes (imkd::BEVPool, imkd::IntensityFusion) with the
    plugin_namespace/plugin_version attributes TensorRT needs; "onnx": standard ops only
    (fastest in ONNX Runtime); "tensorrt": standard ops without scatter reductions, for
    TensorRT builds without plugins (needs the rig's longest BEVPool interval).
    """
    from imkd_deploy.ops import bev_pool, intensity_fusion

    table = dict(bev_pool.onnx_translations(mode, max_interval))
    table.update(intensity_fusion.onnx_translations(mode))
    return table


def register_ort_kernels(session_options: Any) -> Any:
    """Make ONNX Runtime run imkd-domain nodes with the numpy kernels. Idempotent per options
    object; returns it, so ``ort.InferenceSession(path, register_ort_kernels(so))`` reads well."""
    from onnxruntime_extensions import get_library_path

    from imkd_deploy.ops import bev_pool, intensity_fusion

    bev_pool.register_ort_kernel()
    intensity_fusion.register_ort_kernel()
    try:
        session_options.get_session_config_entry(_REGISTERED_KEY)
    except RuntimeError:  # not registered on this options object yet
        session_options.register_custom_ops_library(get_library_path())
        session_options.add_session_config_entry(_REGISTERED_KEY, "1")
    return session_options
