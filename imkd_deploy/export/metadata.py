"""Export metadata: one dict, stored twice (JSON sidecar + ONNX metadata_props).

The runtime, the calibrator and the engine builder read it back to rebuild the geometry,
normalise images and decode outputs without the checkpoint; hashes tie every later
artifact (INT8 model, engine) to the exact weights it came from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from imkd_deploy.errors import UserError

METADATA_KEY = "imkd"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, plus its ONNX external-data file (``NAME.data``) when one sits beside it:
    the identity of a model, however it is stored."""
    h = hashlib.sha256()
    for part in (Path(path), Path(str(path) + ".data")):
        if part.is_file():
            with open(part, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
    return h.hexdigest()


def sidecar_path(onnx_path: Path) -> Path:
    return Path(str(onnx_path) + ".json")


def embed(model_proto, meta: dict[str, Any]) -> None:
    """Put ``meta`` into an onnx.ModelProto's metadata_props (replacing an older imkd entry)."""
    keep = [p for p in model_proto.metadata_props if p.key != METADATA_KEY]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    entry = model_proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta, sort_keys=True)


def read_metadata(onnx_path: Path) -> dict[str, Any]:
    """The imkd metadata of an exported model: the sidecar if present, else metadata_props."""
    onnx_path = Path(onnx_path)
    side = sidecar_path(onnx_path)
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{side} is not valid JSON ({exc}); re-run imkd export") from None
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / google.protobuf errors
        raise UserError(f"{onnx_path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise UserError(f"{onnx_path} carries no imkd metadata (was it written by imkd export?)")
