"""INT8 post-training quantization to a TensorRT-friendly Q/DQ ONNX (onnxruntime.quantization).

Settings follow what TensorRT consumes best: symmetric int8 activations (QInt8,
ActivationSymmetric), per-channel symmetric int8 weights, no bias quantization, and Q/DQ
only on the inputs of the compute ops (no output quantization), so TensorRT fuses each
Conv+BN+ReLU into one int8 kernel. The imkd custom ops, everything the exporter scoped
under `head` / `fusion`, and any user exclusions stay FP32.

Two facts from TOOLCHAIN.md shape the code: ORT's calibrators open their own
InferenceSession without custom-op libraries, so `_imkd_calibrater` subclasses them to
register the imkd kernels; and symbolic shape inference fails on imkd nodes, so
preprocessing runs ONNX shape inference only (which also keeps node names and the
exporter's scope metadata intact, which the exclusion lists rely on).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

from imkd_deploy.atomic import atomic_path
from imkd_deploy.errors import UserError

log = logging.getLogger("imkd.calibration")

IMKD_DOMAIN = "imkd"
METHODS = ("minmax", "entropy", "percentile")
Feed = dict[str, np.ndarray]


@dataclass
class QuantizeSettings:
    method: str = "entropy"                       # minmax | entropy | percentile
    percentile: float = 99.99                     # percentile method only
    num_bins: int = 2048                          # histogram methods
    op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    per_channel: bool = True
    # module names (exporter name_scopes, matched as dotted components anywhere) kept FP32
    exclude_scopes: tuple[str, ...] = ("head", "fusion")
    exclude_op_types: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"calibration method '{self.method}' unknown (choose {' | '.join(METHODS)})")
        if not 0 < self.percentile <= 100:
            raise UserError(f"percentile must be in (0, 100], got {self.percentile}")

    def range_key(self) -> dict:
        """The settings that change activation ranges (exclusions do not: ranges are reused)."""
        import onnxruntime

        key = {"method": self.method, "op_types": list(self.op_types), "ort": onnxruntime.__version__,
               "symmetric": True}
        if self.method != "minmax":
            key["num_bins"] = self.num_bins
        if self.method == "percentile":
            key["percentile"] = self.percentile
        return key


# --------------------------------------------------------------------------- sessions
def has_imkd_nodes(model: onnx.ModelProto) -> bool:
    return any(n.domain == IMKD_DOMAIN for n in model.graph.node)


def session_options(model_path: Path | None = None):
    """SessionOptions with the imkd ORT kernels registered (needed for any `--ops plugin` model)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    try:
        from imkd_deploy.ops import register_ort_kernels
    except ImportError:
        register_ort_kernels = None
    if register_ort_kernels is not None:
        register_ort_kernels(so)
    elif model_path is not None and has_imkd_nodes(onnx.load(str(model_path), load_external_data=False)):
        raise UserError(f"{model_path} has imkd custom ops but imkd_deploy.ops.register_ort_kernels is unavailable")
    return so


def make_session(model_path: Path):
    import onnxruntime as ort

    so = session_options(model_path)
    so.intra_op_num_threads = min(os.cpu_count() or 1, 4)
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def _imkd_calibrater(method: str):
    """ORT's calibrator class for `method`, with a session that can run the imkd ops."""
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate as cal

    base = {"minmax": cal.MinMaxCalibrater, "entropy": cal.EntropyCalibrater,
            "percentile": cal.PercentileCalibrater}[method]

    class ImkdCalibrater(base):  # type: ignore[valid-type, misc]
        def create_inference_session(self):
            so = session_options()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.infer_session = ort.InferenceSession(self.augmented_model_path, so, providers=self.execution_providers)

    return ImkdCalibrater


class FeedReader:
    """CalibrationDataReader over an iterable of feeds (dicts input name -> array), consumed once."""

    def __init__(self, feeds: Iterable[Feed], count: int | None = None):
        self._it: Iterator[Feed] = iter(feeds)
        self._count = count
        self.seen = 0

    def get_next(self) -> Feed | None:
        feed = next(self._it, None)
        if feed is not None:
            self.seen += 1
        return feed

    def __len__(self) -> int:
        if self._count is None:
            raise TypeError("FeedReader length unknown")
        return self._count


# --------------------------------------------------------------------------- graph helpers
def node_scope(node: onnx.NodeProto) -> str:
    """Module path the dynamo exporter recorded for a node, e.g. 'head.cls.0' ('' if unknown)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                parts = ast.literal_eval(prop.value)   # the exporter writes a Python list repr
            except (ValueError, SyntaxError):
                return ""
            return ".".join(p for p in parts[:-1] if p)   # last part is the aten op itself
    return ""


def excluded_nodes(model: onnx.ModelProto, settings: QuantizeSettings) -> list[str]:
    """Names of nodes that stay FP32: imkd ops, excluded scopes / op types / names."""
    names = set(settings.exclude_nodes)
    unknown = names - {n.name for n in model.graph.node}
    if unknown:
        raise UserError(f"exclude_nodes name nodes the model does not have: {sorted(unknown)[:5]}")
    for node in model.graph.node:
        scope = node_scope(node)
        if (node.domain == IMKD_DOMAIN or node.op_type in settings.exclude_op_types
                or any(f".{s}." in f".{scope}." for s in settings.exclude_scopes)):
            names.add(node.name)
    return sorted(names)


def quantizable_nodes(model: onnx.ModelProto, settings: QuantizeSettings, exclude: Iterable[str]) -> list[str]:
    skip = set(exclude)
    return [n.name for n in model.graph.node if n.op_type in settings.op_types and n.name not in skip]


# --------------------------------------------------------------------------- pipeline
def preprocess(model_path: Path, out_path: Path) -> Path:
    """ONNX shape inference only: symbolic inference cannot see through imkd ops."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(model_path), str(out_path), skip_optimization=True, skip_symbolic_shape=True)
    return out_path


def compute_ranges(model_path: Path, feeds: Iterable[Feed], settings: QuantizeSettings, workdir: Path):
    """Run calibration over `feeds`; returns ORT TensorsData (per-tensor ranges)."""
    settings.validate()
    cls = _imkd_calibrater(settings.method)
    kwargs = {"symmetric": True}
    if settings.method != "minmax":
        kwargs["num_bins"] = settings.num_bins
    if settings.method == "entropy":
        kwargs["num_quantized_bins"] = 128
    if settings.method == "percentile":
        kwargs["percentile"] = settings.percentile
    calibrater = cls(str(model_path), list(settings.op_types), str(Path(workdir) / "augmented.onnx"), **kwargs)
    calibrater.augment_graph()
    calibrater.create_inference_session()
    t0 = time.perf_counter()
    log.info("calibrating (%s) ...", settings.method)
    seen = 0
    # One frame per collect_data call: ORT stacks a call's frames per tensor, which breaks on
    # tensors whose length varies by frame (radar pillars); its collectors merge across calls.
    for feed in feeds:
        seen += 1
        try:
            with contextlib.redirect_stdout(io.StringIO()):   # ORT prints a line per call
                calibrater.collect_data(FeedReader([feed]))
        except Exception as exc:
            raise UserError(f"calibration run failed on frame {seen} of {model_path.name}: {exc}") from exc
    if seen == 0:
        raise UserError("calibration data reader yielded no frames")
    with contextlib.redirect_stdout(io.StringIO()):   # ORT prints its method's internals here
        ranges = calibrater.compute_data()
    log.info("calibrated on %d frames in %.1f s", seen, time.perf_counter() - t0)
    return ranges


def write_qdq(model_path: Path, ranges, out_path: Path, settings: QuantizeSettings,
              exclude: Iterable[str], only: Iterable[str] | None = None) -> None:
    """Q/DQ ONNX from precomputed ranges (ORT's cache path: no calibration session is opened)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.method]
    with tempfile.TemporaryDirectory(prefix="imkd-qdq-") as tmp:
        ranges_path = Path(tmp) / "ranges.json"
        save_tensors_data(ranges, ranges_path)
        quantize_static(
            str(model_path), str(out_path), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=list(only) if only is not None else None, nodes_to_exclude=list(exclude),
            calibrate_method=method, calibration_cache_path=str(ranges_path),
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(settings.op_types),
            },
        )


@dataclass
class QuantizeResult:
    out_path: Path
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    cache_hit: bool
    cache_note: str
    seconds: float
    sensitivity: dict | None = field(default=None)

    def summary(self) -> str:
        return (f"saved {self.out_path} ({self.out_path.stat().st_size / 1e6:.2f} MB): "
                f"{len(self.quantized_nodes)} nodes int8, {len(self.excluded_nodes)} kept FP32, "
                f"{self.seconds:.1f} s; calibration cache: {self.cache_note}")


def get_ranges(model_path: Path, feeds, settings: QuantizeSettings, *, set_sha256: str | None = None,
               cache=None, cache_label: str | None = None) -> tuple[object, str]:
    """Activation ranges for `model_path`: from `cache` when its key matches, else by calibrating.

    `feeds` may be a callable returning the feeds, so a cache hit never reads a frame.
    Returns (ORT TensorsData, cache note: "hit" | "miss (reason)" | "not used").
    """
    from imkd_deploy.calibration.cache import CacheKey
    from imkd_deploy.export.metadata import file_sha256

    settings.validate()
    key = CacheKey.make(file_sha256(model_path), set_sha256 or "none", settings.range_key())
    label = cache_label or Path(model_path).stem
    note = "not used"
    if cache is not None:
        ranges = cache.load(label, key)
        if ranges is not None:
            return ranges, "hit"
        note = f"miss ({cache.last_miss_reason})"
    if feeds is None:
        raise UserError("INT8 calibration needs frames: no calibration feeds given and no matching cache")
    with tempfile.TemporaryDirectory(prefix="imkd-calib-") as tmp:
        pre = preprocess(Path(model_path), Path(tmp) / "pre.onnx")
        ranges = compute_ranges(pre, feeds() if callable(feeds) else feeds, settings, Path(tmp))
    if cache is not None:
        cache.save(label, key, ranges)
    return ranges, note


def quantize_int8(model_path: Path, feeds: Iterable[Feed] | Callable[[], Iterable[Feed]] | None, out_path: Path,
                  settings: QuantizeSettings | None = None, *, set_sha256: str | None = None,
                  cache=None, cache_label: str | None = None, ranges=None) -> QuantizeResult:
    """FP32 ONNX -> INT8 Q/DQ ONNX (ranges from `ranges`, else `cache`, else calibrating on `feeds`)."""
    from imkd_deploy.export.metadata import file_sha256

    settings = settings or QuantizeSettings()
    settings.validate()
    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise UserError(f"model not found: {model_path}")
    t0 = time.perf_counter()
    note = "given"
    if ranges is None:
        ranges, note = get_ranges(model_path, feeds, settings, set_sha256=set_sha256, cache=cache, cache_label=cache_label)
    with tempfile.TemporaryDirectory(prefix="imkd-int8-") as tmp:
        pre = preprocess(model_path, Path(tmp) / "pre.onnx")
        model = onnx.load(str(pre), load_external_data=False)
        exclude = excluded_nodes(model, settings)
        tmp_out = Path(tmp) / "qdq.onnx"
        write_qdq(pre, ranges, tmp_out, settings, exclude)
        stamp_metadata(tmp_out, out_path, precision="int8", source_sha=file_sha256(model_path), set_sha=set_sha256,
                       details={"settings": asdict(settings), "activations": "int8 symmetric (S8S8, TensorRT)",
                                "weights": "int8 symmetric per-channel" if settings.per_channel else "int8 symmetric",
                                "fp32_nodes": exclude})
    return QuantizeResult(out_path, quantizable_nodes(model, settings, exclude), exclude, note == "hit", note,
                          time.perf_counter() - t0)


def stamp_metadata(src: Path, out_path: Path, *, precision: str, source_sha: str, set_sha: str | None,
                   details: dict) -> None:
    """Copy `src` to `out_path` atomically with the imkd precision/provenance metadata_props."""
    from imkd_deploy.engines.sidecar import META_CALIBRATION_SET, META_PRECISION, META_SOURCE_ONNX

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({META_PRECISION: precision, META_SOURCE_ONNX: source_sha,
                  f"imkd.{precision}": json.dumps(details, sort_keys=True, default=str)})
    if set_sha:
        props[META_CALIBRATION_SET] = set_sha
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))
