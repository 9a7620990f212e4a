"""INT8 sensitivity pass: keep the layers that hurt the outputs most in FP32 until a target is met.

Activation ranges do not depend on which layers are quantized, so they are computed once
and every candidate model is written from them (no recalibration). The error of a model is
the worst output's relative L2 error against FP32, averaged over a few frames:
    err(output) = mean_frames ||q - f||_2 / (||f||_2 + eps)
Layer sensitivity = that error when ONLY that layer is quantized. Layers are then left in
FP32 in order of sensitivity, one at a time, until the full model meets the target.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from imkd_deploy.calibration.quantize import (
    Feed,
    QuantizeSettings,
    excluded_nodes,
    make_session,
    preprocess,
    quantizable_nodes,
    stamp_metadata,
    write_qdq,
)

log = logging.getLogger("imkd.calibration")


@dataclass
class SensitivityReport:
    target: float
    initial_error: dict[str, float]              # per output, all eligible layers int8
    final_error: dict[str, float]
    layer_error: dict[str, float]                # node -> model error with only that node int8
    excluded: list[str] = field(default_factory=list)   # left in FP32 by this pass, in order
    met: bool = False

    def summary(self) -> str:
        worst = sorted(self.layer_error.items(), key=lambda kv: -kv[1])[:8]
        lines = [f"sensitivity: target rel err {self.target:g}; before {max(self.initial_error.values()):.4g}, "
                 f"after {max(self.final_error.values()):.4g} ({'met' if self.met else 'NOT met'})"]
        lines += [f"  {name:<40} {err:.4g}{'  -> fp32' if name in self.excluded else ''}" for name, err in worst]
        lines += [f"  output {k}: rel err {v:.4g}" for k, v in self.final_error.items()]
        return "\n".join(lines)


def relative_errors(ref: Sequence[dict[str, np.ndarray]], test: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    out = {}
    for name in ref[0]:
        errs = [np.linalg.norm((t[name] - r[name]).ravel()) / (np.linalg.norm(r[name].ravel()) + 1e-12)
                for r, t in zip(ref, test)]
        out[name] = float(np.mean(errs))
    return out


def run_outputs(model_path: Path, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    sess = make_session(model_path)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, f))) for f in feeds]


def sensitivity_pass(model_path: Path, ranges, eval_feeds: Sequence[Feed], out_path: Path,
                     settings: QuantizeSettings | None = None, target: float = 0.05,
                     max_fp32_layers: int = 16, set_sha256: str | None = None) -> SensitivityReport:
    """Write `out_path` (Q/DQ) with the fewest extra FP32 layers that bring the error under `target`."""
    from imkd_deploy.export.metadata import file_sha256

    settings = settings or QuantizeSettings()
    model_path, out_path = Path(model_path), Path(out_path)
    with tempfile.TemporaryDirectory(prefix="imkd-sens-") as tmp:
        tmpd = Path(tmp)
        pre = preprocess(model_path, tmpd / "pre.onnx")
        model = onnx.load(str(pre), load_external_data=False)
        base_exclude = excluded_nodes(model, settings)
        candidates = quantizable_nodes(model, settings, base_exclude)
        ref = run_outputs(pre, eval_feeds)

        def error_of(exclude: list[str], only: list[str] | None = None) -> dict[str, float]:
            path = tmpd / "candidate.onnx"
            write_qdq(pre, ranges, path, settings, exclude, only=only)
            return relative_errors(ref, run_outputs(path, eval_feeds))

        initial = error_of(base_exclude)
        report = SensitivityReport(target, initial, initial, {})
        if max(initial.values()) <= target:
            report.met = True
        else:
            log.info("sensitivity: error %.4g > %.4g; ranking %d layers", max(initial.values()), target, len(candidates))
            report.layer_error = {n: max(error_of(base_exclude, only=[n]).values()) for n in candidates}
            ranked = sorted(candidates, key=lambda n: -report.layer_error[n])
            final = initial
            for name in ranked[:max_fp32_layers]:
                report.excluded.append(name)
                final = error_of(base_exclude + report.excluded)
                log.info("sensitivity: %s -> fp32, error %.4g", name, max(final.values()))
                if max(final.values()) <= target:
                    break
            report.final_error = final
            report.met = max(final.values()) <= target
        exclude = base_exclude + report.excluded
        write_qdq(pre, ranges, tmpd / "final.onnx", settings, exclude)
        stamp_metadata(tmpd / "final.onnx", out_path, precision="int8", source_sha=file_sha256(model_path),
                       set_sha=set_sha256, details={"settings": settings.__dict__, "fp32_nodes": exclude,
                                                    "activations": "int8 symmetric (S8S8, TensorRT)",
                                                    "sensitivity": {"target": target, "excluded": report.excluded,
                                                                    "final_error": report.final_error}})
    return report
