"""Backend parity, Polygraphy style: the same inputs through two backends, one line per output.

    PASSED | Output 'heatmap' | max abs 3.1e-06 <= atol 1e-04 | max rel 2.0e-05 | mean abs 4e-07

An output passes when every element satisfies |a - b| <= atol + rtol * |b| (numpy.isclose
semantics, b being the reference). Shapes must match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OutputComparison:
    name: str
    passed: bool
    max_abs: float
    max_rel: float
    mean_abs: float
    atol: float
    rtol: float
    shape_a: tuple
    shape_b: tuple

    def line(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        if self.shape_a != self.shape_b:
            return f"{status} | Output '{self.name}' | shape {self.shape_a} != reference {self.shape_b}"
        cmp = "<=" if self.passed else ">"
        return (f"{status} | Output '{self.name}' | max abs {self.max_abs:.2e} {cmp} atol {self.atol:.0e} "
                f"(+ rtol {self.rtol:.0e}) | max rel {self.max_rel:.2e} | mean abs {self.mean_abs:.1e}")


def compare_outputs(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], atol: float = 1e-4,
                    rtol: float = 1e-3, names: list[str] | None = None) -> list[OutputComparison]:
    rows = []
    for name in names or list(reference):
        a = np.asarray(outputs[name], dtype=np.float64)
        b = np.asarray(reference[name], dtype=np.float64)
        if a.shape != b.shape:
            rows.append(OutputComparison(name, False, np.inf, np.inf, np.inf, atol, rtol, a.shape, b.shape))
            continue
        diff = np.abs(a - b)
        finite = np.isfinite(a) & np.isfinite(b)
        passed = bool(np.all(diff <= atol + rtol * np.abs(b)) and finite.all())
        rel = diff / np.maximum(np.abs(b), 1e-12)
        rows.append(OutputComparison(
            name, passed, float(diff.max(initial=0.0)), float(rel.max(initial=0.0)),
            float(diff.mean()) if diff.size else 0.0, atol, rtol, a.shape, b.shape,
        ))
    return rows


def all_passed(rows: list[OutputComparison]) -> bool:
    return all(r.passed for r in rows)
