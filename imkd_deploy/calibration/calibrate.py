"""`imkd calibrate` as a library call: FP32 ONNX + calibration set -> INT8 Q/DQ or FP16 ONNX.

The caller supplies `feeds`: a function from a manifest entry (scene, sample token) to the
model's input dict, i.e. the runtime's preprocessing of that frame. It is only called on a
calibration-cache miss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from imkd_deploy.calibration.cache import DEFAULT_CACHE_DIR, CalibrationCache
from imkd_deploy.calibration.calib_set import CalibEntry, CalibrationSet, read_manifest
from imkd_deploy.calibration.quantize import Feed, QuantizeSettings, get_ranges, quantize_int8
from imkd_deploy.errors import UserError

log = logging.getLogger("imkd.calibration")


@dataclass
class CalibrationResult:
    out_path: Path
    precision: str
    set_sha256: str | None
    cache_note: str
    fp32_nodes: list[str]
    warnings: list[str]
    report: str                     # the step's own summary (and the sensitivity table when run)

    def summary(self) -> str:
        lines = [self.report]
        lines += [f"warning: {w}" for w in self.warnings]
        from imkd_deploy.export.metadata import read_metadata

        try:
            ops = read_metadata(self.out_path).get("ops")
        except UserError:
            ops = None
        lines.append(f"next: imkd infer --model {self.out_path} --dataroot DATAROOT --split SPLIT --eval")
        if ops == "onnx":   # float64 BEVPool sums: TensorRT has no float64 tensors
            lines.append("      (for an engine, calibrate the `imkd export --ops tensorrt` model and build that one)")
        else:
            lines.append(f"      imkd build-engine --model {self.out_path} --backend tensorrt-rtx "
                         f"--out engines/{self.out_path.stem.replace('.', '_')}.engine")
        return "\n".join(lines)


def calibrate(model: Path, calib_set: Path | CalibrationSet | None, precision: str, out: Path,
              feeds: Callable[[CalibEntry], Feed] | None = None, settings: QuantizeSettings | None = None,
              cache_dir: Path = DEFAULT_CACHE_DIR, sensitivity_target: float | None = None,
              eval_frames: int = 4) -> CalibrationResult:
    """Write `out` at `precision` (int8 | fp16). INT8 needs `calib_set` and `feeds` (unless cached)."""
    model, out = Path(model), Path(out)
    if precision == "fp16":
        from imkd_deploy.calibration.fp16 import convert_fp16

        res = convert_fp16(model, out)
        return CalibrationResult(out, "fp16", None, "not used", res.fp32_nodes, [], res.summary())
    if precision != "int8":
        raise UserError(f"precision must be int8 or fp16, got '{precision}'")
    if calib_set is None:
        raise UserError("INT8 needs a calibration set (--set calibration/NAME.txt)")
    cset = calib_set if isinstance(calib_set, CalibrationSet) else read_manifest(calib_set)
    set_name = Path(calib_set).stem if not isinstance(calib_set, CalibrationSet) else f"set{cset.sha256[:8]}"
    warnings = list(cset.warnings)
    for w in warnings:
        log.warning(w)
    settings = settings or QuantizeSettings()
    cache = CalibrationCache(cache_dir)
    label = f"{model.stem}.{set_name}"
    frames = (lambda: (feeds(e) for e in cset.entries)) if feeds is not None else None
    ranges, note = get_ranges(model, frames, settings, set_sha256=cset.sha256, cache=cache, cache_label=label)
    if sensitivity_target is None:
        res = quantize_int8(model, None, out, settings, set_sha256=cset.sha256, ranges=ranges)
        return CalibrationResult(out, "int8", cset.sha256, note, res.excluded_nodes, warnings, res.summary())
    if feeds is None:
        raise UserError("the sensitivity pass runs frames through the model: give feeds")
    from imkd_deploy.calibration.sensitivity import sensitivity_pass

    picks = np.unique(np.linspace(0, len(cset) - 1, min(eval_frames, len(cset))).round().astype(int))
    eval_feeds = [feeds(cset.entries[i]) for i in picks]
    report = sensitivity_pass(model, ranges, eval_feeds, out, settings, target=sensitivity_target,
                              set_sha256=cset.sha256)
    return CalibrationResult(out, "int8", cset.sha256, note, report.excluded, warnings,
                             f"saved {out}\n{report.summary()}")
