"""What every imkd op's ONNX translation shares: the custom domain and the plugin attributes.

TensorRT's ONNX parser finds a plugin for a custom-domain node by op type plus the string
attributes ``plugin_namespace``/``plugin_version``; ONNX Runtime finds the Python kernels by
domain + op type. Both ops emit the same values from here.
"""

from __future__ import annotations

import onnxscript

from imkd_deploy.errors import UserError

IMKD_DOMAIN = "imkd"
PLUGIN_NAMESPACE = "imkd"
PLUGIN_VERSION = "1"
OPS_MODES = ("plugin", "onnx", "tensorrt")

IMKD_OPSET = onnxscript.values.Opset(IMKD_DOMAIN, 1)


def check_mode(mode: str) -> None:
    if mode not in OPS_MODES:
        raise UserError(f"ops mode must be one of {'|'.join(OPS_MODES)}, got {mode!r}")

