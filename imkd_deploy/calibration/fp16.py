"""Mixed-precision FP16 ONNX with onnx helper APIs (onnxconverter-common is not a dependency).

The IO keeps its FP32 types: Casts at the graph edges convert in and out. Numerically
sensitive ops (exponentials, normalising reductions, accumulating scatters, the imkd ops)
stay FP32 with Casts around them. Every other float op runs in FP16 and its float
initializers are stored as FP16. TensorRT builds such a graph strongly typed as written.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from imkd_deploy.errors import UserError

log = logging.getLogger("imkd.calibration")

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
DEFAULT_FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "Sigmoid", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceProd", "ReduceL2", "ReduceLogSumExp",
    "ScatterND", "ScatterElements", "CumSum", "TopK", "NonMaxSuppression", "Range",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
})
# Ops whose listed inputs keep their own type whatever precision the op runs in.
_FIXED_TYPE_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
# Ops that accept any element type and never need a Cast in front of them.
_TYPE_AGNOSTIC = frozenset({"Shape", "Size", "Cast", "CastLike"})
# Constant producers keep FP32: their consumers get a Cast (cheap, folded by TensorRT).
_CONSTANT_OPS = frozenset({"Constant", "ConstantOfShape", "EyeLike"})


@dataclass
class FP16Result:
    out_path: Path
    fp16_nodes: int
    fp32_nodes: list[str]
    casts_added: int
    seconds: float

    def summary(self) -> str:
        return (f"saved {self.out_path} ({self.out_path.stat().st_size / 1e6:.2f} MB): {self.fp16_nodes} nodes fp16, "
                f"{len(self.fp32_nodes)} kept FP32, {self.casts_added} casts, {self.seconds:.1f} s")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the graph names (after ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def convert_fp16(model_path: Path, out_path: Path, keep_fp32_op_types: frozenset[str] | set[str] = DEFAULT_FP32_OPS,
                 keep_fp32_nodes: tuple[str, ...] = ()) -> FP16Result:
    """Write a mixed FP16/FP32 copy of `model_path` with unchanged FP32 inputs and outputs."""
    from imkd_deploy.calibration.quantize import stamp_metadata
    from imkd_deploy.export.metadata import file_sha256

    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise UserError(f"model not found: {model_path}")
    t0 = time.perf_counter()
    model = onnx.load(str(model_path))
    g = model.graph
    missing = set(keep_fp32_nodes) - {n.name for n in g.node}
    if missing:
        raise UserError(f"keep_fp32_nodes name nodes {model_path.name} does not have: {sorted(missing)[:5]}")
    types = _elem_types(model)

    def is_float(name: str, producer_custom: bool = False) -> bool:
        t = types.get(name)
        return t == F32 or (t is None and producer_custom)

    fp32_nodes, half = [], {}
    for node in g.node:
        custom = node.domain not in ("", "ai.onnx")
        touches_float = any(is_float(t) for t in list(node.input) + list(node.output) if t)
        keep = (custom or node.op_type in keep_fp32_op_types or node.name in keep_fp32_nodes
                or node.op_type in _CONSTANT_OPS or node.op_type in _TYPE_AGNOSTIC)
        half[node.name or id(node)] = touches_float and not keep
        if touches_float and keep and node.op_type not in _TYPE_AGNOSTIC | _CONSTANT_OPS:
            fp32_nodes.append(node.name)

    def node_is_half(node) -> bool:
        return half[node.name or id(node)]

    # Which float tensors end up FP16: outputs of half nodes (custom-op outputs are float32).
    fp16_tensors = {o for n in g.node if node_is_half(n) for o in n.output
                    if is_float(o, producer_custom=False)}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    # Float initializers used only by half nodes (through non-fixed inputs) become FP16 in place.
    inits = {t.name: t for t in g.initializer}
    half_inits = set()
    for name, t in inits.items():
        if t.data_type != F32:
            continue
        uses = [(n, k) for n in consumers.get(name, []) for k, i in enumerate(n.input) if i == name]
        if uses and all(node_is_half(n) and k not in _FIXED_TYPE_INPUTS.get(n.op_type, ()) for n, k in uses):
            arr = numpy_helper.to_array(t).astype(np.float16)
            t.CopyFrom(numpy_helper.from_array(arr, name))
            half_inits.add(name)
    fp16_tensors |= half_inits

    new_nodes, casts, cast_cache = [], 0, {}

    def cast(src: str, to: int) -> str:
        nonlocal casts
        key = (src, to)
        if key not in cast_cache:
            dst = f"{src}__to_{'fp16' if to == F16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [src], [dst], name=f"Cast_{dst}", to=to))
            cast_cache[key] = dst
            casts += 1
        return cast_cache[key]

    # An FP16 graph output is produced under an inner name and cast back right after its
    # producer; FP16 consumers read the inner tensor, FP32 consumers the original name.
    renamed = {o.name: f"{o.name}__fp16" for o in g.output if o.name in fp16_tensors}
    for node in g.node:
        is_h = node_is_half(node)
        fixed = _FIXED_TYPE_INPUTS.get(node.op_type, set()) if is_h else set()
        for k, name in enumerate(node.input):
            if not name or k in fixed:
                continue
            if name in renamed:
                if is_h:
                    node.input[k] = renamed[name]
            elif node.op_type in _TYPE_AGNOSTIC:
                if node.op_type == "CastLike" and k == 1 and name in fp16_tensors:
                    node.input[k] = cast(name, F32)   # CastLike would otherwise produce fp16
            elif is_h and is_float(name) and name not in fp16_tensors:
                node.input[k] = cast(name, F16)
            elif not is_h and name in fp16_tensors:
                node.input[k] = cast(name, F32)
        new_nodes.append(node)
        for k, name in enumerate(node.output):
            if name in renamed:
                node.output[k] = renamed[name]
                new_nodes.append(helper.make_node("Cast", [renamed[name]], [name], name=f"Cast_{name}__out", to=F32))
                casts += 1

    # Casts were appended right before their consumers, so `new_nodes` is already topological.
    del g.node[:]
    g.node.extend(new_nodes)
    # Stale FP32 value_info would contradict the FP16 tensors; ONNX/TensorRT re-infer them.
    keep_vi = [vi for vi in g.value_info if vi.name not in fp16_tensors]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    with tempfile.TemporaryDirectory(prefix="imkd-fp16-") as tmp:
        tmp_path = Path(tmp) / "fp16.onnx"
        onnx.save(model, tmp_path)
        try:
            onnx.checker.check_model(str(tmp_path))
        except onnx.checker.ValidationError as exc:
            raise UserError(f"FP16 conversion of {model_path} produced an invalid graph: {exc}") from exc
        n_half = sum(1 for n in g.node if n.op_type != "Cast" and half.get(n.name or id(n), False))
        stamp_metadata(tmp_path, out_path, precision="fp16", source_sha=file_sha256(model_path), set_sha=None,
                       details={"fp32_op_types": sorted(keep_fp32_op_types), "fp32_nodes": fp32_nodes,
                                "io": "fp32 (casts at the edges)"})
    seconds = time.perf_counter() - t0
    log.info("fp16: %d nodes half, %d kept FP32, %d casts", n_half, len(fp32_nodes), casts)
    return FP16Result(out_path, n_half, fp32_nodes, casts, seconds)
