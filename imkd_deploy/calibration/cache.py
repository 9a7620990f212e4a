"""Content-keyed calibration caches: activation ranges reused only for the same model, set and settings.

The key is sha256 over (model bytes, calibration-set hash, range-affecting settings,
onnxruntime version). Entries live in `calibration/cache/<label>.<key16>.json`, where
`label` names the model+set pair; when a lookup misses, earlier entries with the same label
explain why (model changed / set changed / which setting changed), so a stale cache is
never reused silently and never dropped silently either.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imkd_deploy.atomic import atomic_write_json

log = logging.getLogger("imkd.calibration")

DEFAULT_CACHE_DIR = Path("calibration/cache")


@dataclass(frozen=True)
class CacheKey:
    model_sha256: str
    set_sha256: str
    settings: tuple[tuple[str, Any], ...]     # sorted (name, value) pairs; hashable

    @classmethod
    def make(cls, model_sha256: str, set_sha256: str, settings: dict[str, Any]) -> "CacheKey":
        return cls(model_sha256, set_sha256, tuple(sorted((k, _jsonable(v)) for k, v in settings.items())))

    @property
    def digest(self) -> str:
        payload = json.dumps({"model": self.model_sha256, "set": self.set_sha256, "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"model_sha256": self.model_sha256, "set_sha256": self.set_sha256,
                "settings": dict(self.settings), "digest": self.digest}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_jsonable(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def explain_mismatch(old: dict[str, Any], new: CacheKey) -> str:
    """One line naming what differs between a stored key and the wanted one."""
    reasons = []
    if old.get("model_sha256") != new.model_sha256:
        reasons.append(f"model changed ({str(old.get('model_sha256'))[:12]} -> {new.model_sha256[:12]})")
    if old.get("set_sha256") != new.set_sha256:
        reasons.append(f"calibration set changed ({str(old.get('set_sha256'))[:12]} -> {new.set_sha256[:12]})")
    old_settings = {k: _jsonable(v) for k, v in (old.get("settings") or {}).items()}
    for name, value in new.settings:
        if old_settings.get(name) != value:
            reasons.append(f"setting {name}: {old_settings.get(name)!r} -> {value!r}")
    return "; ".join(reasons) or "key digest differs"


class CalibrationCache:
    """Stores ONNX Runtime `TensorsData` (per-tensor ranges) under content keys."""

    def __init__(self, root: Path = DEFAULT_CACHE_DIR):
        self.root = Path(root)
        self.last_miss_reason: str | None = None

    def path_for(self, label: str, key: CacheKey) -> Path:
        return self.root / f"{label}.{key.digest[:16]}.json"

    def load(self, label: str, key: CacheKey):
        """The cached ranges for exactly this key, else None with the reason logged."""
        from onnxruntime.quantization.calibrate import TensorsData

        path = self.path_for(label, key)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                if data["key"]["digest"] != key.digest:
                    raise ValueError(f"stored key {data['key']['digest'][:16]} does not match its file name")
                ranges = TensorsData.from_dict(data["ranges"])
            except (ValueError, KeyError, TypeError) as exc:
                return self._miss(f"{path} is unusable ({exc}); recalibrating")
            log.info("calibration cache hit: %s", path)
            self.last_miss_reason = None
            return ranges
        others = sorted(self.root.glob(f"{label}.*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for other in others:
            try:
                old = json.loads(other.read_text())["key"]
            except (ValueError, KeyError):
                continue
            return self._miss(f"cache {other.name} not reused: {explain_mismatch(old, key)}")
        return self._miss(f"no cache for '{label}' under {self.root}")

    def _miss(self, reason: str):
        self.last_miss_reason = reason
        log.warning("calibration cache miss: %s", reason)
        return None

    def save(self, label: str, key: CacheKey, ranges) -> Path:
        from onnxruntime.quantization.calibrate import CalibrationCacheEncoder

        path = self.path_for(label, key)
        payload = {"key": key.to_dict(), "ranges": ranges.to_dict()}
        atomic_write_json(path, payload, cls=CalibrationCacheEncoder)
        log.info("calibration cache saved: %s", path)
        return path
