"""`imkd bench`: every backend on the same frames, interleaved, in one process.

Machines are noisy, so absolute times are only informative; what we compare (and gate on)
are ratios measured side by side in one run: backends run round-robin (A B C A B C ...)
after a warm-up, so a slow spell of the machine hits all of them alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imkd_deploy.errors import UserError
from imkd_deploy.runtime.pipeline import STAGES, Pipeline, latency_table

SPREAD_WARN = 1.5     # p90/p50 above this: the run was noisy, say so


@dataclass
class BenchResult:
    frames: int
    rounds: int
    latency: dict[str, dict]                 # backend -> stage -> stats (ms)
    ratios: dict[str, dict[str, float]]      # backend -> stage -> p50 / reference p50
    shares: dict[str, dict[str, float]]      # backend -> {runtime_overhead, bevpool_of_network}
    warnings: list[str] = field(default_factory=list)
    reference: str = "torch"
    gate: dict | None = None

    def to_dict(self) -> dict:
        return {"frames": self.frames, "rounds": self.rounds, "latency_ms": self.latency, "ratios": self.ratios,
                "shares": self.shares, "warnings": self.warnings, "reference": self.reference, "gate": self.gate,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def bevpool_share(pipeline: Pipeline, inputs: dict[str, np.ndarray], repeats: int = 5) -> float | None:
    """BEVPool's share of the torch network's time, both measured in the same forward passes.

    The op is timed where the model calls it (the view transform's module-level name is
    wrapped for the duration), so the share covers exactly the op's work on real tensors.
    Only the torch backend exposes this; engines report it from their own profilers.
    """
    import imkd_deploy.model.view_transform as vt

    if getattr(pipeline.backend, "model", None) is None:
        return None
    original = vt.bev_pool
    spent: list[float] = []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return result

    vt.bev_pool = timed
    try:
        t0 = time.perf_counter()
        for _ in range(repeats):
            pipeline.backend.run(inputs)
        network = time.perf_counter() - t0
    finally:
        vt.bev_pool = original
    return float(sum(spent) / max(network, 1e-9))


def run_bench(models: dict[str, Path], frames: list, *, warmup: int = 2, rounds: int = 3,
              reference: str = "torch", progress: bool = True, console=None, threads: int = 0) -> BenchResult:
    """``models`` maps a backend label (torch, onnxruntime, onnxruntime-int8, tensorrt...) to its artifact.
    ``threads`` > 0 gives torch and ONNX Runtime the same CPU thread count (a fair comparison)."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_bench(models, frames, warmup, rounds, reference, progress, console, threads)
    finally:
        torch.set_num_threads(previous)


def _run_bench(models, frames, warmup, rounds, reference, progress, console, threads) -> BenchResult:
    if not models:
        raise UserError("nothing to benchmark: give at least one model")
    if not frames:
        raise UserError("no frames to benchmark on")
    pipelines = {}
    for label, path in models.items():
        backend = "torch" if label == "torch" else "tensorrt" if label.startswith("tensorrt") else "onnxruntime"
        pipelines[label] = Pipeline.from_model(path, backend=backend, threads=threads or None)
    timings: dict[str, list[dict]] = {label: [] for label in pipelines}
    for _ in range(warmup):
        for pipe in pipelines.values():
            pipe(frames[0])
    from rich.progress import Progress

    total = rounds * len(frames) * len(pipelines)
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("bench", total=total)
        for _ in range(rounds):
            for frame in frames:
                for label, pipe in pipelines.items():   # interleaved: A B C, A B C, ...
                    timings[label].append(pipe(frame).timings)
                    bar.advance(task)
    latency = {label: latency_table(t) for label, t in timings.items()}
    ref = reference if reference in latency else next(iter(latency))
    ratios = {label: {s: latency[label][s]["p50"] / max(latency[ref][s]["p50"], 1e-9) for s in (*STAGES, "total")}
              for label in latency}
    shares: dict[str, dict[str, float]] = {}
    warnings = []
    for label, stats in latency.items():
        total_p50 = stats["total"]["p50"]
        overhead = (stats["preprocess"]["p50"] + stats["decode"]["p50"]) / max(total_p50, 1e-9)
        shares[label] = {"runtime_overhead": overhead}
        for stage in STAGES:
            if stats[stage]["p50"] > 0.5 and stats[stage]["p90"] / stats[stage]["p50"] > SPREAD_WARN:
                warnings.append(f"{label}/{stage}: p90 is {stats[stage]['p90'] / stats[stage]['p50']:.1f}x p50; "
                                "the machine was busy, compare ratios only")
    from imkd_deploy.runtime.preprocess import preprocess

    if "torch" in pipelines:
        share = bevpool_share(pipelines["torch"], preprocess(frames[0], pipelines["torch"].cfg).inputs)
        if share is not None:
            shares["torch"]["bevpool_of_network"] = share
    return BenchResult(len(frames), rounds, latency, ratios, shares, warnings, ref)


def append_log(result: BenchResult, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(result.to_dict()) + "\n")


def check_gate(result: BenchResult, baselines_path: Path) -> dict:
    """Compare ratios measured in THIS run with ``baselines.json``'s latency gates.

    A gate is {"name", "backend", "stage", "reference", "ratio", "margin"}: the measured
    p50(backend, stage) / p50(reference, stage) fails when above ratio * (1 + margin).
    ``stage`` "runtime_overhead" gates the share of frame time spent outside the network
    (preprocess + decode) instead. Gates naming a backend that was not run are SKIPPED.
    Absolute times are never compared: machines differ, ratios from one run do not.
    """
    try:
        data = json.loads(Path(baselines_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read gate baselines {baselines_path}: {exc}") from None
    rows = []
    for gate in data.get("latency_gates", []):
        label, stage, ref = gate["backend"], gate["stage"], gate.get("reference", result.reference)
        if stage == "runtime_overhead":
            measured = result.shares.get(label, {}).get("runtime_overhead")
        elif label in result.latency and ref in result.latency:
            measured = result.latency[label][stage]["p50"] / max(result.latency[ref][stage]["p50"], 1e-9)
        else:
            measured = None
        if measured is None:
            rows.append({**gate, "measured": None, "status": "SKIPPED"})
            continue
        limit = gate["ratio"] * (1.0 + gate["margin"])
        rows.append({**gate, "measured": measured, "limit": limit, "status": "PASSED" if measured <= limit else "FAILED"})
    return {"rows": rows, "passed": all(r["status"] != "FAILED" for r in rows)}
